"""``Runner``: the outer loop — steps, metrics, progress, checkpoints, resume."""
from __future__ import annotations

import os
import signal
from typing import Callable, Iterable

from .graph import Graph
from .metrics import ProgressBar, flatten
from .checkpoint import load_checkpoint, save_checkpoint
from .state import graph_state_dict, load_graph_state_dict
from .step import Stepper

Callback = Callable[[int, dict], None]


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
    ``extra_state()`` adds application state to every checkpoint (under ``"extra"``).
    """

    def __init__(self, graph: Graph, callbacks: Iterable[Callback] = (), log_every: int = 1,
                 nan_policy: str = "raise", progress: bool = True, checkpoint: str | os.PathLike | None = None,
                 checkpoint_every: int = 0, stepper: Stepper | None = None, extra_state: Callable[[], dict] | None = None,
                 before_step: Callable[[int], Iterable[str] | None] | None = None):
        if log_every < 1:
            raise ValueError(f"log_every: expected an integer >= 1, got {log_every}")
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
        self.interrupted = False
        self._saved_at = -1

    @property
    def step(self) -> int:
        return self.stepper.step_count

    def state_dict(self) -> dict:
        state = {"graph": graph_state_dict(self.graph), "step": self.stepper.step_count,
                 "skipped": dict(self.stepper.skipped)}
        if self.extra_state is not None:
            state["extra"] = self.extra_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        load_graph_state_dict(self.graph, state["graph"])
        self.stepper.step_count = int(state["step"])
        self.stepper.skipped.update(state.get("skipped", {}))

    def save(self, path: str | os.PathLike | None = None) -> None:
        save_checkpoint(self.state_dict(), path or self.checkpoint)
        if path is None or os.fspath(path) == self.checkpoint:
            self._saved_at = self.step

    def resume(self, path: str | os.PathLike | None = None) -> dict:
        state = load_checkpoint(path or self.checkpoint)
        self.load_state_dict(state)
        return state

    def run(self, steps: int) -> dict:
        """Run until the outer step counter reaches ``steps``; returns the last logged row."""
        bar = ProgressBar(steps, start=self.step) if self.progress else None
        previous = {}

        def on_signal(signum, frame):
            self.interrupted = True

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
        if completed and self.checkpoint and self.step > 0 and self._saved_at != self.step:
            self.save()
        return self.last_row

    def _should_stop(self) -> bool:
        """Checked before every step; a distributed runner makes all processes agree."""
        return self.interrupted

    def close(self) -> None:
        for cb in self.callbacks:
            close = getattr(cb, "close", None)
            if close is not None:
                close()
