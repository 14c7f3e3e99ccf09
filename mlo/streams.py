"""Where a problem's batches come from: ``DataStream`` (an iterable cycled forever, resumable
exactly), ``SameBatch`` (another problem's latest batch) and, for ``Problem(accumulate=k)``,
``AccumulatingStream`` (``k`` batches a step, as one ``Accumulated`` tuple) with the mean objective."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from . import rng
from .errors import ConfigError


@dataclass(frozen=True)
class SameBatch:
    """Data spec: use the batch that problem ``source`` drew most recently.

    For problems that must see the same examples as another one, e.g. an
    audience trained on the examples the explainer just explained.
    """

    source: str


class DataStream:
    """Cycles an iterable forever and remembers where it is, for exact resume.

    The position is (epoch, batches drawn this epoch) plus the RNG states in
    force when the epoch's iterator was created, so a shuffled ``DataLoader``
    replays the same order after a restart.
    """

    def __init__(self, data: Iterable | None):
        self.data = data
        self.epoch = 0
        self.position = 0
        self.last = None
        self._iter = None
        self._epoch_rng = None

    def share(self, batch):
        """For ``SameBatch`` data: take ``batch`` (another stream's ``last``) as this one's batch."""
        self.last = batch
        return batch

    def next(self):
        if isinstance(self.data, SameBatch):
            raise ConfigError(f"a SameBatch({self.data.source!r}) stream has no batches of its own; "
                              "the step takes them from the source problem (DataStream.share)")
        if self.data is None:
            return None
        if self._iter is None:
            self._start_epoch()
        try:
            batch = next(self._iter)
        except StopIteration:
            self.epoch += 1
            self._start_epoch()
            try:
                batch = next(self._iter)
            except StopIteration:
                raise ConfigError("a problem's data source yielded no batches") from None
        self.position += 1
        self.last = batch
        return batch

    def _start_epoch(self):
        self._epoch_rng = rng.capture_loader(self.data)
        self.position = 0
        self._iter = iter(self.data)

    def state_dict(self) -> dict:
        gen = getattr(self.data, "generator", None)
        now = gen.get_state() if isinstance(gen, torch.Generator) else None
        return {"epoch": self.epoch, "position": self.position, "rng": self._epoch_rng, "generator_now": now}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._iter = None
        self._epoch_rng = state["rng"]
        if self.data is None or isinstance(self.data, SameBatch) or state["rng"] is None:
            self.position = 0
            return
        now = rng.capture_loader(self.data)
        rng.restore_loader(self.data, state["rng"])
        self._iter = iter(self.data)
        # a sampler may draw its permutation lazily, at the first next(): replay those draws too
        for _ in range(int(state["position"])):
            next(self._iter)
        rng.restore_loader(self.data, now)
        gen = getattr(self.data, "generator", None)
        if isinstance(gen, torch.Generator) and state.get("generator_now") is not None:
            gen.set_state(state["generator_now"])   # where the loader's own generator had got to
        self.position = int(state["position"])


class AccumulatingStream(DataStream):
    """A ``DataStream`` whose ``next()`` draws ``k`` batches at once, as an ``Accumulated`` tuple.

    Its position counts the batches underneath, so resume replays them exactly.
    """

    def __init__(self, data: Iterable, k: int):
        super().__init__(data)
        self.k = k

    def next(self):
        group = Accumulated(DataStream.next(self) for _ in range(self.k))
        self.last = group
        return group


class Accumulated(tuple):
    """The ``k`` batches of one step of a problem with ``accumulate=k`` (what its record holds)."""


def mean_objective(objective):
    """``accumulate=k``: the objective of a step is the mean over its ``Accumulated`` batches."""
    def mean(ctx, batch):
        if not isinstance(batch, Accumulated):
            return objective(ctx, batch)
        total = objective(ctx, batch[0])
        for b in batch[1:]:
            total = total + objective(ctx, b)
        return total / len(batch)
    mean.__wrapped__ = objective
    return mean
