"""DARTS' central-difference approximation of the one-step mixed product."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import updates
from ..tree import Tree, grads, norm
from .base import Engine, Site, check_float


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
        updates.check_supported(problem.optimizer, where)

    def vjp(self, site: Site, u: Tree, wrt: list[str]) -> dict[str, Tree]:
        rec = site.records[-1]
        w = {k: v.detach() for k, v in rec.params.items()}
        v = _update_vjp(site, rec, w, u)
        scale = self.eps / torch.clamp(norm(v), min=torch.finfo(next(iter(v.values())).dtype).tiny)
        out = {}
        for sgn in (1.0, -1.0):
            reads = site.bind(wrt)
            point = {k: w[k] + (sgn * scale) * v[k] for k in w}
            leaves = {f"{r}\0{k}": t for r in wrt for k, t in reads[r].items()}
            g = grads(site.loss(point, reads, rec), leaves)
            for name, t in g.items():
                out[name] = t if sgn > 0 else (out[name] - t) / (2 * scale)
        result: dict[str, Tree] = {r: {} for r in wrt}
        for name, t in out.items():
            r, k = name.split("\0", 1)
            result[r][k] = t
        return result


def _update_vjp(site: Site, rec, w: Tree, u: Tree) -> Tree:
    """``(∂U/∂g)ᵀ u``: how the step turns a gradient change into a parameter change."""
    if rec.snapshot.linear_in_grad:
        g0 = {k: torch.zeros_like(t) for k, t in w.items()}
    elif rec.grad is not None:      # the direction the real step used: no recomputation
        g0 = rec.grad
    else:
        wl = {k: t.detach().requires_grad_(True) for k, t in w.items()}
        g0 = grads(site.loss(wl, site.bind([]), rec), wl)
    g0 = {k: t.detach().requires_grad_(True) for k, t in g0.items()}
    w1, _ = updates.apply(rec.snapshot, w, g0)
    keys = list(w1)
    vs = torch.autograd.grad([w1[k] for k in keys], [g0[k] for k in keys], grad_outputs=[u[k] for k in keys],
                             allow_unused=True, materialize_grads=True)
    return dict(zip(keys, vs))
