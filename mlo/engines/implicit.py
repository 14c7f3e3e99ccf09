"""Implicit differentiation at the lower solution: one implicit VJP, any linear solver.

Every implicit engine treats ``w'`` as a stationary point of the (signed) lower
loss, so ``(∂w'/∂R)ᵀ u = −Mᵀ q`` with ``(H + ρI) q = u``, ``H = ∇²_ww loss`` and
``M = ∂_R ∇_w loss``, all at the post-update point ``w'`` on the last batch (one
fixed batch for every product of one solve). The engines differ only in the
solver of that system (``mlo.solvers``): ``Neumann``, ``CG``, ``MINRES``,
``DenseImplicit``, or ``Implicit(solver=...)`` with one of your own.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

from .. import solvers
from ..errors import ConfigError
from ..tree import Tree
from .base import Engine, RunRecord, check_float, check_int, grad_with_graph, hvp, mixed_vjp

_OBSERVERS: list[list] = []


@contextlib.contextmanager
def observe_solves():
    """Collect ``(problem name, engine, SolveInfo)`` for every implicit solve run inside the block."""
    seen: list = []
    _OBSERVERS.append(seen)
    try:
        yield seen
    finally:
        _OBSERVERS.remove(seen)


def implicit_vjp(site: RunRecord, u: Tree, wrt: list[str], solve: Callable, damping: float = 0.0,
                 engine: Engine | None = None) -> dict[str, Tree]:
    """``{R: −Mᵀ q}`` with ``q, info = solve(matvec, u)`` and ``matvec(v) = (H + ρI) v`` at ``w'``."""
    graph = grad_with_graph(site, site.solution, site.last, wrt)

    def matvec(v: Tree) -> Tree:
        hv = hvp(graph, v)
        return {k: hv[k] + damping * v[k] for k in v} if damping else hv

    q, info = solve(matvec, u)
    for seen in _OBSERVERS:
        seen.append((site.name, engine, info))
    out = mixed_vjp(site, q, wrt, graph)
    return {r: {k: -v for k, v in t.items()} for r, t in out.items()}


@dataclass(frozen=True)
class Implicit(Engine):
    """The implicit hypergradient with any solver ``solver(matvec, b) -> (x, SolveInfo)``.

    ``matvec`` applies ``H + damping·I``; see ``mlo.solvers`` for the signature and
    the shipped solvers (``functools.partial(mlo.solvers.minres, iterations=50)``).
    """

    solver: Callable = solvers.cg
    damping: float = 0.0

    def __post_init__(self):
        if not callable(self.solver):
            raise ConfigError(f"Implicit.solver: expected a function solve(matvec, b) -> (x, info), "
                              f"got {self.solver!r}")
        check_float("Implicit", "damping", self.damping)

    def vjp(self, site: RunRecord, u: Tree, wrt: list[str]) -> dict[str, Tree]:
        return implicit_vjp(site, u, wrt, self.solver, self.damping, self)

    def reference(self) -> Engine:
        return DenseImplicit(damping=self.damping)


@dataclass(frozen=True)
class Neumann(Engine):
    """``q = α Σ_{j=0..K} (I − αH)^j u`` (K Hessian-vector products; ``mlo.solvers.neumann``).

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
        solve = functools.partial(solvers.neumann, iterations=self.iterations, alpha=alpha)
        return implicit_vjp(site, u, wrt, solve, 0.0, self)

    def reference(self) -> Engine:
        return DenseImplicit()


@dataclass(frozen=True)
class _Krylov(Engine):
    """An iterative solve of ``(H + ρI) q = u`` by the solver function ``_solver`` (K iterations;
    ``tol`` stops early when the residual falls below ``tol·‖u‖``, reading it on the host)."""

    iterations: int = 10
    damping: float = 0.0
    tol: float | None = None
    _solver = None     # a class attribute, not a field: the solver function of mlo.solvers

    def __post_init__(self):
        owner = type(self).__name__
        check_int(owner, "iterations", self.iterations, 1)
        check_float(owner, "damping", self.damping)
        check_float(owner, "tol", self.tol, positive=True, optional=True)

    def vjp(self, site: RunRecord, u: Tree, wrt: list[str]) -> dict[str, Tree]:
        solve = functools.partial(type(self)._solver, iterations=self.iterations, tol=self.tol)
        return implicit_vjp(site, u, wrt, solve, self.damping, self)

    def reference(self) -> Engine:
        return DenseImplicit(damping=self.damping)


@dataclass(frozen=True)
class CG(_Krylov):
    """Solve ``(H + ρI) q = u`` with K conjugate-gradient iterations (``mlo.solvers.cg``).

    Needs about ½√κ·ln(2/ε) iterations on a positive definite ``H``. Use
    ``damping`` (ρ) on nonconvex lower problems, or ``MINRES``. ``tol`` stops early
    when the residual falls below ``tol·‖u‖`` (this reads the residual on the host).
    """

    _solver = staticmethod(solvers.cg)


@dataclass(frozen=True)
class MINRES(_Krylov):
    """Solve ``(H + ρI) q = u`` with K MINRES iterations (``mlo.solvers.minres``).

    For a symmetric ``H`` that may be indefinite — a non-convex lower problem whose
    solution is a saddle point — where CG's premise (positive definite) fails.
    ``tol`` stops early as for ``CG``.
    """

    _solver = staticmethod(solvers.minres)


@dataclass(frozen=True)
class DenseImplicit(Engine):
    """The implicit hypergradient itself: build ``H + ρI`` densely and solve exactly (``mlo.solvers.dense``).

    What the iterative engines converge to. Costs one Hessian-vector product per
    parameter of the lower problem and a dense solve, so it refuses problems with
    more than ``max_params`` parameters.
    """

    damping: float = 0.0
    max_params: int = 4096

    #: exact inside a nested hypergradient too (mlo.nested): the solve is differentiable, and on a problem
    #: whose update includes a hypergradient it solves with that whole direction's Jacobian
    exact_nested = True

    def __post_init__(self):
        check_float("DenseImplicit", "damping", self.damping)
        check_int("DenseImplicit", "max_params", self.max_params, 1)

    def vjp(self, site: RunRecord, u: Tree, wrt: list[str]) -> dict[str, Tree]:
        n = sum(t.numel() for t in u.values())
        if n > self.max_params:
            raise ConfigError(f"DenseImplicit: problem {site.name!r} has {n} parameters, more than "
                              f"max_params={self.max_params}; a dense Hessian is out of reach")
        solve = functools.partial(solvers.dense, max_size=self.max_params)
        return implicit_vjp(site, u, wrt, solve, self.damping, self)
