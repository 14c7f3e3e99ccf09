"""The implicit engines' solvers (``mlo.solvers``) against closed forms, an indefinite system where
CG's premise fails and MINRES works, a solver of the user's own, and the engines built on them."""
import functools

import pytest
import torch

import mlo
from mlo import solvers


def _system(eigs, seed=0):
    """A symmetric matrix with the given eigenvalues, as a two-entry tree operator, and a right-hand side."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=g, dtype=torch.float64)
    like = {"x": torch.zeros(2, dtype=torch.float64), "y": torch.zeros(n - 2, dtype=torch.float64)}
    matvec = lambda v: solvers.unflatten(a @ solvers.flatten(v), like)  # noqa: E731
    return a, b, solvers.unflatten(b, like), matvec


def _rel(x, want):
    return float((solvers.flatten(x) - want).norm() / want.norm())


@pytest.mark.parametrize("solve, tol", [
    (functools.partial(solvers.cg, iterations=5), 1e-12),
    (functools.partial(solvers.minres, iterations=5), 1e-12),
    (functools.partial(solvers.dense), 1e-13),
    (functools.partial(solvers.neumann, iterations=400, alpha=0.25), 1e-12),
])
def test_every_solver_solves_a_positive_definite_system(solve, tol):
    a, b, bt, matvec = _system([0.5, 1.0, 2.0, 3.0, 3.5])
    x, info = solve(matvec, bt)
    assert _rel(x, torch.linalg.solve(a, b)) < tol
    assert float(info.residual) < 10 * tol and info.iterations >= 1


def test_neumann_is_the_truncated_series_and_reports_its_last_terms_size():
    a, b, bt, matvec = _system([0.5, 1.0, 2.0])
    alpha, k = 0.3, 7
    m = torch.eye(3, dtype=torch.float64) - alpha * a
    want = alpha * sum(torch.linalg.matrix_power(m, j) for j in range(k + 1)) @ b
    x, info = solvers.neumann(matvec, bt, iterations=k, alpha=alpha)
    assert _rel(x, want) < 1e-14
    assert float(info.residual) == pytest.approx(float((torch.linalg.matrix_power(m, k) @ b).norm() / b.norm()))


def test_cg_tol_stops_early():
    a, b, bt, matvec = _system([1.0, 1.0, 1.0, 1.0, 10.0])   # two distinct eigenvalues: CG needs 2 iterations
    x, info = solvers.cg(matvec, bt, iterations=50, tol=1e-10)
    assert info.iterations == 2 and _rel(x, torch.linalg.solve(a, b)) < 1e-10


def test_an_indefinite_system_breaks_cg_and_minres_solves_it():
    """A = diag(1, −1), b = (1, 1): bᵀAb = 0, so CG's first step length is 0/0 and it never moves;
    MINRES needs no definiteness and solves it in two iterations."""
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    bt = {"": torch.ones(2, dtype=torch.float64)}
    matvec = lambda v: {"": a @ v[""]}  # noqa: E731
    x, info = solvers.cg(matvec, bt, iterations=10)
    assert float(info.residual) == pytest.approx(1.0) and torch.equal(x[""], torch.zeros(2, dtype=torch.float64))
    x, info = solvers.minres(matvec, bt, iterations=2)
    assert torch.allclose(x[""], torch.tensor([1.0, -1.0], dtype=torch.float64), atol=1e-14)
    assert float(info.residual) < 1e-14
    _, _, bt, matvec = _system([-2.0, -0.5, 0.3, 1.0, 4.0], seed=3)   # a generic indefinite one
    a, b = _system([-2.0, -0.5, 0.3, 1.0, 4.0], seed=3)[:2]
    x, info = solvers.minres(matvec, bt, iterations=5)
    assert _rel(x, torch.linalg.solve(a, b)) < 1e-10 and float(info.residual) < 1e-10


def test_dense_refuses_large_systems():
    with pytest.raises(mlo.ConfigError, match="max_size=3"):
        solvers.dense(lambda v: v, {"": torch.ones(4)}, max_size=3)


# --------------------------------------------------------------- the engines at a saddle point
# inner: ℓ(w, θ) = ½ wᵀDw − θᵀw with D = diag(1, −1): w*(θ) = D⁻¹θ is a saddle (H = D indefinite).
# outer: F(w) = ½‖w − t‖². dF/dθ = D⁻¹(w* − t); with θ0 = (½, ½), t = w* − (1, 1) the adjoint is
# u = (1, 1), for which uᵀDu = 0: CG breaks down, MINRES and the dense solve give D⁻¹u = (1, −1).
D = torch.tensor([1.0, -1.0], dtype=torch.float64)
THETA0 = torch.tensor([0.5, 0.5], dtype=torch.float64)
W_STAR = THETA0 / D
TARGET = W_STAR - 1.0


def _saddle(engine):
    w = W_STAR.clone().requires_grad_(True)           # starts at its solution: the steps keep it there
    th = THETA0.clone().requires_grad_(True)
    inner = mlo.Problem("inner", w, lambda c, b: 0.5 * (D * c["inner"] ** 2).sum() - (c["outer"] * c["inner"]).sum(),
                        lambda p: torch.optim.SGD(p, lr=0.1), reads=["outer"], engine=engine)
    outer = mlo.Problem("outer", th, lambda c, b: 0.5 * ((c["inner"] - TARGET) ** 2).sum(),
                        lambda p: torch.optim.SGD(p, lr=0.1), reads=["inner"])
    return mlo.Graph([inner, outer])


EXACT = (W_STAR - TARGET) / D     # = (1, −1)


@pytest.mark.parametrize("engine", [mlo.MINRES(iterations=2), mlo.DenseImplicit(),
                                    mlo.Implicit(solver=functools.partial(solvers.minres, iterations=4)),
                                    mlo.Implicit(solver=lambda matvec, b: solvers.dense(matvec, b))],
                         ids=["MINRES", "DenseImplicit", "Implicit(minres)", "Implicit(own)"])
def test_indefinite_hessian_minres_and_dense_give_the_closed_form(engine):
    assert torch.allclose(mlo.hypergradient(_saddle(engine), "outer")["total"], EXACT, atol=1e-13)
    report = mlo.check_hypergradient(_saddle(engine), "outer")
    assert report.ok and report.reference == mlo.check.IMPLICIT, str(report)


def test_indefinite_hessian_cg_is_wrong_and_the_check_says_why():
    assert torch.allclose(mlo.hypergradient(_saddle(mlo.CG(iterations=10)), "outer")["total"],
                          torch.zeros(2, dtype=torch.float64))
    report = mlo.check_hypergradient(_saddle(mlo.CG(iterations=10)), "outer")
    assert not report.ok and report.rel_error == pytest.approx(1.0), str(report)
    assert any("CG residual" in p and "CG not converged" in p and "MINRES" in p for p in report.premises), str(report)
    assert "premise:" in str(report)


def test_minres_is_configurable_by_name():
    assert mlo.engine_from_config({"name": "minres", "iterations": 30, "tol": 1e-8}) == \
        mlo.MINRES(iterations=30, tol=1e-8)
    assert mlo.engine_to_config(mlo.MINRES()) == {"name": "minres", "iterations": 10, "damping": 0.0, "tol": None}
    with pytest.raises(mlo.ConfigError, match="Implicit.solver"):
        mlo.Implicit(solver="cg")
