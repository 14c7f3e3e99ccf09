"""``Problem``: one level of a multi-level optimization program.

A problem owns parameters, an objective, an optimizer and a data source. It does
not know which engine differentiates it or who reads it: that is the graph's job.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .tasks import task_objective
from .streams import Accumulated, AccumulatingStream, DataStream, SameBatch, mean_objective  # noqa: F401
from .tree import Tree

Objective = Callable[["Context", Any], Tensor]  # noqa: F821 (Context lives in context.py)


@dataclass(eq=False)
class Problem:
    """One optimization problem: ``min`` (or ``max``) of ``objective`` over ``params``.

    Fields:
        name: unique name; other problems refer to it in ``reads``.
        params: an ``nn.Module`` (all its parameters), a ``dict`` of named tensors,
            a list of tensors, or a single tensor. Inside the objective
            ``ctx[name]`` returns them in the same structure (a module becomes a
            dict of its named parameters; use ``ctx.forward(module, x)``).
        objective: ``objective(ctx, batch) -> scalar tensor``. Read parameters
            only through ``ctx`` (``ctx[name]`` / ``ctx.forward``), so engines can
            evaluate it at other points.
        optimizer: a ``torch.optim.Optimizer`` over exactly these parameters, or
            a factory ``params -> Optimizer``. The optimizer in use is
            ``problem.torch_optimizer`` (this field keeps what was passed).
        data: any iterable (e.g. a ``DataLoader``); cycled forever. ``None`` means
            the objective is called with ``batch=None``. ``SameBatch("other")``
            reuses the batch problem ``other`` drew last (it must run earlier).
        reads: names of the problems whose parameters the objective reads (and
            differentiates through).
        constants: names of problems whose parameters the objective uses as
            constants: ``ctx[name]`` returns them detached, and ``ctx.forward``
            uses them without gradient (as it does for any problem outside
            ``reads``). Declaring them lets ``check_hypergradient`` hold them
            fixed, as every engine does; an undeclared constant use makes the
            checker's central difference move them.
        steps: optimizer steps this problem takes each time it runs.
        mode: ``"min"`` or ``"max"``.
        scheduler: optional factory ``optimizer -> LR scheduler``, stepped after
            every optimizer step; the scheduler in use is ``problem.torch_scheduler``.
        engine: how this problem's solution is differentiated with respect to
            what it reads (default: ``Unrolled(steps=1)``); ``edge_engines`` maps a
            read name to an engine for that one edge.
        grad_clip: clip the update direction to this global L2 norm (the clip is
            part of the update rule the unrolled engines differentiate).
        modules: extra modules whose buffers (BatchNorm statistics) must be
            protected during auxiliary passes; the ``params`` module is included.
        rows: ``rows(batch) -> integer tensor`` declares ``params`` a table of
            rows (first dimension) of which each batch reads only those named:
            ``ctx[name]`` is then a ``mlo.rows.RowView`` to index with the
            batch's row numbers, and everything per step is batch-sized
            (``mlo/rows.py``, docs/mlo.md "Row-sparse parameters").
        init_from: name of a problem whose value this one restarts from at the
            start of every outer step, just before it runs (φ ← θ, as MAML and
            iMAML do): its parameters are copied from the source's current
            values and its optimizer state (momentum, Adam moments) is cleared.
            The source is added to ``reads`` (the hypergradient reaches it
            through this edge); the graph checks it has the same parameter names
            and shapes. How the start value's dependence on the source is
            differentiated is the edge engine's choice (docs/mlo.md "Meta-learning").
        after_step: ``fn(params)`` called under ``torch.no_grad()`` after every
            optimizer step, with the parameters in the structure ``ctx[name]``
            returns (a tensor, a list, or a dict of named tensors); modify them
            in place to project or clamp (e.g. ``lambda lr: lr.clamp_(min=1e-4)``).
            Engines do not differentiate it (they see the update without it).
        accumulate: number of batches each step draws; the step's objective is
            the mean of the objective over them, so the update direction is the
            mean of the k gradients. The step's record holds the k batches
            (an ``Accumulated`` tuple) and every engine re-evaluates that mean.
        tasks: declares a task-batched problem: ``tasks`` independent copies of
            one problem, every parameter stacked on a leading dimension of size
            ``tasks``, every tensor of a batch too. ``objective(ctx, batch)`` is
            written for one task: ``ctx[name]`` is that task's slice and ``batch``
            its batch; it runs for all tasks at once under ``torch.func.vmap``
            (``vectorize=False``: a loop over the tasks, for objectives vmap
            cannot run, e.g. BatchNorm in training mode). The problem's loss is
            the sum over tasks, so each task's gradient and step are its own.
            ``init_from`` may name a problem with the unstacked shapes (every
            task restarts from it). Not with ``grad_clip`` (a global norm would
            couple the tasks), ``rows`` or ``ctx.log`` (dropped).
    """

    name: str
    params: nn.Module | Mapping[str, Tensor] | Sequence[Tensor] | Tensor
    objective: Objective
    optimizer: torch.optim.Optimizer | Callable[[list[Tensor]], torch.optim.Optimizer]
    data: Iterable | None = None
    reads: Sequence[str] = ()
    steps: int = 1
    mode: Literal["min", "max"] = "min"
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    engine: Any = None
    edge_engines: Mapping[str, Any] = field(default_factory=dict)
    grad_clip: float | None = None
    modules: Sequence[nn.Module] = ()
    constants: Sequence[str] = ()
    rows: Callable[[Any], Tensor] | None = None
    init_from: str | None = None
    after_step: Callable[[Any], Any] | None = None
    accumulate: int = 1
    tasks: int | None = None
    vectorize: bool = True

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"Problem.name: expected a non-empty string, got {self.name!r}")
        where = f"problem {self.name!r}"
        if self.mode not in ("min", "max"):
            raise ConfigError(f"{where}: mode: expected 'min' or 'max', got {self.mode!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ConfigError(f"{where}: steps: expected an integer >= 1, got {self.steps!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"{where}: grad_clip: expected a positive number or None, got {self.grad_clip!r}")
        if not callable(self.objective):
            raise ConfigError(f"{where}: objective: expected a callable objective(ctx, batch)")
        if isinstance(self.reads, str):
            self.reads = [self.reads]
        self.reads = list(self.reads)
        if isinstance(self.constants, str):
            self.constants = [self.constants]
        self.constants = list(self.constants)
        self._check_lifecycle(where)
        if self.init_from is not None and self.init_from not in self.reads:
            self.reads.append(self.init_from)
        both = sorted(set(self.reads) & set(self.constants))
        if both:
            raise ConfigError(f"{where}: {', '.join(map(repr, both))} in both reads and constants; a problem "
                              "is either differentiated through (reads) or held fixed (constants)")
        self.params_tree, self.structure = _normalize_params(self.params, where)
        mods = list(self.modules)
        if isinstance(self.params, nn.Module):
            mods.insert(0, self.params)
        self.modules = mods
        self.torch_optimizer = self._build_optimizer(where)
        self.torch_scheduler = self.scheduler(self.torch_optimizer) if self.scheduler is not None else None
        self.sign = 1.0 if self.mode == "min" else -1.0
        self.stream = DataStream(self.data) if self.accumulate == 1 else AccumulatingStream(self.data, self.accumulate)
        if self.tasks is not None:
            self._check_tasks(where)
            self.objective = task_objective(self.objective, self.name, self.tasks, self.vectorize)
        if self.accumulate > 1:
            self.objective = mean_objective(self.objective)
        if self.rows is not None:
            from . import rows
            rows.validate(self, where)

    # ------------------------------------------------------------------ helpers
    def _check_lifecycle(self, where: str) -> None:
        if self.init_from is not None:
            if not isinstance(self.init_from, str) or not self.init_from:
                raise ConfigError(f"{where}: init_from: expected a problem name, got {self.init_from!r}")
            if self.init_from == self.name:
                raise ConfigError(f"{where}: init_from names the problem itself; name the problem whose value "
                                  "it restarts from")
            if self.init_from in self.constants:
                raise ConfigError(f"{where}: init_from={self.init_from!r} is also in constants; the start value "
                                  "is read (and differentiated as its engine decides), not held fixed")
            if self.rows is not None:
                raise ConfigError(f"{where}: init_from is not supported on a row-sparse problem (rows=...)")
        if self.after_step is not None and not callable(self.after_step):
            raise ConfigError(f"{where}: after_step: expected a callable fn(params), got "
                              f"{type(self.after_step).__name__}")
        k = self.accumulate
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"{where}: accumulate: expected an integer >= 1, got {k!r}")
        if k > 1:
            if self.data is None or isinstance(self.data, SameBatch):
                kind = "no data" if self.data is None else f"SameBatch({self.data.source!r})"
                raise ConfigError(f"{where}: accumulate={k} needs a data source of its own to draw {k} batches "
                                  f"from, got {kind}")
            if self.rows is not None:
                raise ConfigError(f"{where}: accumulate is not supported on a row-sparse problem (rows=...)")

    def _check_tasks(self, where: str) -> None:
        n = self.tasks
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"{where}: tasks: expected an integer >= 1 or None, got {n!r}")
        for k, p in self.params_tree.items():
            if p.dim() == 0 or p.shape[0] != n:
                raise ConfigError(f"{where}: tasks={n}: params[{k!r}] has shape {tuple(p.shape)}; every parameter "
                                  f"needs a leading dimension of {n} (one slice per task)")
        for field_name, bad in (("grad_clip", self.grad_clip is not None), ("rows", self.rows is not None)):
            if bad:
                raise ConfigError(f"{where}: tasks: not supported together with {field_name}")

    def reset_from(self, source: "Problem") -> None:
        """``init_from``: copy ``source``'s values into this problem's parameters, clear the optimizer state."""
        with torch.no_grad():
            for k, p in self.params_tree.items():
                p.copy_(source.params_tree[k])      # broadcasts over a task-batched problem's tasks
        self.torch_optimizer.state.clear()

    def run_after_step(self) -> None:
        """Call ``after_step`` on the parameters (no gradient tracking)."""
        if self.after_step is not None:
            with torch.no_grad():
                self.after_step(self.unpack(self.params_tree))

    def _build_optimizer(self, where: str) -> torch.optim.Optimizer:
        leaves = list(self.params_tree.values())
        opt = self.optimizer
        if isinstance(opt, torch.optim.Optimizer):
            owned = {id(p) for g in opt.param_groups for p in g["params"]}
            if owned != {id(p) for p in leaves}:
                raise ConfigError(f"{where}: optimizer: it must hold exactly this problem's parameters")
            return opt
        if callable(opt):
            opt = opt(leaves)
            if not isinstance(opt, torch.optim.Optimizer):
                raise ConfigError(f"{where}: optimizer: the factory returned {type(opt).__name__}, not an Optimizer")
            return opt
        raise ConfigError(f"{where}: optimizer: expected an Optimizer or a factory params -> Optimizer")

    def unpack(self, tree: Tree):
        """Tree -> the structure the user declared (what ``ctx[name]`` returns)."""
        kind = self.structure
        if kind == "tensor":
            return tree[""]
        if kind == "list":
            return [tree[str(i)] for i in range(len(tree))]
        return tree

    def __repr__(self) -> str:
        return f"Problem({self.name!r}, mode={self.mode!r}, reads={self.reads}, steps={self.steps})"


def _normalize_params(params, where: str) -> tuple[Tree, str]:
    if isinstance(params, nn.Module):
        tree, kind = dict(params.named_parameters()), "dict"
    elif isinstance(params, Tensor):
        tree, kind = {"": params}, "tensor"
    elif isinstance(params, Mapping):
        tree, kind = dict(params), "dict"
    elif isinstance(params, (list, tuple)):
        tree, kind = {str(i): p for i, p in enumerate(params)}, "list"
    else:
        raise ConfigError(f"{where}: params: expected an nn.Module, dict, list or tensor, "
                          f"got {type(params).__name__}")
    if not tree:
        raise ConfigError(f"{where}: params: no parameters")
    for k, p in tree.items():
        if not isinstance(p, Tensor):
            raise ConfigError(f"{where}: params[{k!r}]: expected a tensor, got {type(p).__name__}")
        if not p.is_leaf:
            raise ConfigError(f"{where}: params[{k!r}]: must be a leaf tensor (create it with "
                              "torch.zeros(...).requires_grad_() or nn.Parameter)")
        if not p.is_floating_point():
            raise ConfigError(f"{where}: params[{k!r}]: must be floating point, got {p.dtype}")
        p.requires_grad_(True)
    return tree, kind
