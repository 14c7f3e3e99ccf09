"""The one engine interface: a VJP through one problem's solution map.

A problem Q that reads problems R1, R2, ... produces a solution ``w'`` (its
parameters after its steps). Given an adjoint ``u = ∂(objective above)/∂w'``,
an engine returns ``(∂w'/∂R)ᵀ u`` for each requested read R. Engines see a
``RunRecord`` — everything recorded about Q's last run — and nothing else.
"""
from __future__ import annotations

import abc
import math

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .. import updates
from ..tree import Tree, grads


@dataclass
class StepRecord:
    """One optimizer step of a problem: the point, the batch, the optimizer snapshot."""

    params: Tree | None              # parameters before the step (detached copies), if kept
    batch: Any
    rng: Any                         # RNG state at the step (replayed so dropout masks match)
    snapshot: updates.Snapshot | None
    grad: Tree | None = None         # the update direction the step used (before clipping), if kept
    rows: dict = field(default_factory=dict)   # {row-sparse problem: the mlo.rows.Rows this batch named}
    #: this step's gradient with its graph, when the ``Stepper`` kept it for an edge
    #: ``Unrolled(steps=K, reuse_step_graph=True)`` (the last K steps of a run, reads that are not row-sparse)
    step_graph: "StepGraph | None" = None


@dataclass
class StepGraph:
    """A gradient whose autograd graph is kept for further products, and the leaves it was taken at.

    ``grad``: ``∇_w loss`` (or a whole update direction, ``RunRecord.gradient``) with its graph;
    ``reads``: ``{read: leaves}`` it depends on (mixed products ``Mᵀq``); ``params``: the
    parameter leaves (Hessian-vector products; for a real step's graph, the point's leaves);
    ``create_graph``: the products keep their own graph too (``mlo.nested``).
    """

    grad: Tree
    reads: dict[str, Tree]
    params: Tree | None = None
    create_graph: bool = False


@dataclass
class RunRecord:
    """One problem's last run, kept so that an engine can differentiate its solution map.

    ``loss(params, reads, record, shared=None)`` evaluates the problem's *signed*
    objective (``-objective`` for a max problem, so every engine treats a
    minimization) on the record's batch with the record's RNG state replayed;
    ``shared`` (a ``mlo.shared.SharedCalls``) lets several evaluations reuse the
    module calls that do not depend on the problem's own parameters. ``reads`` holds
    the values the problem read (detached); ``solution`` its parameters after
    its steps; ``records`` its last steps, oldest first (at least one; the last
    is the batch the implicit engines use). For a row-sparse problem (``rows``
    names it) ``solution``, the records' points and ``u`` hold the rows of its last
    step only; a row-sparse read holds the rows the kept steps named.
    """

    name: str
    loss: Callable[..., Tensor]
    reads: dict[str, Tree]
    solution: Tree
    lr: float                       # learning rate of the last step (first parameter group)
    records: list[StepRecord] = field(default_factory=list)
    rows: dict = field(default_factory=dict)   # {row-sparse problem: Rows its values here hold}
    # Problem.init_from: the read whose value this run started from, and whether ``records[0]`` is the
    # run's first step (taken from that value) rather than a later one
    init_from: str | None = None
    from_start: bool = False
    # set by ``mlo.nested`` for a problem whose update includes a hypergradient that an exact engine
    # differentiates: ``direction(w, reads, record)`` is that update direction, with its graph
    direction: Callable[..., Tree] | None = None
    # True inside such a direction: ``reads``/``solution`` carry the graph of the enclosing computation,
    # and an engine's result must keep its own (``create_graph``) so that it can be differentiated too
    differentiable: bool = False

    @property
    def last(self) -> StepRecord:
        return self.records[-1]

    def bind(self, wrt: list[str]) -> dict[str, Tree]:
        """Read values with fresh grad-requiring leaves for the reads in ``wrt``
        (in a ``differentiable`` record: the values themselves, leaves only where they carry no graph)."""
        out = {}
        for r, tree in self.reads.items():
            if self.differentiable:
                out[r] = {k: v if v.requires_grad or r not in wrt else v.detach().requires_grad_(True)
                          for k, v in tree.items()}
            else:
                out[r] = {k: v.detach().requires_grad_(r in wrt) for k, v in tree.items()}
        return out

    def gradient(self, w: Tree, reads: dict[str, Tree], record: StepRecord) -> Tree:
        """The update direction the problem's step used at ``w``, with its graph: the gradient
        of its signed loss, plus its hypergradient when ``direction`` is set."""
        if self.direction is not None:
            return self.direction(w, reads, record)
        return grads(self.loss(w, reads, record), w, create_graph=True)


