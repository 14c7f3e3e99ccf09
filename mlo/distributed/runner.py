"""``DistributedRunner``: a ``Runner`` for one replica among several."""
from __future__ import annotations

import os
from typing import Callable, Iterable

from ..errors import ConfigError, MLOError
from ..graph import Graph
from ..run import Runner
from ..step import Stepper
from .parallel import DataParallel


class DistributedRunner(Runner):
    """``Runner`` for one replica among several (works unchanged with one process).

    Takes ``Runner``'s arguments plus ``data_parallel`` (default: ``DataParallel(graph)``,
    every problem averaged). Callbacks and the progress bar run on rank 0 only,
    after the metrics are averaged over processes. Every process calls ``save``
    (buffers are averaged, then rank 0 writes); every process reads the checkpoint
    on ``resume`` and the processes check they loaded the same step. SIGINT or
    SIGTERM on any process stops all of them after the same step.
    """

    def __init__(self, graph: Graph, data_parallel: DataParallel | None = None,
                 callbacks: Iterable[Callable[[int, dict], None]] = (), progress: bool = True,
                 nan_policy: str = "raise", stepper: Stepper | None = None, **kwargs):
        dp = data_parallel if data_parallel is not None else DataParallel(graph)
        if dp.graph is not graph:
            raise ConfigError("DistributedRunner: data_parallel was built for another graph")
        if stepper is None:
            stepper = Stepper(graph, nan_policy=nan_policy, reduce_fn=dp)
        elif stepper.reduce_fn is None:
            stepper.reduce_fn = dp
        cbs = list(callbacks) if dp.is_main else []
        if dp.world > 1:
            cbs.insert(0, dp.average_row)
        super().__init__(graph, callbacks=cbs, progress=progress and dp.is_main, nan_policy=nan_policy,
                         stepper=stepper, **kwargs)
        self.dp = dp
        dp.broadcast_parameters()

    def _should_stop(self) -> bool:
        # A signal handled while the all-reduce blocks sets ``_signalled`` (which nothing clears), not the
        # value being agreed on; it joins the next step's vote. (Writing the vote's result back over the
        # handler's flag lost such a signal: both replicas then ran to the end.)
        self.interrupted = self.dp.any(self.interrupted or self._signalled)
        return self.interrupted

    def save(self, path: str | os.PathLike | None = None) -> None:
        self.dp.sync_buffers()
        if self.dp.is_main:
            super().save(path)
        else:
            self._mark_saved(path)

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        steps = self.dp.gather_ints(self.step)
        if len(set(steps)) != 1:
            raise MLOError(f"the processes resumed from different checkpoints (steps {steps}); "
                           "put the checkpoint on a file system every node can read")
