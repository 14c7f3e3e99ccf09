"""Data parallelism on ``torch.distributed``: one replica of the whole graph per process.

Launch N copies of a program with ``torchrun`` (see docs/distributed.md). Every
process holds all problems' parameters and draws its own shard of every data
stream; each problem's update direction (direct gradient + hypergradient) is
combined across processes once per update by ``DataParallel``, the
``Stepper``'s ``reduce_fn``::

    env = mlo.distributed.init("cuda")                # reads torchrun's environment; "cpu" for gloo
    g = torch.Generator().manual_seed(seed)           # the same seed on every process
    loader = DataLoader(data, batch_size=b, sampler=ShardedSampler(len(data), generator=g), generator=g)
    dp = mlo.distributed.DataParallel(graph, reduce={"bank": "sum"}, rows={"bank": lambda batch: batch[2]})
    mlo.distributed.DistributedRunner(graph, dp, checkpoint="ckpt.pt").run(steps)

Because every process applies the same combined direction with the same
optimizer, the replicas stay identical (bit for bit: an all-reduce hands every
process the same sum). What is combined, and how:

* ``"mean"`` (default): one all-reduce of the flattened direction, divided by the
  number of processes. Right for objectives that *average* over their batch: the
  mean over processes of per-process means is the mean over the global batch.
* ``"sum"``: one all-reduce, not divided. Right for objectives that *sum* over
  their batch (per-example parameters such as LeaSE's explanation bank, whose
  loss is a sum so each example's step does not depend on the batch size).
* ``rows={name: index_fn}``: the problem's parameters are per-example banks (first
  dimension = example) and only the rows of the batch's examples are nonzero.
  Instead of all-reducing the whole bank, the processes all-gather the rows their
  batches touched with their indices (one tiny all-gather of the row counts, one
  of the rows) and add them into a dense direction (then divided by the number of
  processes for ``"mean"``). ``index_fn(batch)`` returns the batch's row indices.

Only the total direction is combined: hypergradients are reduced with it, once per
update, never per path or per engine pass. With second-order engines the result is the
average of per-process hypergradients (each computed on the process's own
batches), which equals the hypergradient of the global batch only for first-order
engines; see docs/distributed.md.

``DistributedRunner`` adds to ``Runner``: every process stops at the same step
after SIGINT/SIGTERM reaches any of them, metrics are averaged over processes
before the callbacks (which run on rank 0 only), BatchNorm-style buffers are
averaged before each checkpoint, and only rank 0 writes the checkpoint (every
process reads it on resume; they check that they loaded the same step).
"""
from __future__ import annotations

import datetime
import difflib
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

from .errors import ConfigError, MLOError
from .graph import Graph
from .problem import Problem
from .run import Runner
from .step import Stepper
from .tree import Tree

REDUCE_OPS = ("mean", "sum")


