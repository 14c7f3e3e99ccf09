"""``DataParallel``: the ``Stepper``'s ``reduce_fn`` that combines update directions across processes."""
from __future__ import annotations

import difflib
from collections import defaultdict
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError, MLOError
from ..graph import Graph
from ..problem import Problem
from ..rows import Rows, RowTree
from ..tree import Tree
from .env import control_device, current_rank, current_world
from .packing import all_gather_into, first_occurrence, group_by_dtype, group_by_dtype_device, pad_rows, unflatten

REDUCE_OPS = ("mean", "sum")


class DataParallel:
    """The ``reduce_fn`` that combines each problem's update direction across processes.

    ``reduce``: ``{problem: "mean" | "sum"}`` (default ``"mean"``), matching how the
    problem's objective reduces over its batch. ``rows``: ``{problem: index_fn}``
    for per-example banks: exchange only the rows ``index_fn(batch)`` of the batch
    the problem drew last (``problem.stream.last``); whatever the direction holds in
    other rows is dropped, so use it only when the objective reads the bank through
    the batch's rows. ``group``: a process group
    (default: all processes). With one process every method is a no-op.
    ``collectives`` counts the collectives issued per problem (tests check there is
    one per update).
    """

    def __init__(self, graph: Graph, reduce: Mapping[str, str] | None = None,
                 rows: Mapping[str, Callable[[Any], Tensor]] | None = None, group=None):
        self.graph = graph
        self.reduce = dict(reduce or {})
        self.rows = dict(rows or {})
        for what, names in (("reduce", self.reduce), ("rows", self.rows)):
            for name in names:
                if name not in graph.problems:
                    close = difflib.get_close_matches(name, list(graph.problems), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else f"; problems: {', '.join(graph.problems)}"
                    raise ConfigError(f"DataParallel.{what}: unknown problem {name!r}{hint}")
        for name, op in self.reduce.items():
            if op not in REDUCE_OPS:
                raise ConfigError(f"DataParallel.reduce[{name!r}]: expected 'mean' or 'sum', got {op!r}")
        for name, fn in self.rows.items():
            if not callable(fn):
                raise ConfigError(f"DataParallel.rows[{name!r}]: expected a function batch -> row indices")
        self.group = group
        self.world = current_world(group)
        self.rank = current_rank(group)
        self.collectives: dict[str, int] = defaultdict(int)
        # NCCL moves CUDA tensors only, gloo CPU tensors: buffers and control values travel there
        self.device = control_device(group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------- the reduce_fn
    def __call__(self, problem: Problem, tree: Tree) -> Tree:
        if self.world == 1:
            return tree
        op = self.reduce.get(problem.name, "mean")
        if isinstance(tree, RowTree):             # a row-sparse problem: its rows are all there is
            return self._reduce_row_tree(problem, tree, op)
        if problem.name in self.rows:
            return self._reduce_rows(problem, tree, op)
        self.collectives[problem.name] += 1
        return self._all_reduce(tree, op)

    def _all_reduce(self, tree: Tree, op: str) -> Tree:
        """One all-reduce per dtype of the whole flattened tree."""
        out: Tree = {}
        for keys in group_by_dtype(tree).values():
            flat = torch.cat([tree[k].detach().reshape(-1) for k in keys]).to(self.device)
            dist.all_reduce(flat, group=self.group)
            if op == "mean":
                flat.div_(self.world)
            out.update(unflatten(flat, {k: tree[k] for k in keys}))
        return {k: out[k] for k in tree}

    def _reduce_rows(self, problem: Problem, tree: Tree, op: str) -> Tree:
        """All-gather the rows the batch touched (with their indices) and add them up densely."""
        batch = problem.stream.last
        idx = torch.as_tensor(self.rows[problem.name](batch)).reshape(-1).to(
            device=next(iter(tree.values())).device, dtype=torch.int64)
        n = next(iter(tree.values())).shape[0]
        for k, t in tree.items():
            if t.dim() == 0 or t.shape[0] != n:
                raise MLOError(f"DataParallel.rows[{problem.name!r}]: parameter {k!r} of shape {tuple(t.shape)} "
                               f"is not a bank of {n} rows like the others")
        keep = first_occurrence(idx)              # a row drawn twice is already summed in the dense gradient
        rows = {k: torch.where(keep.view(-1, *([1] * (t.dim() - 1))), t.detach()[idx],
                               torch.zeros((), dtype=t.dtype, device=t.device)) for k, t in tree.items()}
        all_idx, gathered, _ = self._gather_rows(problem, idx, rows)
        out: Tree = {}
        for k, t in tree.items():
            dense = torch.zeros_like(t)
            dense.index_add_(0, all_idx, gathered[k])     # padding rows are zeros at index 0: no effect
            if op == "mean":
                dense.div_(self.world)
            out[k] = dense
        return out

    def _reduce_row_tree(self, problem: Problem, tree: RowTree, op: str) -> RowTree:
        """A row-sparse problem's direction: all-gather its rows and sum them per row (batch-sized)."""
        idx = tree.rows.index
        all_idx, gathered, counts = self._gather_rows(problem, idx, {k: v.detach() for k, v in tree.items()})
        cap = all_idx.numel() // self.world
        real = (torch.arange(cap, device=all_idx.device) < counts.to(all_idx.device).view(-1, 1)).reshape(-1)
        index, inverse = torch.unique(all_idx[real], sorted=True, return_inverse=True)
        out = {}
        for k, v in gathered.items():
            t = v.new_zeros((index.numel(), *v.shape[1:])).index_add_(0, inverse, v[real])
            out[k] = t.div_(self.world) if op == "mean" else t
        return RowTree(out, Rows(index))

    def _gather_rows(self, problem: Problem, idx: Tensor, rows: Tree) -> tuple[Tensor, Tree, Tensor]:
        """Every process's ``idx`` and ``rows``, padded with zeros to the largest count and concatenated,
        and the counts."""
        # 1) how many rows each process sends (shards may differ in size)
        count = torch.tensor([idx.numel()], dtype=torch.int64, device=self.device)
        counts = torch.empty(self.world, dtype=torch.int64, device=self.device)
        all_gather_into(counts, count, group=self.group)
        cap = int(counts.max())
        # 2) one buffer of bytes: padded indices, then each parameter's padded rows
        pieces = [pad_rows(idx, cap).to(self.device)] + [pad_rows(t, cap).to(self.device) for t in rows.values()]
        sizes = [p.numel() * p.element_size() for p in pieces]
        payload = torch.cat([p.contiguous().reshape(-1).view(torch.uint8) for p in pieces])
        gathered = torch.empty(self.world * payload.numel(), dtype=torch.uint8, device=self.device)
        all_gather_into(gathered, payload, group=self.group)
        self.collectives[problem.name] += 2
        gathered = gathered.view(self.world, payload.numel())
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)

        def piece(i: int, like: Tensor, shape) -> Tensor:
            raw = gathered[:, offsets[i]:offsets[i + 1]].contiguous().reshape(-1)
            return raw.view(like.dtype).view(self.world * cap, *shape)

        out = {k: piece(j, t, t.shape[1:]).to(t.device) for j, (k, t) in enumerate(rows.items(), start=1)}
        return piece(0, idx, ()).to(idx.device), out, counts

    # ---------------------------------------------------------- replicas
    def _params_and_buffers(self) -> tuple[list[Tensor], list[Tensor]]:
        params = [t for p in self.graph.problems.values() for t in p.params_tree.values()]
        buffers = [b for m in self.graph.modules() for b in m.buffers()]
        return params, buffers

    def broadcast_parameters(self, src: int = 0) -> None:
        """Make every replica start from rank ``src``'s parameters and buffers."""
        if self.world == 1:
            return
        params, buffers = self._params_and_buffers()
        with torch.no_grad():
            tensors = {str(i): t for i, t in enumerate(params + buffers)}
            for keys in group_by_dtype_device(tensors).values():
                flat = torch.cat([tensors[k].detach().reshape(-1) for k in keys]).to(self.device)
                dist.broadcast(flat, src=src, group=self.group)
                for k, v in unflatten(flat, {k: tensors[k] for k in keys}).items():
                    tensors[k].copy_(v)

    def sync_buffers(self) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over processes;
        other buffers (counters) take rank 0's values."""
        if self.world == 1:
            return
        _, buffers = self._params_and_buffers()
        tensors = {str(i): b for i, b in enumerate(buffers)}
        with torch.no_grad():
            for keys in group_by_dtype_device(tensors).values():
                flat = torch.cat([tensors[k].detach().reshape(-1) for k in keys]).to(self.device)
                if flat.is_floating_point():
                    dist.all_reduce(flat, group=self.group)
                    flat.div_(self.world)
                else:
                    dist.broadcast(flat, src=0, group=self.group)
                for k, v in unflatten(flat, {k: tensors[k] for k in keys}).items():
                    tensors[k].copy_(v)

    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is true on any."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def gather_ints(self, value: int) -> list[int]:
        """Every process's ``value``, in rank order."""
        if self.world == 1:
            return [int(value)]
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        out = torch.empty(self.world, dtype=torch.int64, device=self.device)
        all_gather_into(out, t, group=self.group)
        return [int(v) for v in out.tolist()]

    def average_row(self, step: int, row: dict) -> None:
        """A callback: replace the logged metrics by their mean over processes (in place)."""
        if self.world == 1 or not row:
            return
        keys = sorted(row)
        t = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.group)
        t.div_(self.world)
        row.update(zip(keys, t.tolist()))

    def check_in_sync(self) -> None:
        """Raise ``MLOError`` naming the first problem whose parameters differ between processes."""
        if self.world == 1:
            return
        names = list(self.graph.problems)
        sums = []
        with torch.no_grad():
            for n in names:
                vals = [v.detach().double() for v in self.graph.problems[n].params_tree.values()]
                sums.append(torch.stack([sum(v.sum() for v in vals), sum((v * v).sum() for v in vals)]))
        local = torch.cat(sums).to(self.device)
        everyone = torch.empty(self.world * local.numel(), dtype=local.dtype, device=self.device)
        all_gather_into(everyone, local, group=self.group)
        everyone = everyone.view(self.world, len(names), 2)
        same = (everyone == everyone[:1]).all(dim=2).all(dim=0)
        for n, ok in zip(names, same.tolist()):
            if not ok:
                raise MLOError(f"the replicas of problem {n!r} differ between processes; "
                               "every process must apply the same combined update")
