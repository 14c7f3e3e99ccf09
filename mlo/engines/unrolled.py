"""Exact reverse-mode differentiation through the last K optimizer steps."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import updates
from ..errors import ConfigError, GraphError
from ..tree import Tree
from .base import Engine, RunRecord, StepGraph, check_int


@dataclass(frozen=True)
class Unrolled(Engine):
    """Differentiate ``w_K = U(...U(w_0, g(w_0, R))..., g(w_{K-1}, R))`` exactly.

    ``steps=1`` is the one-step (DARTS-2nd, exact) hypergradient: the mixed
    second derivative is taken at the pre-update point ``w_0``, through the
    optimizer's real update rule (momentum, weight decay, Adam's scaling,
    gradient clipping). ``steps=K`` reverses through the problem's last K steps
    (it must take at least K steps per run); memory grows as O(K).

    ``reuse_step_graph=True`` (one step only): the ``Stepper`` keeps the graph of
    the problem's real step's gradient (``create_graph``), and this edge's VJP is a double
    backward through it — no second forward and backward of the objective. The
    same number as without; the cost moves from time to memory (the step's graph
    lives until the sweep that uses it). Not for reads that are row-sparse tables
    (those fall back to the recomputation).

    When the problem's update includes a hypergradient that a later problem's
    hypergradient passes through, each step's direction is that whole update
    (``RunRecord.gradient``, recomputed by ``mlo.nested``), so the third-order
    terms are exact too; the kept step graph is then not used.
    """

    steps: int = 1
    reuse_step_graph: bool = False

    #: ``Problem.init_from``: the start value is bound to the source's value, so the reverse pass goes
    #: through it too, when the K steps reach back to the reset (K = the problem's steps); else truncated
    init_path = "exact"
    #: a problem's update that includes a hypergradient is differentiated whole (``mlo.nested``)
    exact_nested = True

    def __post_init__(self):
        check_int("Unrolled", "steps", self.steps, 1)
        if not isinstance(self.reuse_step_graph, bool):
            raise ConfigError(f"Unrolled.reuse_step_graph: expected true or false, got {self.reuse_step_graph!r}")
        if self.reuse_step_graph and self.steps != 1:
            raise ConfigError(f"Unrolled.reuse_step_graph: needs steps=1 (the real step's graph is one step), "
                              f"got steps={self.steps}")

    def reference(self) -> Engine:
        return Unrolled(steps=self.steps)

    @property
    def needs_records(self) -> int:  # type: ignore[override]
        return self.steps

    def validate_for(self, problem, where: str) -> None:
        if problem.steps < self.steps:
            raise GraphError(f"{where}: Unrolled(steps={self.steps}) cannot be scheduled: the problem "
                             f"takes only {problem.steps} step(s) per run (set Problem.steps >= {self.steps})")
        updates.check_supported(problem.torch_optimizer, where)

    def vjp(self, site: RunRecord, u: Tree, wrt: list[str]) -> dict[str, Tree]:
        start = site.init_from if (site.init_from in wrt and site.from_start
                                   and len(site.records) == self.steps) else None
        kept = site.last.step_graph
        if self.reuse_step_graph and kept is not None and start is None and site.direction is None \
                and not site.differentiable and all(r in kept.reads for r in wrt):
            return _through_step_graph(site.last, kept, u, wrt)
        records = site.records[-self.steps:]
        reads = site.bind(wrt)
        if start is not None:   # w_0 is the source's value itself: w_0 = θ
            w = {k: reads[start][k] if reads[start][k].shape == v.shape else reads[start][k].expand(v.shape)
                 for k, v in records[0].params.items()}   # a task-batched problem: every task starts at θ
        else:
            w = {k: v.detach() for k, v in records[0].params.items()}
        state = records[0].snapshot
        for rec in records:
            state = updates.Snapshot(state.kind, rec.snapshot.hyper, state.state, state.clip)
            if not any(v.requires_grad for v in w.values()):
                w = {k: v.requires_grad_(True) for k, v in w.items()}
            w, state = updates.apply(state, w, site.gradient(w, reads, rec))
        targets = [v for r in wrt for v in reads[r].values()]
        keys = list(w)
        flat = torch.autograd.grad([w[k] for k in keys], targets, grad_outputs=[u[k] for k in keys],
                                   allow_unused=True, materialize_grads=True, create_graph=site.differentiable)
        out, i = {}, 0
        for r in wrt:
            out[r] = {}
            for k in reads[r]:
                out[r][k] = flat[i]
                i += 1
        return out


def _through_step_graph(rec, kept: StepGraph, u: Tree, wrt: list[str]) -> dict[str, Tree]:
    """``(∂g/∂R)ᵀ (∂U/∂g)ᵀ u`` by a double backward through the real step's gradient graph."""
    g, reads = kept.grad, kept.reads
    w = {k: t.detach() for k, t in rec.params.items()}
    v = updates.grad_vjp(rec.snapshot, w, {k: t.detach() for k, t in g.items()}, u)
    keys = list(g)
    targets = [(r, k, t) for r in wrt for k, t in reads[r].items()]
    flat = torch.autograd.grad([g[k] for k in keys], [t for _, _, t in targets], grad_outputs=[v[k] for k in keys],
                               retain_graph=True, allow_unused=True, materialize_grads=True)
    out: dict[str, Tree] = {r: {} for r in wrt}
    for (r, k, _), t in zip(targets, flat):
        out[r][k] = t
    return out
