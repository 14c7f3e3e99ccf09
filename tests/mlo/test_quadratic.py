"""Quadratic bilevel with a chosen condition number κ (docs/mlo.md §3: CG and Neumann, their iterations in κ).

g(z, x) = ½zᵀAz + ½xᵀBx + xᵀCz + aᵀz + bᵀx         z*(x) = −A⁻¹(Cᵀx + a)
F(z, x) = ½zᵀF_zz z + ½xᵀHx + xᵀKz + fᵀz + hᵀx
dF/dx   = (Hx + Kz* + h) − C A⁻¹ (F_zz z* + Kᵀx + f)

A has eigenvalues at the Chebyshev nodes of [1, κ]; C is orthogonal so that the
hypergradient error is the 2-norm error of the linear solve (monotone for CG and
for Neumann with α = 1/λ_max).
"""
import math

import pytest
import torch

import mlo

DZ = 200


def _orth(n, gen):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q


class Quad:
    def __init__(self, kappa, seed=0):
        gen = torch.Generator().manual_seed(seed)
        Q = _orth(DZ, gen)
        # Chebyshev nodes of [1, κ]: the spectrum on which CG follows its worst-case rate
        i = torch.arange(DZ, dtype=torch.float64)
        self.eig = (kappa + 1) / 2 + (kappa - 1) / 2 * torch.cos(math.pi * (2 * i + 1) / (2 * DZ))
        self.kappa = kappa
        self.A = Q @ torch.diag(self.eig) @ Q.T
        self.A = (self.A + self.A.T) / 2
        r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
        S = r(DZ, DZ)
        self.B = S @ S.T / DZ + torch.eye(DZ)
        self.C = _orth(DZ, gen)
        S = r(DZ, DZ)
        self.Fzz = S @ S.T / DZ
        S = r(DZ, DZ)
        self.H = S @ S.T / DZ
        self.K = r(DZ, DZ) / DZ
        self.a, self.b, self.f, self.h = r(DZ), r(DZ), r(DZ), r(DZ)
        self.x0 = r(DZ)

    def g(self, z, x):
        return 0.5 * z @ self.A @ z + 0.5 * x @ self.B @ x + x @ self.C @ z + self.a @ z + self.b @ x

    def F(self, z, x):
        return 0.5 * z @ self.Fzz @ z + 0.5 * x @ self.H @ x + x @ self.K @ z + self.f @ z + self.h @ x

    def z_star(self, x):
        return -torch.linalg.solve(self.A, self.C.T @ x + self.a)

    def u(self):
        x = self.x0
        return self.Fzz @ self.z_star(x) + self.K.T @ x + self.f

    def direct(self):
        x = self.x0
        return self.H @ x + self.K @ self.z_star(x) + self.h

    def hyper(self):
        return -self.C @ torch.linalg.solve(self.A, self.u())

    def graph(self, engine):
        if not hasattr(self, "_z0"):
            self._z0 = self.z_star(self.x0)
        z = self._z0.clone().requires_grad_()
        x = self.x0.clone().requires_grad_()
        inner = mlo.Problem("z", z, lambda ctx, b: self.g(ctx["z"], ctx["x"]),
                            lambda p: torch.optim.SGD(p, lr=1.0 / self.kappa), reads=["x"], engine=engine)
        outer = mlo.Problem("x", x, lambda ctx, b: self.F(ctx["z"], ctx["x"]),
                            lambda p: torch.optim.SGD(p, lr=0.01), reads=["z"])
        return mlo.Graph([inner, outer])

    def run(self, engine):
        return mlo.hypergradient(self.graph(engine), "x")

    def hyper_error(self, engine):
        out = self.run(engine)["hyper"]
        if not hasattr(self, "_hyper"):
            self._hyper = self.hyper()
        ref = self._hyper
        return float((out - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def q100():
    return Quad(100.0)


def test_total_is_direct_plus_hyper_and_matches_closed_form(q100):
    out = q100.run(mlo.CG(iterations=200, tol=1e-14))
    d, h, t = out["direct"], out["hyper"], out["total"]
    assert torch.allclose(d, q100.direct(), rtol=1e-10, atol=1e-12)
    assert torch.equal(t, d + h)
    ref = q100.direct() + q100.hyper()
    assert float((t - ref).norm() / ref.norm()) < 1e-8


def test_cg_error_decreases_and_respects_the_bound(q100):
    kappa = q100.kappa
    rho = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    qstar = torch.linalg.solve(q100.A, q100.u())
    a_norm = float(torch.sqrt(qstar @ q100.A @ qstar))
    ref = q100.hyper().norm().item()
    errs = []
    for K in (1, 2, 4, 8, 16, 32, 64, 128):
        err = q100.hyper_error(mlo.CG(iterations=K)) * ref  # absolute 2-norm error = ‖e_K‖ (C orthogonal)
        bound = 2 * rho ** K * a_norm / math.sqrt(q100.eig.min().item())
        assert err <= bound * (1 + 1e-9) + 1e-12, (K, err, bound)
        errs.append(err)
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] / ref < 1e-8  # reaches the exact answer


def _neumann_prediction(q, K, alpha):
    u = q.u()
    P = torch.eye(DZ) - alpha * q.A
    v, s = u.clone(), u.clone()
    for _ in range(K):
        v = P @ v
        s = s + v
    return -q.C @ (alpha * s)


def test_neumann_error_decreases_and_equals_the_truncated_series(q100):
    alpha = 1.0 / q100.kappa
    errs = []
    for K in (0, 10, 100, 400):
        out = q100.run(mlo.Neumann(iterations=K, alpha=alpha))["hyper"]
        pred = _neumann_prediction(q100, K, alpha)
        assert float((out - pred).norm() / pred.norm()) < 1e-10
        ref = q100.hyper()
        errs.append(float((out - ref).norm() / ref.norm()))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # error ∝ (1 − α λ_min)^(K+1) in the slowest eigendirection
    assert errs[-1] < 2 * (1 - alpha) ** 401 * 10


def _iterations_needed(q, make, tol, limit):
    """First K on a geometric grid (ratio 1.2) with relative error <= tol."""
    K = 1
    while K <= limit:
        if q.hyper_error(make(K)) <= tol:
            return K
        K = max(K + 1, int(math.ceil(K * 1.2)))
    raise AssertionError(f"no K <= {limit} reached {tol}")


def test_iterations_scale_like_sqrt_kappa_for_cg_and_kappa_for_neumann(q100):
    q10 = Quad(10.0)
    tol = 1e-4
    cg10 = _iterations_needed(q10, lambda k: mlo.CG(iterations=k), tol, DZ)
    cg100 = _iterations_needed(q100, lambda k: mlo.CG(iterations=k), tol, DZ)
    ne10 = _iterations_needed(q10, lambda k: mlo.Neumann(iterations=k, alpha=1 / 10.0), tol, 400)
    ne100 = _iterations_needed(q100, lambda k: mlo.Neumann(iterations=k, alpha=1 / 100.0), tol, 4000)
    # √10 ≈ 3.2 for CG, 10 for Neumann
    assert 1.8 <= cg100 / cg10 <= 5.0, (cg10, cg100)
    assert 6.0 <= ne100 / ne10 <= 16.0, (ne10, ne100)
    assert ne100 > 5 * cg100
