"""A max level gets the right sign (docs/mlo.md §3: a max problem's step is an ascent, δ' = δ + η∇_δ L).

inner D (max over δ, reads x): L(δ, x) = −½(1 + 0.1·Σ softplus(x))‖δ‖² + δ·tanh(Cx)
outer x (min, reads D):        F(δ', x) = ½‖δ' − t‖² + 0.1‖x‖²
"""
import pytest
import torch
import torch.nn.functional as Fn

import mlo

ETA, ETA_X = 0.3, 0.05


def _consts():
    gen = torch.Generator().manual_seed(21)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return dict(C=r(3, 2), t=r(3), d0=r(3), x0=r(2))


K = _consts()


def L(d, x):
    return -0.5 * (1 + 0.1 * Fn.softplus(x).sum()) * (d ** 2).sum() + d @ torch.tanh(K["C"] @ x)


def F(d, x):
    return 0.5 * ((d - K["t"]) ** 2).sum() + 0.1 * (x ** 2).sum()


def d_star(x):
    return torch.tanh(K["C"] @ x) / (1 + 0.1 * Fn.softplus(x).sum())


def build(engine, d0=None, outer_mode="min", sign=1.0):
    d = (K["d0"] if d0 is None else d0).clone().requires_grad_()
    x = K["x0"].clone().requires_grad_()
    inner = mlo.Problem("D", d, lambda c, b: L(c["D"], c["x"]), lambda p: torch.optim.SGD(p, lr=ETA),
                        reads=["x"], mode="max", engine=engine)
    outer = mlo.Problem("x", x, lambda c, b: sign * F(c["D"], c["x"]), lambda p: torch.optim.SGD(p, lr=ETA_X),
                        reads=["D"], mode=outer_mode)
    return mlo.Graph([inner, outer]), d, x


def hand(step_sign):
    x = K["x0"].clone().requires_grad_()
    d = K["d0"].clone().requires_grad_()
    g = torch.autograd.grad(L(d, x), d, create_graph=True)[0]
    return torch.autograd.grad(F(K["d0"] + step_sign * ETA * g, x), x)[0]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_ascent_unroll_sign():
    ascent, descent = hand(+1.0), hand(-1.0)
    assert rel(ascent, descent) > 0.1  # the sign matters for this problem
    out = mlo.hypergradient(build(mlo.Unrolled())[0], "x")["total"]
    assert rel(out, ascent) < 1e-10
    fd = mlo.hypergradient(build(mlo.FiniteDifference())[0], "x")["total"]
    assert rel(fd, ascent) < 1e-6  # L is quadratic in δ


@pytest.mark.parametrize("engine", [mlo.CG(iterations=3), mlo.Neumann(iterations=400, alpha=0.5)])
def test_implicit_sign_at_the_maximum(engine):
    x = K["x0"].clone().requires_grad_()
    ref = torch.autograd.grad(F(d_star(x), x), x)[0]  # d/dx F(δ*(x), x)
    out = mlo.hypergradient(build(engine, d0=d_star(K["x0"]).detach())[0], "x")["total"]
    assert rel(out, ref) < 1e-9


def test_max_problem_own_direction_and_step():
    graph, d, x = build(mlo.Unrolled())
    out = mlo.hypergradient(graph, "D")
    dd = K["d0"].clone().requires_grad_()
    g = torch.autograd.grad(L(dd, K["x0"]), dd)[0]
    assert torch.allclose(out["total"], g, rtol=0, atol=1e-14)  # sign of the objective itself
    mlo.Stepper(graph).step()
    assert torch.allclose(d.detach(), K["d0"] + ETA * g, rtol=0, atol=1e-14)  # ascent


def test_max_upper_level():
    """x maximises −F: hypergradient is d(−F)/dx and the step ascends it."""
    graph, d, x = build(mlo.Unrolled(), outer_mode="max", sign=-1.0)
    out = mlo.hypergradient(graph, "x")["total"]
    assert rel(out, -hand(+1.0)) < 1e-10
    mlo.Stepper(graph).step()
    assert torch.allclose(x.detach(), K["x0"] + ETA_X * out, rtol=0, atol=1e-14)
