"""Implicit differentiation at the lower solution: Neumann series and conjugate gradient.

Both treat ``w'`` as a stationary point of the (signed) lower loss, so
``(∂w'/∂R)ᵀ u = −Mᵀ q`` with ``q ≈ H⁻¹ u``, ``H = ∇²_ww loss`` and
``M = ∂_R ∇_w loss``, all at the post-update point ``w'`` on the last batch
(one fixed batch for every product of one solve).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tree import Tree, dot, norm
from .base import Engine, Site, check_float, check_int, grad_with_graph, hvp, mixed_vjp


def _neg(trees: dict[str, Tree]) -> dict[str, Tree]:
    return {r: {k: -v for k, v in t.items()} for r, t in trees.items()}


@dataclass(frozen=True)
class Neumann(Engine):
    """``q = α Σ_{j=0..K} (I − αH)^j u`` (K Hessian-vector products).

    Converges when ``0 < α·λ_i(H) < 2``; error shrinks like ``(1 − α·λ_min)^K``.
    ``alpha=None`` uses the problem's learning rate, which makes Neumann with
    K−1 terms equal K unrolled gradient steps started at the optimum.
    """

    iterations: int = 10
    alpha: float | None = None

    def __post_init__(self):
        check_int("Neumann", "iterations", self.iterations, 0)
        check_float("Neumann", "alpha", self.alpha, positive=True, optional=True)

    def vjp(self, site: Site, u: Tree, wrt: list[str]) -> dict[str, Tree]:
        alpha = site.lr if self.alpha is None else self.alpha
        graph = grad_with_graph(site, site.solution, site.last, wrt)
        v = dict(u)
        total = dict(u)
        for _ in range(self.iterations):
            hv = hvp(graph, v)
            v = {k: v[k] - alpha * hv[k] for k in v}
            total = {k: total[k] + v[k] for k in total}
        q = {k: alpha * t for k, t in total.items()}
        return _neg(mixed_vjp(site, q, wrt, graph))


@dataclass(frozen=True)
class CG(Engine):
    """Solve ``(H + ρI) q = u`` with K conjugate-gradient iterations.

    Needs about ½√κ·ln(2/ε) iterations on a positive definite ``H``. Use
    ``damping`` (ρ) on nonconvex lower problems. ``tol`` stops early when the
    residual falls below ``tol·‖u‖`` (this reads the residual on the host).
    """

    iterations: int = 10
    damping: float = 0.0
    tol: float | None = None

    def __post_init__(self):
        check_int("CG", "iterations", self.iterations, 1)
        check_float("CG", "damping", self.damping)
        check_float("CG", "tol", self.tol, positive=True, optional=True)

    def vjp(self, site: Site, u: Tree, wrt: list[str]) -> dict[str, Tree]:
        graph = grad_with_graph(site, site.solution, site.last, wrt)

        def apply_a(v: Tree) -> Tree:
            hv = hvp(graph, v)
            return {k: hv[k] + self.damping * v[k] for k in v} if self.damping else hv

        x = {k: torch.zeros_like(t) for k, t in u.items()}
        r = dict(u)
        p = dict(u)
        rs = dot(r, r)
        stop = None if self.tol is None else self.tol * norm(u)
        for _ in range(self.iterations):
            ap = apply_a(p)
            pap = dot(p, ap)
            step = torch.where(pap != 0, rs / torch.where(pap != 0, pap, torch.ones_like(pap)), torch.zeros_like(pap))
            x = {k: x[k] + step * p[k] for k in x}
            r = {k: r[k] - step * ap[k] for k in r}
            rs_new = dot(r, r)
            if stop is not None and bool(torch.sqrt(rs_new) <= stop):
                break
            beta = torch.where(rs != 0, rs_new / torch.where(rs != 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
            p = {k: r[k] + beta * p[k] for k in p}
            rs = rs_new
        return _neg(mixed_vjp(site, x, wrt, graph))
