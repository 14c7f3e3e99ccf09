"""Linear solvers for the implicit engines: ``solve(matvec, b, **options) -> (x, info)``.

``matvec(v)`` applies a symmetric operator ``A`` (the lower problem's Hessian,
plus damping) to a parameter tree; ``b`` is a tree of the same structure. Every
solver returns ``x ≈ A⁻¹ b`` and a ``SolveInfo``: the iterations it ran and its
relative residual ``‖b − A x‖ / ‖b‖`` as a 0-d tensor (read on the host only by
whoever looks at it: ``check_hypergradient`` reports it).

* ``cg`` — conjugate gradient; needs ``A`` positive definite.
* ``minres`` — MINRES (Paige–Saunders); ``A`` symmetric, possibly indefinite
  (the Hessian of a non-convex lower problem at a saddle point).
* ``neumann`` — the truncated series ``α Σ_{j=0..K} (I − αA)^j b``; converges
  when ``0 < α·λ_i(A) < 2``.
* ``dense`` — builds ``A`` column by column (one ``matvec`` per entry) and
  solves exactly; for small problems.

A solver of your own has the same signature; pass it to ``mlo.Implicit(solver=...)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .errors import ConfigError
from .tree import Tree, dot, norm

MatVec = Callable[[Tree], Tree]


@dataclass
class SolveInfo:
    """What a solve did: ``iterations`` run and the relative residual ``‖b − Ax‖/‖b‖`` (0-d tensor)."""

    iterations: int
    residual: Tensor


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    """``a / b``, and 0 where ``b == 0`` (no host synchronisation)."""
    nz = b != 0
    return torch.where(nz, a / torch.where(nz, b, torch.ones_like(b)), torch.zeros_like(a))


def _relative(r: Tensor, b: Tensor) -> Tensor:
    return _safe_div(r, b)


def cg(matvec: MatVec, b: Tree, *, iterations: int = 10,
       tol: float | None = None) -> tuple[Tree, SolveInfo]:
    """Conjugate gradient from ``x = 0``; ``tol`` stops once ``‖r‖ ≤ tol·‖b‖`` (a host read per iteration)."""
    x = {k: torch.zeros_like(t) for k, t in b.items()}
    r, p = dict(b), dict(b)
    rs = dot(r, r)
    bn = norm(b)
    stop = None if tol is None else tol * bn
    k = 0
    for k in range(1, iterations + 1):
        ap = matvec(p)
        step = _safe_div(rs, dot(p, ap))
        x = {n: x[n] + step * p[n] for n in x}
        r = {n: r[n] - step * ap[n] for n in r}
        rs_new = dot(r, r)
        if stop is not None and bool(torch.sqrt(rs_new) <= stop):
            rs = rs_new
            break
        beta = _safe_div(rs_new, rs)
        p = {n: r[n] + beta * p[n] for n in p}
        rs = rs_new
    return x, SolveInfo(k, _relative(torch.sqrt(rs), bn))


def neumann(matvec: MatVec, b: Tree, *, iterations: int = 10, alpha: float = 1.0) -> tuple[Tree, SolveInfo]:
    """``x = α Σ_{j=0..K} (I − αA)^j b`` (K products).

    The residual reported is ``‖(I − αA)^K b‖ / ‖b‖``: that of the series without
    its last term, which bounds the residual of ``x`` whenever the series converges
    (no extra product is spent on it).
    """
    v, total = dict(b), dict(b)
    for _ in range(iterations):
        av = matvec(v)
        v = {k: v[k] - alpha * av[k] for k in v}
        total = {k: total[k] + v[k] for k in total}
    return {k: alpha * t for k, t in total.items()}, SolveInfo(iterations, _relative(norm(v), norm(b)))


def minres(matvec: MatVec, b: Tree, *, iterations: int = 10, tol: float | None = None) -> tuple[Tree, SolveInfo]:
    """MINRES from ``x = 0``: minimises ``‖b − Ax‖`` over the Krylov space; ``A`` symmetric, maybe indefinite.

    The Lanczos recurrence with Givens rotations of Paige and Saunders (1975),
    without preconditioning; ``tol`` stops once the residual estimate is at most
    ``tol·‖b‖`` (a host read per iteration).
    """
    zero = {k: torch.zeros_like(t) for k, t in b.items()}
    x, w, w2 = dict(zero), dict(zero), dict(zero)
    beta1 = norm(b)
    r1, r2, y = dict(b), dict(b), dict(b)
    one = torch.ones_like(beta1)
    beta, oldb = beta1, torch.zeros_like(beta1)
    dbar, epsln, phibar = torch.zeros_like(beta1), torch.zeros_like(beta1), beta1
    cs, sn = -one, torch.zeros_like(beta1)
    tiny = torch.finfo(beta1.dtype).tiny
    k = 0
    for k in range(1, iterations + 1):
        v = {n: _safe_div(y[n], beta) for n in y}
        y = matvec(v)
        if k >= 2:
            y = {n: y[n] - _safe_div(beta, oldb) * r1[n] for n in y}
        alfa = dot(v, y)
        y = {n: y[n] - _safe_div(alfa, beta) * r2[n] for n in y}
        r1, r2 = r2, y
        oldb, beta = beta, norm(y)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.hypot(gbar, beta).clamp_min(tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = {n: (v[n] - oldeps * w1[n] - delta * w2[n]) / gamma for n in v}
        x = {n: x[n] + phi * w[n] for n in x}
        if tol is not None and bool(phibar <= tol * beta1):
            break
    return x, SolveInfo(k, _relative(phibar, beta1))


def dense(matvec: MatVec, b: Tree, *, max_size: int = 4096) -> tuple[Tree, SolveInfo]:
    """Build ``A`` with one ``matvec`` per entry of ``b`` and solve exactly (``torch.linalg.solve``).

    Raises ``ConfigError`` when ``b`` has more than ``max_size`` entries.
    """
    keys = list(b)
    sizes = [b[k].numel() for k in keys]
    n = sum(sizes)
    if n > max_size:
        raise ConfigError(f"dense solve: {n} unknowns, more than max_size={max_size}; a dense matrix is out of reach")
    ref = b[keys[0]]
    cols = []
    for i in range(n):
        e = torch.zeros(n, dtype=ref.dtype, device=ref.device)
        e[i] = 1
        av = matvec(unflatten(e, b))
        cols.append(torch.cat([av[k].reshape(-1) for k in keys]))
    a = torch.stack(cols, dim=1)
    rhs = flatten(b)
    x = torch.linalg.solve(a, rhs)
    return unflatten(x, b), SolveInfo(n, _relative(torch.linalg.vector_norm(a @ x - rhs),
                                                   torch.linalg.vector_norm(rhs)))


def flatten(tree: Tree) -> Tensor:
    """The tree's entries as one vector (its keys' order)."""
    return torch.cat([t.reshape(-1) for t in tree.values()])


def unflatten(flat: Tensor, like: Tree) -> Tree:
    """Inverse of ``flatten`` for a tree shaped like ``like``."""
    parts = torch.split(flat, [t.numel() for t in like.values()])
    return {k: p.reshape(t.shape) for (k, t), p in zip(like.items(), parts)}
