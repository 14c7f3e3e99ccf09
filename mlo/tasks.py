"""Task-batched problems (``Problem(tasks=N)``): one problem over N independent tasks.

Every parameter of such a problem is stacked on a leading dimension of size N,
and so is every tensor of its batches. Its objective is written for one task;
``task_objective`` turns it into the problem's loss, the sum over tasks, by
evaluating it on each task's slice under ``torch.func.vmap`` (or in a loop).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from .errors import MLOError


def task_objective(objective: Callable, name: str, n: int, vectorize: bool) -> Callable:
    """The sum over tasks of ``objective`` evaluated on each task's slice (``Problem.tasks``)."""
    def per_task(ctx, own, batch):
        sub = copy.copy(ctx)
        sub._values = {**ctx._values, name: own}
        sub.metrics = {}
        return objective(sub, batch)

    def total(ctx, batch):
        own = ctx._values[name]
        if vectorize:
            dims = None if batch is None else 0
            try:
                losses = torch.func.vmap(lambda o, b: per_task(ctx, o, b), in_dims=(0, dims),
                                         randomness="different")(own, batch)
            except RuntimeError as e:
                raise MLOError(f"problem {name!r}: its objective failed under torch.func.vmap ({e}). If it runs "
                               "for one task outside vmap, it does something vmap cannot batch (BatchNorm "
                               "updating its running statistics, .item(), control flow on values): declare "
                               "Problem(..., vectorize=False) to evaluate the tasks in a loop") from e
            return losses.reshape(n, -1).sum()
        out = None
        for t in range(n):
            loss = per_task(ctx, {k: v[t] for k, v in own.items()},
                            tree_map(lambda x: x[t] if isinstance(x, Tensor) else x, batch))
            out = loss if out is None else out + loss
        return out
    total.__wrapped__ = objective
    return total