# --------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class Env:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """True when a launcher (``torchrun``) started this process as one of several."""
    return _env_int("WORLD_SIZE", 1) > 1


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 when not launched), before ``init``."""
    return _env_int("RANK", 0)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise MLOError(f"environment variable {name}={value!r} is not an integer") from None


def init(device: str | torch.device = "cpu", backend: str | None = None, timeout_s: float = 1800.0) -> Env:
    """Join the process group that ``torchrun`` describes in the environment.

    ``device``: ``"cpu"`` or ``"cuda"``; with CUDA each process takes the GPU of its
    ``LOCAL_RANK``. ``backend`` defaults to NCCL for CUDA and gloo for the CPU.
    A single process (no launcher, or ``--nproc_per_node=1`` on one node) joins
    nothing and gets ``world_size == 1``.
    """
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MLOError("CUDA was requested but no CUDA device is available")
        if dev.index is None:
            count = torch.cuda.device_count()
            if local >= count:
                raise MLOError(f"LOCAL_RANK={local} but this node has only {count} CUDA device(s): "
                               f"start at most {count} processes per node (--nproc_per_node)")
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world <= 1:
        return Env(0, 1, 0, dev, None)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(backend, **kwargs)
    return Env(dist.get_rank(), dist.get_world_size(), local, dev, backend)


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _current_rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _current_world(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


rank = _current_rank                  # this process's rank (0 without a process group)
world_size = _current_world           # number of processes (1 without a process group)


def is_main() -> bool:
    return _current_rank() == 0


def _control_device(group=None) -> torch.device:
    """Where small control tensors must live for the group's backend (NCCL: this process's GPU)."""
    if _current_world(group) > 1 and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: Iterable[float], group=None) -> list[float]:
    """Element-wise sum over processes of a few numbers (counts of an evaluation, ...)."""
    values = [float(v) for v in values]
    if _current_world(group) == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_control_device(group))
    dist.all_reduce(t, group=group)
    return t.tolist()


# --------------------------------------------------------------------------- data


class ShardedSampler(Sampler[int]):
    """This process's share of one seeded random permutation per epoch.

    Every process draws the same permutation from ``generator`` (seed it the same
    everywhere, e.g. pass the ``DataLoader``'s own generator) and keeps positions
    ``rank, rank + W, rank + 2W, ...`` of its first ``W·⌊n/W⌋`` entries, so the
    shards are disjoint, equally long, and a new epoch (a new ``iter``) draws a new
    permutation. With per-process batch ``b`` the W processes' k-th batches
    together hold exactly the examples of the k-th batch of size ``W·b`` that one
    process would draw with this sampler. Because the permutation comes from
    ``generator``, ``mlo``'s data positions replay it exactly on resume.
    """

    def __init__(self, num_examples: int, rank: int | None = None, world_size: int | None = None,
                 shuffle: bool = True, generator: torch.Generator | None = None, seed: int = 0):
        w = _current_world() if world_size is None else world_size
        r = _current_rank() if rank is None else rank
        if not isinstance(w, int) or w < 1:
            raise ConfigError(f"ShardedSampler.world_size: expected an integer >= 1, got {w!r}")
        if not isinstance(r, int) or not 0 <= r < w:
            raise ConfigError(f"ShardedSampler.rank: expected an integer in [0, {w}), got {r!r}")
        if num_examples < w:
            raise ConfigError(f"cannot split {num_examples} example(s) over {w} processes "
                              "(each process needs at least one)")
        self.num_examples, self.rank, self.world_size, self.shuffle = num_examples, r, w, shuffle
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(seed)
        self.generator = generator

    def __iter__(self) -> Iterator[int]:
        n, w = self.num_examples, self.world_size
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        yield from order[self.rank: n - n % w: w].tolist()

    def __len__(self) -> int:
        return self.num_examples // self.world_size


# --------------------------------------------------------------------------- reduction


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
        self.world = _current_world(group)
        self.rank = _current_rank(group)
        self.collectives: dict[str, int] = defaultdict(int)
        # NCCL moves CUDA tensors only, gloo CPU tensors: buffers and control values travel there
        self.device = _control_device(group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------- the reduce_fn
    def __call__(self, problem: Problem, tree: Tree) -> Tree:
        if self.world == 1:
            return tree
        op = self.reduce.get(problem.name, "mean")
        if problem.name in self.rows:
            return self._reduce_rows(problem, tree, op)
        self.collectives[problem.name] += 1
        return self._all_reduce(tree, op)

    def _all_reduce(self, tree: Tree, op: str) -> Tree:
        """One all-reduce per dtype of the whole flattened tree."""
        out: Tree = {}
        for keys in _by_dtype(tree).values():
            flat = torch.cat([tree[k].detach().reshape(-1) for k in keys]).to(self.device)
            dist.all_reduce(flat, group=self.group)
            if op == "mean":
                flat.div_(self.world)
            out.update(_unflatten(flat, {k: tree[k] for k in keys}))
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
        keep = _first_occurrence(idx)              # a row drawn twice is already summed in the dense gradient
        # 1) how many rows each process sends (shards may differ in size)
        count = torch.tensor([idx.numel()], dtype=torch.int64, device=self.device)
        counts = torch.empty(self.world, dtype=torch.int64, device=self.device)
        _all_gather(counts, count, group=self.group)
        cap = int(counts.max())
        # 2) one buffer of bytes: padded indices, then each parameter's padded rows
        pieces = [_pad(idx, cap).to(self.device)]
        for t in tree.values():
            rows = torch.where(keep.view(-1, *([1] * (t.dim() - 1))), t.detach()[idx], torch.zeros((), dtype=t.dtype,
                                                                                                 device=t.device))
            pieces.append(_pad(rows, cap).to(self.device))
        sizes = [p.numel() * p.element_size() for p in pieces]
        payload = torch.cat([p.contiguous().reshape(-1).view(torch.uint8) for p in pieces])
        gathered = torch.empty(self.world * payload.numel(), dtype=torch.uint8, device=self.device)
        _all_gather(gathered, payload, group=self.group)
        self.collectives[problem.name] += 2
        gathered = gathered.view(self.world, payload.numel())
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)

        def piece(i: int, like: Tensor, shape) -> Tensor:
            raw = gathered[:, offsets[i]:offsets[i + 1]].contiguous().reshape(-1)
            return raw.view(like.dtype).view(self.world * cap, *shape)

        all_idx = piece(0, idx, ()).to(idx.device)
        out: Tree = {}
        for j, (k, t) in enumerate(tree.items(), start=1):
            rows = piece(j, t, t.shape[1:]).to(t.device)
            dense = torch.zeros_like(t)
            dense.index_add_(0, all_idx, rows)     # padding rows are zeros at index 0: no effect
            if op == "mean":
                dense.div_(self.world)
            out[k] = dense
        return out

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
            for keys in _by_dtype_device(tensors).values():
                flat = torch.cat([tensors[k].detach().reshape(-1) for k in keys]).to(self.device)
                dist.broadcast(flat, src=src, group=self.group)
                for k, v in _unflatten(flat, {k: tensors[k] for k in keys}).items():
                    tensors[k].copy_(v)

    def sync_buffers(self) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over processes;
        other buffers (counters) take rank 0's values."""
        if self.world == 1:
            return
        _, buffers = self._params_and_buffers()
        tensors = {str(i): b for i, b in enumerate(buffers)}
        with torch.no_grad():
            for keys in _by_dtype_device(tensors).values():
                flat = torch.cat([tensors[k].detach().reshape(-1) for k in keys]).to(self.device)
                if flat.is_floating_point():
                    dist.all_reduce(flat, group=self.group)
                    flat.div_(self.world)
                else:
                    dist.broadcast(flat, src=0, group=self.group)
                for k, v in _unflatten(flat, {k: tensors[k] for k in keys}).items():
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
        _all_gather(out, t, group=self.group)
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
        _all_gather(everyone, local, group=self.group)
        everyone = everyone.view(self.world, len(names), 2)
        same = (everyone == everyone[:1]).all(dim=2).all(dim=0)
        for n, ok in zip(names, same.tolist()):
            if not ok:
                raise MLOError(f"the replicas of problem {n!r} differ between processes; "
                               "every process must apply the same combined update")


def _all_gather(out: Tensor, t: Tensor, group=None) -> None:
    """Every process's ``t`` concatenated into ``out`` (equal sizes)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor   # renamed in recent torch
    gather(out, t, group=group)


def _by_dtype(tree: Tree) -> dict:
    groups: dict = {}
    for k, v in tree.items():
        groups.setdefault(v.dtype, []).append(k)
    return groups


def _by_dtype_device(tree: Mapping[str, Tensor]) -> dict:
    groups: dict = {}
    for k, v in tree.items():
        groups.setdefault((v.dtype, v.device), []).append(k)
    return groups


def _unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, t in like.items():
        out[k] = flat[i:i + t.numel()].view(t.shape).to(t.device)
        i += t.numel()
    return out


def _pad(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    extra = torch.zeros((rows - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, extra])


def _first_occurrence(idx: Tensor) -> Tensor:
    """Boolean mask: True where ``idx[i]`` appears for the first time (no host sync)."""
    order = torch.argsort(idx, stable=True)
    s = idx[order]
    first = torch.ones_like(s, dtype=torch.bool)
    first[1:] = s[1:] != s[:-1]
    keep = torch.empty_like(first)
    keep[order] = first
    return keep


# --------------------------------------------------------------------------- runner


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
        self.interrupted = self.dp.any(self.interrupted)
        return self.interrupted

    def save(self, path: str | os.PathLike | None = None) -> None:
        self.dp.sync_buffers()
        if self.dp.is_main:
            super().save(path)
        elif path is None or os.fspath(path) == self.checkpoint:
            self._saved_at = self.step

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        steps = self.dp.gather_ints(self.step)
        if len(set(steps)) != 1:
            raise MLOError(f"the processes resumed from different checkpoints (steps {steps}); "
                           "put the checkpoint on a file system every node can read")
