"""Implicit differentiation at the lower solution: Neumann series and conjugate gradient.

Both treat ``w'`` as a stationary point of the (signed) lower loss, so
``(∂w'/∂R)ᵀ u = −Mᵀ q`` with ``q ≈ H⁻¹ u``, ``H = ∇²_ww loss`` and
``M = ∂_R ∇_w loss``, all at the post-update point ``w'`` on the last batch
(one fixed batch for every product of one solve).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..tree import Tree, dot, norm
from .base import Engine, RunRecord, check_float, check_int, grad_with_graph, hvp, mixed_vjp


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

    def vjp(self, site: RunRecord, u: Tree, wrt: list[str]) -> dict[str, Tree]:
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

    def reference(self) -> Engine:
        return DenseImplicit()


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

    def vjp(self, site: RunRecord, u: Tree, wrt: list[str]) -> dict[str, Tree]:
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

    def reference(self) -> Engine:
        return DenseImplicit(damping=self.damping)


@dataclass(frozen=True)
class DenseImplicit(Engine):
    """The implicit hypergradient itself: build ``H + ρI`` densely and solve exactly.

    What ``Neumann`` and ``CG`` converge to; ``check_hypergradient`` uses it as
    their reference. Costs one Hessian-vector product per parameter of the lower
    problem and a dense solve, so it refuses problems with more than
    ``max_params`` parameters.
    """

    damping: float = 0.0
    max_params: int = 4096

    def __post_init__(self):
        check_float("DenseImplicit", "damping", self.damping)
        check_int("DenseImplicit", "max_params", self.max_params, 1)

    def vjp(self, site: RunRecord, u: Tree, wrt: list[str]) -> dict[str, Tree]:
        keys = list(u)
        sizes = [u[k].numel() for k in keys]
        n = sum(sizes)
        if n > self.max_params:
            raise ConfigError(f"DenseImplicit: problem {site.name!r} has {n} parameters, more than "
                              f"max_params={self.max_params}; a dense Hessian is out of reach")
        graph = grad_with_graph(site, site.solution, site.last, wrt)
        ref = u[keys[0]]
        cols = []
        for i in range(n):
            e = torch.zeros(n, dtype=ref.dtype, device=ref.device)
            e[i] = 1
            hv = hvp(graph, _unflat(e, u, keys, sizes))
            cols.append(torch.cat([hv[k].reshape(-1) for k in keys]))
        h = torch.stack(cols, dim=1) + self.damping * torch.eye(n, dtype=ref.dtype, device=ref.device)
        rhs = torch.cat([u[k].reshape(-1) for k in keys])
        q = torch.linalg.solve(h, rhs)
        return _neg(mixed_vjp(site, _unflat(q, u, keys, sizes), wrt, graph))


def _unflat(flat: torch.Tensor, like: Tree, keys: list[str], sizes: list[int]) -> Tree:
    return {k: part.reshape(like[k].shape) for k, part in zip(keys, torch.split(flat, sizes))}