class Engine(abc.ABC):
    """Base class. Subclasses are small frozen dataclasses: their fields are the config.

    ``passes_adjoint`` says whether an adjoint flows through an edge with this
    engine (``FirstOrder``: no, so the graph plans no sweep through it); an engine
    that wraps another should return the wrapped engine's value.
    """

    #: how many of the problem's last steps the engine needs (pre-step point, batch, optimizer snapshot)
    needs_records: int = 0
    #: whether this engine propagates an adjoint to the reads (False: the edge is cut)
    passes_adjoint: bool = True
    #: whether the VJP stays exact when the problem's update includes a hypergradient: it differentiates
    #: ``RunRecord.gradient`` (hypergradient included) and, in a ``differentiable`` record, keeps the
    #: graph of its result (``mlo.nested``). False: that term is dropped, and ``Graph`` names the paths
    exact_nested: bool = False

    @abc.abstractmethod
    def vjp(self, site: RunRecord, u: Tree, wrt: list[str]) -> dict[str, Tree]:
        """Return ``{R: (∂w'/∂R)ᵀ u}`` for every ``R`` in ``wrt``."""

    def validate_for(self, problem, where: str) -> None:
        """Raise ``ConfigError`` if this engine cannot run on ``problem``."""

    def reference(self) -> "Engine":
        """The exact engine this one approximates; ``check_hypergradient`` compares against it."""
        return self

    def limit(self, radius: float) -> "Engine":
        """This engine moved toward ``reference()`` (a finite-difference radius shrunk to ``radius``).

        ``check_hypergradient`` judges an approximate engine there. A wrapper returns
        a wrapper of the wrapped engine's ``limit``.
        """
        return self


def mixed_vjp(site: RunRecord, q: Tree, wrt: list[str], graph: StepGraph) -> dict[str, Tree]:
    """``Mᵀ q = ∂/∂R ⟨∇_w loss(w, R), q⟩`` from a ``StepGraph`` (double backward)."""
    gw, reads = graph.grad, graph.reads
    targets = {f"{r}\0{k}": v for r in wrt for k, v in reads[r].items()}
    keys = list(gw)
    flat = torch.autograd.grad([gw[k] for k in keys], list(targets.values()),
                               grad_outputs=[q[k] for k in keys], allow_unused=True,
                               materialize_grads=True, retain_graph=True, create_graph=graph.create_graph)
    out: dict[str, Tree] = {r: {} for r in wrt}
    for name, g in zip(targets, flat):
        r, k = name.split("\0", 1)
        out[r][k] = g
    return out


def grad_with_graph(site: RunRecord, point: Tree, record: StepRecord, wrt: list[str]) -> StepGraph:
    """``∇_w loss`` at ``point`` with a graph kept for further differentiation (``site.gradient``:
    the whole update direction when it includes a hypergradient; in a ``differentiable`` record,
    ``point`` and the reads keep their graph and so do the products taken from this one)."""
    keep = site.differentiable
    w = {k: v if keep and v.requires_grad else v.detach().requires_grad_(True) for k, v in point.items()}
    reads = site.bind(wrt)
    return StepGraph(site.gradient(w, reads, record), reads, w, keep)


def hvp(graph: StepGraph, v: Tree) -> Tree:
    """Hessian-vector product ``H v`` reusing one gradient graph (``Jᵀv`` for the Jacobian ``J`` of a
    whole update direction, which need not be symmetric)."""
    gw, w = graph.grad, graph.params
    keys = list(gw)
    hv = torch.autograd.grad([gw[k] for k in keys], [w[k] for k in keys], grad_outputs=[v[k] for k in keys],
                             retain_graph=True, allow_unused=True, materialize_grads=True,
                             create_graph=graph.create_graph)
    return dict(zip(keys, hv))


def check_int(owner: str, field_name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        from ..errors import ConfigError
        raise ConfigError(f"{owner}.{field_name}: expected an integer >= {minimum}, got {value!r}")


def check_float(owner: str, field_name: str, value, *, positive: bool = False, optional: bool = False) -> None:
    from ..errors import ConfigError
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and positive:
        ok = value > 0
    elif ok:
        ok = value >= 0
    if not ok:
        need = "a finite number > 0" if positive else "a finite number >= 0"
        raise ConfigError(f"{owner}.{field_name}: expected {need}{' or None' if optional else ''}, got {value!r}")
