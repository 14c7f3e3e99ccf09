"""``Context``: what an objective sees — parameter values bound for one evaluation.

The same objective is evaluated at the live parameters (a real step) and at
other points (look-aheads, finite-difference perturbations, Hessian products).
The context supplies the values; objectives never touch parameters directly.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten

from .errors import GraphError
from .rows import RowView
from .tree import Tree


class Context:
    """Parameter values of one problem and the problems it reads.

    ``ctx[name]`` returns the values of ``name`` (the problem itself, one it
    declares in ``reads``, or one it declares in ``constants``: detached) in the
    structure its ``params`` had; a row-sparse problem's tables come as
    ``RowView``s of the batch's rows (``ctx[name][idx]``).
    ``ctx.forward(module, *args)`` runs ``module`` with every parameter that a
    problem in scope owns replaced by its bound value; parameters owned by
    problems *outside* the scope are used as constants (detached), so gradients
    only flow along declared dependencies. Such undeclared uses are collected in
    ``undeclared_constants`` (``check_hypergradient`` reports them).

    ``real_step`` is True for the evaluation of a real optimizer step (its loss,
    gradient and adjoint seeds) and False for an engine's auxiliary evaluations at
    other points (look-aheads, finite-difference points, Hessian products).
    """

    def __init__(self, graph, problem, values: dict[str, Tree], step: int = 0, real_step: bool = True,
                 shared=None, rows=None):
        self._graph = graph
        self._shared = shared            # a ``SharedCalls`` while an engine evaluates several points
        self.problem = problem
        self._values = values
        self._rows = rows                # {name: mlo.rows.Rows} of the row-sparse problems bound here
        self.step = step
        self.real_step = real_step
        self.metrics: dict[str, Tensor] = {}
        self.undeclared_constants: set[str] = set()

    def __getitem__(self, name: str):
        if name not in self._values:
            allowed = ", ".join(repr(n) for n in self._values)
            raise GraphError(f"problem {self.problem.name!r} read {name!r}, which is not in its "
                             f"reads (allowed: {allowed}); add it to Problem.reads (or Problem.constants)")
        vals = self._values[name]
        if self._rows and name in self._rows:   # a row-sparse table: the batch's rows, indexed by row number
            vals = {k: RowView(v, self._rows[name]) for k, v in vals.items()}
        return self._graph.problems[name].unpack(vals)

    def forward(self, module: nn.Module, *args: Any, constants: tuple[str, ...] = (), **kwargs: Any):
        """Call ``module`` functionally with the bound parameter values.

        ``constants`` names problems whose values are used without gradient in
        this one call (a stop-gradient for one term of an objective).
        """
        owners = self._graph.owner_index(module)
        subs, ids = {}, []
        for qual, (owner, key, leaf) in owners.items():
            vals = self._values.get(owner)
            if vals is None:
                self.undeclared_constants.add(owner)
                subs[qual] = leaf.detach()
                ids.append((id(leaf), leaf._version))
            else:
                subs[qual] = vals[key].detach() if owner in constants else vals[key]
                ids.append((id(vals[key]), vals[key]._version, owner in constants))
        shared = self._shared
        if shared is not None and shared.eligible(args, kwargs, [o for o, _, _ in owners.values()]):
            flat, spec = tree_flatten((args, kwargs))
            # identity and version: the same tensors, not modified in place since
            key = (id(module), str(spec),
                   tuple((id(t), t._version) if isinstance(t, Tensor) else repr(t) for t in flat), tuple(ids))
            return shared.call(key, lambda: functional_call(module, subs, args, kwargs, strict=False))
        return functional_call(module, subs, args, kwargs, strict=False)

    def log(self, key: str, value: Tensor | float) -> None:
        """Record an extra metric (only kept for the evaluation of a real step)."""
        if self.real_step:
            self.metrics[key] = value.detach() if isinstance(value, Tensor) else value
