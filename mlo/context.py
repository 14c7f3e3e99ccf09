"""``Context``: what an objective sees — parameter values bound for one evaluation.

The same objective is evaluated at the live parameters (a real step) and at
other points (look-aheads, finite-difference perturbations, Hessian products).
The context supplies the values; objectives never touch parameters directly.
"""
from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .errors import GraphError
from .rows import RowView
from .tree import Tree


#: set only while ``check_hypergradient`` evaluates the composition (``mlo.references.Holds``): it
#: substitutes the values of cut edges' reads and of ``forward(constants=...)`` stop-gradients
HOLD = None


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
        self._values = values if HOLD is None else HOLD.values(problem.name, values)
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
        subs, ids, leaves = {}, [], []
        for qual, (owner, key, leaf) in owners.items():
            leaves.append(leaf)
            vals = self._values.get(owner)
            if vals is None:
                self.undeclared_constants.add(owner)
                subs[qual] = leaf.detach()
                ids.append((id(leaf), leaf._version))
            else:
                if owner in constants:   # a stop-gradient: the checker holds it at its unperturbed value
                    subs[qual] = vals[key].detach() if HOLD is None else HOLD.constant(vals[key].detach())
                else:
                    subs[qual] = vals[key]
                ids.append((id(vals[key]), vals[key]._version, owner in constants))
        shared = self._shared
        if shared is not None and shared.eligible(args, kwargs, [o for o, _, _ in owners.values()]):
            flat, spec = tree_flatten((args, kwargs))
            # identity and version: the same tensors, not modified in place since
            key = (id(module), str(spec),
                   tuple((id(t), t._version) if isinstance(t, Tensor) else repr(t) for t in flat), tuple(ids))
            return shared.call(key, lambda: call_with(module, subs, leaves, args, kwargs))
        return call_with(module, subs, leaves, args, kwargs)

    def log(self, key: str, value: Tensor | float) -> None:
        """Record an extra metric (only kept for the evaluation of a real step)."""
        if self.real_step:
            self.metrics[key] = value.detach() if isinstance(value, Tensor) else value


_SLOTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _slots(module: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    slots = {}
    for qual, _ in module.named_parameters(remove_duplicate=False):
        prefix, _, attr = qual.rpartition(".")
        slots[qual] = (module.get_submodule(prefix) if prefix else module, attr)
    _SLOTS[module] = slots
    return slots


def call_with(module: nn.Module, values: dict[str, Tensor], leaves: list[Tensor], args: tuple, kwargs: dict):
    """``module(*args, **kwargs)`` with the parameters named in ``values`` replaced for this call.

    What ``torch.func.functional_call(module, values, args, kwargs, strict=False)``
    does for parameters, at a third of its per-call cost (it matters for small
    models, where a step is a few milliseconds): each name's owning submodule and
    attribute are resolved once per module, the values are put into the
    submodules' parameter slots, and the originals are put back afterwards, also
    when the call raises. ``leaves`` are the parameters expected in those slots:
    a module whose structure changed since (a submodule replaced, as between
    P-DARTS stages) is resolved again. Tied parameters are listed under each of
    their names (``named_parameters(remove_duplicate=False)``) and replaced under each.
    """
    slots = _SLOTS.get(module)
    if slots is None or any(q not in slots or slots[q][0]._parameters.get(slots[q][1]) is not leaf
                            for q, leaf in zip(values, leaves)):
        slots = _slots(module)
    saved = []
    try:
        for qual, value in values.items():
            holder, attr = slots[qual]
            saved.append((holder, attr, holder._parameters[attr]))
            holder._parameters[attr] = value
        return module(*args, **kwargs)
    finally:
        for holder, attr, original in reversed(saved):
            holder._parameters[attr] = original
