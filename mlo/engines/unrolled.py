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

    ``reuse_step_graph=True``: the ``Stepper`` keeps the graphs of the gradients of
    the problem's last K real steps (``create_graph``), and this edge's VJP goes back
    through them (double backward) — no second forward and backward of the
    objective. Through an ``init_from`` reset too: the update chain starts at the
    source's value, and each kept gradient is a function of the chain's point and
    the reads. The same number as without; the cost moves from time to memory (the
    steps' graphs live until the sweep that uses them). Not for reads that are
    row-sparse tables or row-sparse problems (those fall back to the recomputation).

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
        if self.reuse_step_graph and self.steps == 1 and kept is not None and start is None and site.direction is None \
                and not site.differentiable and all(r in kept.reads for r in wrt):
            return _through_step_graph(site.last, kept, u, wrt)
        records = site.records[-self.steps:]
        graphs = [r.step_graph for r in records] if self.reuse_step_graph and site.direction is None \
            and not site.differentiable and not site.rows else []
        if not all(g is not None and all(r in g.reads for r in wrt) for g in graphs):
            graphs = []   # some step's graph was not kept: recompute
        reads = site.bind(wrt)
        if start is not None:   # w_0 is the source's value itself: w_0 = θ
            w = {k: reads[start][k] if reads[start][k].shape == v.shape else reads[start][k].expand(v.shape)
                 for k, v in records[0].params.items()}   # a task-batched problem: every task starts at θ
        else:
            w = {k: v.detach() for k, v in records[0].params.items()}
        state = records[0].snapshot
        for i, rec in enumerate(records):
            state = updates.Snapshot(state.kind, rec.snapshot.hyper, state.state, state.clip)
            if not any(v.requires_grad for v in w.values()):
                w = {k: v.requires_grad_(True) for k, v in w.items()}
            g = _kept_gradient(graphs[i], w, reads, wrt) if graphs else site.gradient(w, reads, rec)
            w, state = updates.apply(state, w, g)
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


class _KeptGradient(torch.autograd.Function):
    """A real step's kept gradient as a function of (the point, the reads): the forward returns its
    value (the inputs equal the kept leaves), the backward is a double backward through its graph."""

    @staticmethod
    def forward(ctx, kept, *inputs):
        ctx.kept = kept
        return tuple(t.detach().clone() for t in kept[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_out):
        outputs, leaves = ctx.kept
        flat = torch.autograd.grad(outputs, leaves, grad_outputs=grad_out, retain_graph=True,
                                   allow_unused=True, materialize_grads=True)
        return (None,) + tuple(flat)


def _kept_gradient(kept: StepGraph, w: Tree, reads: dict[str, Tree], wrt: list[str]) -> Tree:
    """The kept gradient ``g(w, R)`` of one real step, differentiable w.r.t. ``w`` and the reads in ``wrt``."""
    keys = list(kept.grad)
    leaves = [kept.params[k] for k in keys] + [t for r in wrt for t in kept.reads[r].values()]
    inputs = [w[k] for k in keys] + [t for r in wrt for t in reads[r].values()]
    out = _KeptGradient.apply(([kept.grad[k] for k in keys], leaves), *inputs)
    return dict(zip(keys, out))
