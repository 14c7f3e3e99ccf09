"""``Runner``: the outer loop — steps, metrics, progress, checkpoints, resume.

A Runner checkpoint is read back as a ``RunCheckpoint`` (``read_checkpoint``), so
applications never depend on the file's internal layout.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Callable, Iterable

from .graph import Graph
from .metrics import ProgressBar, flatten
from .checkpoint import CheckpointError, load_with_fallback, save_checkpoint
from .errors import ConfigError
from .state import graph_state_dict, load_graph_state_dict
from .step import Stepper

Callback = Callable[[int, dict], None]


@dataclass(frozen=True)
class RunCheckpoint:
    """A ``Runner`` checkpoint as read from disk.

    ``graph_state`` goes to ``load_graph_state_dict`` (or use ``Runner.restore``);
    ``path`` is the file actually read: the checkpoint, or its ``.prev`` backup
    when the newest file was missing or damaged (``fallback_reason`` says why).
    """

    step: int
    extra: dict
    skip_counts: dict
    graph_state: dict
    path: str
    fallback_reason: str | None = None
    init_from: dict | None = None     # {problem: source} (Problem.init_from) when it was written; None: older file

    def to_state(self) -> dict:
        """The dict ``Runner.state_dict`` wrote."""
        return {"graph": self.graph_state, "step": self.step, "skipped": dict(self.skip_counts),
                "extra": self.extra, "init_from": self.init_from}


def read_checkpoint(path: str | os.PathLike, set_aside_damaged: bool = False) -> RunCheckpoint:
    """Read a ``Runner`` checkpoint (``weights_only=True``), falling back to ``<path>.prev``.

    Raises ``CheckpointError`` naming both files when neither is readable. With
    ``set_aside_damaged=True`` a damaged newest file that was skipped is renamed to
    ``<path>.damaged``, so that the next save does not rotate it into the backup
    (in a run of several processes, only one should do this).
    """
    state, used, reason = load_with_fallback(path)
    if not isinstance(state, dict) or "graph" not in state or "step" not in state:
        raise CheckpointError(f"{used} is not a checkpoint written by mlo.Runner")
    path = os.fspath(path)
    if reason is not None and set_aside_damaged and os.path.exists(path):
        os.replace(path, path + ".damaged")
    return RunCheckpoint(step=int(state["step"]), extra=dict(state.get("extra") or {}),
                         skip_counts=dict(state.get("skipped", {})), graph_state=state["graph"], path=used,
                         fallback_reason=reason, init_from=state.get("init_from"))


def _init_from(graph: Graph) -> dict[str, str]:
    """``{problem: the problem it restarts from}`` (``Problem.init_from``), recorded in checkpoints."""
    return {n: p.init_from for n, p in graph.problems.items() if p.init_from is not None}


class Runner:
    """Run a graph for N outer steps.

    ``callbacks`` receive ``(step, {"problem/metric": float})`` every
    ``log_every`` steps (the only place metrics are read back from the device).
    ``checkpoint`` (a file path) is written atomically every ``checkpoint_every``
    steps, at the end, and when SIGINT/SIGTERM arrives (the current step is
    finished first); an exception in the middle of a step writes nothing, so the
    last checkpoint stays the last complete one. ``Runner.resume`` continues
    from such a file.
    ``before_step(step)`` runs before every outer step (schedules, dropout rates) and
    may return names of problems that sit out that step.
    ``extra_state()`` adds application state to every checkpoint (``RunCheckpoint.extra``).
    ``last_saved_step`` is the step of the last checkpoint this runner wrote or
    restored (None before any); ``skip_counts`` the updates skipped per problem
    under ``nan_policy="skip"`` (restored from a checkpoint; ``reset_skip_counts``
    clears them).
    """

    def __init__(self, graph: Graph, callbacks: Iterable[Callback] = (), log_every: int = 1,
                 nan_policy: str = "raise", progress: bool = True, checkpoint: str | os.PathLike | None = None,
                 checkpoint_every: int = 0, stepper: Stepper | None = None, extra_state: Callable[[], dict] | None = None,
                 before_step: Callable[[int], Iterable[str] | None] | None = None):
        if log_every < 1:
            raise ConfigError(f"log_every: expected an integer >= 1, got {log_every}")
        self.graph = graph
        self.stepper = stepper or Stepper(graph, nan_policy=nan_policy)
        self.callbacks = list(callbacks)
        self.log_every = log_every
        self.progress = progress
        self.checkpoint = os.fspath(checkpoint) if checkpoint is not None else None
        self.checkpoint_every = checkpoint_every
        self.extra_state = extra_state
        self.before_step = before_step
        self.last_row: dict = {}
        self.interrupted = False         # the decision to stop (``_should_stop``)
        self._signalled = False          # set by the signal handler only, never cleared: it cannot be lost
        self.last_saved_step: int | None = None

    @property
    def step(self) -> int:
        return self.stepper.step_count

    @property
    def skip_counts(self) -> dict[str, int]:
        """Updates skipped per problem (a copy)."""
        return self.stepper.skip_counts

    def reset_skip_counts(self) -> None:
        self.stepper.skipped.clear()

    def state_dict(self) -> dict:
        state = {"graph": graph_state_dict(self.graph), "step": self.stepper.step_count,
                 "skipped": dict(self.stepper.skipped), "init_from": _init_from(self.graph)}
        if self.extra_state is not None:
            state["extra"] = self.extra_state()
        return state

    def load_state_dict(self, state: dict | RunCheckpoint) -> None:
        """Restore a ``state_dict()`` (or a ``RunCheckpoint``): graph, RNG, step counter, skip counts."""
        if isinstance(state, RunCheckpoint):
            state = state.to_state()
        saved, now = state.get("init_from"), _init_from(self.graph)
        if saved is not None and saved != now:
            raise CheckpointError(f"checkpoint does not match the graph: it was written with init_from {saved}, "
                                  f"the graph declares {now} (Problem.init_from)")
        load_graph_state_dict(self.graph, state["graph"], rng_state=True)
        self.stepper.step_count = int(state["step"])
        self.stepper.skipped.update(state.get("skipped", {}))
        self.last_saved_step = self.step

    def restore(self, ckpt: RunCheckpoint) -> None:
        """Continue from a checkpoint read with ``read_checkpoint``."""
        self.load_state_dict(ckpt)

    def save(self, path: str | os.PathLike | None = None) -> None:
        save_checkpoint(self.state_dict(), path or self.checkpoint)
        self._mark_saved(path)

    def _mark_saved(self, path) -> None:
        if path is None or os.fspath(path) == self.checkpoint:
            self.last_saved_step = self.step

    def resume(self, path: str | os.PathLike | None = None) -> RunCheckpoint:
        """Read ``path`` (default: ``checkpoint``) with ``read_checkpoint`` and restore it."""
        ckpt = read_checkpoint(path or self.checkpoint)
        if ckpt.fallback_reason is not None:
            import warnings
            warnings.warn(f"checkpoint {os.fspath(path or self.checkpoint)} is unreadable "
                          f"({ckpt.fallback_reason}); loaded the previous one, {ckpt.path}", stacklevel=2)
        self.restore(ckpt)
        return ckpt

    def run(self, steps: int | None = None, *, until: int | None = None) -> dict:
        """Run ``steps`` more outer steps, or until the step counter reaches ``until``; returns the last logged row.

        Give exactly one. ``run(steps=10)`` twice runs 20 steps. ``until`` is for
        a run resumed from a checkpoint that should end at a fixed total
        (``run(until=1000)`` after ``resume``); an ``until`` already reached runs
        nothing and returns the last logged row (empty if none), one below the
        counter raises ``mlo.ConfigError`` (a ``ValueError``). A SIGINT/SIGTERM stops earlier
        (``interrupted``).
        """
        if (steps is None) == (until is None):
            raise ConfigError("Runner.run: give exactly one of steps (how many more steps) or until "
                             f"(the step counter to stop at); got steps={steps!r}, until={until!r}")
        for what, value in (("steps", steps), ("until", until)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"Runner.run: {what}: expected an integer >= 0, got {value!r}")
        if until is not None and until < self.step:
            raise ConfigError(f"Runner.run: until={until} is below the step counter ({self.step}); "
                             f"run(steps=N) runs N more steps")
        steps = self.step + steps if until is None else until
        bar = ProgressBar(steps, start=self.step) if self.progress else None
        previous = {}

        def on_signal(signum, frame):
            self._signalled = True

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, on_signal)
            except ValueError:  # not in the main thread
                pass
        completed = False
        try:
            while self.step < steps and not self._should_stop():
                skip = self.before_step(self.step) if self.before_step else None
                metrics = self.stepper.step(skip=frozenset(skip or ()))
                i = self.step
                if i % self.log_every == 0 or i == steps:
                    row = flatten(metrics)
                    self.last_row = row
                    for cb in self.callbacks:
                        cb(i, row)
                    if bar is not None:
                        bar(i, row)
                if self.checkpoint and self.checkpoint_every and i % self.checkpoint_every == 0:
                    self.save()
            completed = True
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        # an exception mid-step (NonFiniteError, a crash) leaves a half-applied step: keep the last checkpoint
        if completed and self.checkpoint and self.step > 0 and self.last_saved_step != self.step:
            self.save()
        return self.last_row

    def _should_stop(self) -> bool:
        """Checked before every step; a distributed runner makes all processes agree."""
        self.interrupted = self.interrupted or self._signalled
        return self.interrupted

    def close(self) -> None:
        for cb in self.callbacks:
            close = getattr(cb, "close", None)
            if close is not None:
                close()
