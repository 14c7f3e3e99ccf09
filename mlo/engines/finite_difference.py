"""DARTS' central-difference approximation of the one-step mixed product."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import updates
from ..tree import Tree, grads, norm
from ..shared import SharedCalls
from .base import Engine, RunRecord, check_float


@dataclass(frozen=True)
class FiniteDifference(Engine):
    """One-step hypergradient with ``Mᵀv`` replaced by a central difference.

    With ``v = (∂U/∂g)ᵀ u`` (``-lr·u`` for plain SGD, as in DARTS),
    ``Mᵀv ≈ [∇_R loss(w + εv, R) − ∇_R loss(w − εv, R)] / 2ε`` at the pre-update
    point ``w`` with ``ε = eps / ‖v‖₂`` (DARTS Eq. 8 and the LeaSE paper's
    Eq. 11 use ``eps = 0.01``). Two gradients; exact up to rounding when the
    loss is quadratic in ``w``. ``v = 0`` gives zero.
    """

    eps: float = 0.01

    def __post_init__(self):
        check_float("FiniteDifference", "eps", self.eps, positive=True)

    needs_records = 1

    def validate_for(self, problem, where: str) -> None:
        updates.check_supported(problem.torch_optimizer, where)

    def reference(self) -> Engine:
        from .unrolled import Unrolled
        return Unrolled(steps=1)

    def limit(self, radius: float) -> Engine:
        return self if self.eps <= radius else dataclasses.replace(self, eps=radius)

    def vjp(self, site: RunRecord, u: Tree, wrt: list[str]) -> dict[str, Tree]:
        rec = site.records[-1]
        w = {k: v.detach() for k, v in rec.params.items()}
        v = _update_vjp(site, rec, w, u)
        scale = self.eps / torch.clamp(norm(v), min=torch.finfo(next(iter(v.values())).dtype).tiny)
        reads = site.bind(wrt)                      # the same leaves at both points
        names = [(r, k) for r in wrt for k in reads[r]]
        targets = [reads[r][k] for r, k in names]
        shared = SharedCalls(rec.batch, site.name)  # calls that do not see w run once
        keys = list(w)
        ws, step = [w[k] for k in keys], torch._foreach_mul([v[k] for k in keys], scale)
        diff: list | None = None
        cot: list = []
        for sgn, point in ((1.0, torch._foreach_add(ws, step)), (-1.0, torch._foreach_sub(ws, step))):
            loss = site.loss(dict(zip(keys, point)), reads, rec, shared=shared)
            cut = list(shared.leaves)
            gs = torch.autograd.grad(loss, targets + cut, allow_unused=True, materialize_grads=True) \
                if loss.requires_grad else [torch.zeros_like(t) for t in targets + cut]
            g, gc = list(gs[:len(targets)]), gs[len(targets):]
            cot.extend(torch.zeros_like(c) for c in gc[len(cot):])
            if sgn > 0:
                diff, cot = g, [c.clone() for c in gc]
            else:
                torch._foreach_sub_(diff, g)
                if cot:
                    torch._foreach_sub_(cot, list(gc))
        if shared.outputs:                          # the shared calls' part, backpropagated once
            through = torch.autograd.grad(shared.outputs, targets, grad_outputs=cot, allow_unused=True,
                                          materialize_grads=True)
            torch._foreach_add_(diff, list(through))
        torch._foreach_div_(diff, 2 * scale)
        result: dict[str, Tree] = {r: {} for r in wrt}
        for (r, k), t in zip(names, diff):
            result[r][k] = t
        return result


def _update_vjp(site: RunRecord, rec, w: Tree, u: Tree) -> Tree:
    """``(∂U/∂g)ᵀ u``: how the step turns a gradient change into a parameter change."""
    if rec.snapshot.linear_in_grad:
        g0 = w                      # not used: the Jacobian is a constant
    elif rec.grad is not None:      # the direction the real step used: no recomputation
        g0 = rec.grad
    else:
        wl = {k: t.detach().requires_grad_(True) for k, t in w.items()}
        g0 = grads(site.loss(wl, site.bind([]), rec), wl)
    return updates.grad_vjp(rec.snapshot, w, g0, u)
