"""A 4-level chain shaped like LeaSE (docs/mlo.md §2, the reverse sweep, and §3, "Conventions").

order: E (min, reads A), D (max, reads E), W (min, reads D), A (min, reads E and W)

    E' = E − η_E ∇_E L_E(E, A)
    δ' = δ + η_δ ∇_δ L_δ(δ, E')          (D is a max problem: ascent)
    W' = W − η_W ∇_W L_W(W, δ')
    O_A = L_A(E', W', A)
"""
import pytest
import torch
import torch.nn.functional as Fn
from torch.autograd.functional import jacobian

import mlo

ETA_E, ETA_D, ETA_W, ETA_A = 0.3, 0.25, 0.4, 0.1
GAMMA = 0.7


def _consts():
    gen = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return dict(Ba=r(3, 2), p=r(2), Cd=r(3, 3), Dw=r(3, 3), Pa=r(3, 2), t=r(3),
                e0=r(3), d0=r(3), w0=r(3), a0=r(2))


C = _consts()


def L_E(e, a):
    return 0.5 * ((e - torch.tanh(C["Ba"] @ a)) ** 2).sum() + 0.1 * (Fn.softplus(e) * torch.sigmoid(a @ C["p"])).sum()


def L_D(d, e):  # maximised over d (concave in d)
    return -0.5 * (1 + 0.1 * Fn.softplus(e).sum()) * (d ** 2).sum() + d @ torch.tanh(C["Cd"] @ e)


def L_W(w, d):
    return 0.5 * ((w - Fn.softplus(C["Dw"] @ d)) ** 2).sum() + 0.1 * (torch.tanh(w) * d).sum()


def O_A(e1, w1, a):
    return 0.5 * ((torch.tanh(e1) - C["Pa"] @ a) ** 2).sum() + 0.1 * (a ** 2).sum() \
        + GAMMA * 0.5 * ((w1 - C["t"]) ** 2).sum()


def grad(f, x, *args):
    x = x if x.requires_grad else x.detach().requires_grad_()
    return torch.autograd.grad(f(x, *args), x, create_graph=True)[0]


def compose(a):
    """The one-step composition, by hand: a -> O_A."""
    e1 = C["e0"] - ETA_E * grad(L_E, C["e0"], a)
    d1 = C["d0"] + ETA_D * grad(L_D, C["d0"], e1)
    w1 = C["w0"] - ETA_W * grad(L_W, C["w0"], d1)
    return O_A(e1, w1, a)


def build(e_eng=None, d_eng=None, w_eng=None):
    e = C["e0"].clone().requires_grad_()
    d = C["d0"].clone().requires_grad_()
    w = C["w0"].clone().requires_grad_()
    a = C["a0"].clone().requires_grad_()
    sgd = lambda lr: (lambda p: torch.optim.SGD(p, lr=lr))  # noqa: E731
    pe = mlo.Problem("E", {"e": e}, lambda c, b: L_E(c["E"]["e"], c["A"]), sgd(ETA_E), reads=["A"], engine=e_eng)
    pd = mlo.Problem("D", d, lambda c, b: L_D(c["D"], c["E"]["e"]), sgd(ETA_D), reads=["E"], mode="max",
                     engine=d_eng)
    pw = mlo.Problem("W", [w], lambda c, b: L_W(c["W"][0], c["D"]), sgd(ETA_W), reads=["D"], engine=w_eng)
    pa = mlo.Problem("A", a, lambda c, b: O_A(c["E"]["e"], c["W"][0], c["A"]), sgd(ETA_A), reads=["E", "W"])
    return mlo.Graph([pe, pd, pw, pa])


def central_difference(f, x, eps=1e-5):
    out = torch.empty_like(x)
    for i in range(x.numel()):
        dx = torch.zeros_like(x)
        dx[i] = eps
        out[i] = (f(x + dx).detach() - f(x - dx).detach()) / (2 * eps)
    return out


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def reference():
    a = C["a0"].clone().requires_grad_()
    exact = torch.autograd.grad(compose(a), a)[0]
    numeric = central_difference(compose, C["a0"].clone())
    assert rel(exact, numeric) < 1e-8  # the hand composition is self-consistent
    return numeric


def test_unrolled_every_edge_matches_central_difference(reference):
    graph = build()
    out = mlo.hypergradient(graph, "A")["total"]
    assert rel(out, reference) < 1e-7
    rep = mlo.check_hypergradient(graph, "A", tol=1e-7)
    assert rep.ok, str(rep)
    assert rel(rep.numeric, reference) < 1e-7


def test_closed_form_of_the_chain():
    a0 = C["a0"]
    e1 = (C["e0"] - ETA_E * grad(L_E, C["e0"], a0)).detach()
    d1 = (C["d0"] + ETA_D * grad(L_D, C["d0"], e1)).detach()
    w1 = (C["w0"] - ETA_W * grad(L_W, C["w0"], d1)).detach()
    # mixed second derivatives M = ∂_λ ∇_w g at the pre-update points, shape (dim w, dim λ)
    M_E = jacobian(lambda a: grad(L_E, C["e0"], a), a0)
    M_D = jacobian(lambda e: grad(L_D, C["d0"], e), e1)
    M_W = jacobian(lambda d: grad(L_W, C["w0"], d), d1)
    e1r, w1r, ar = (x.clone().requires_grad_() for x in (e1, w1, a0))
    dO_de, dO_dw, dO_da = torch.autograd.grad(O_A(e1r, w1r, ar), (e1r, w1r, ar))
    dO_dd = torch.zeros(3)  # O_A does not read δ' directly
    g_A = dO_da - ETA_E * M_E.T @ (dO_de + ETA_D * M_D.T @ (dO_dd - ETA_W * M_W.T @ dO_dw))
    out = mlo.hypergradient(build(), "A")
    assert rel(out["total"], g_A) < 1e-10
    assert rel(out["direct"], dO_da) < 1e-12
    assert rel(out["hyper"], g_A - dO_da) < 1e-10


def test_finite_difference_every_edge(reference):
    fd = mlo.FiniteDifference()
    out = mlo.hypergradient(build(fd, fd, fd), "A")["total"]
    assert rel(out, reference) < 1e-4


def test_one_vjp_per_edge_per_step_and_real_update():
    graph = build()
    hg = mlo.hypergradient(graph, "A")["total"]
    st = mlo.Stepper(graph)
    st.step()
    assert dict(st.vjp_calls) == {"W->D": 1, "D->E": 1, "E->A": 1}
    # the real step applied A <- A − η_A·g_A, and D ascended
    assert torch.allclose(graph.problems["A"].params_tree[""], C["a0"] - ETA_A * hg, rtol=0, atol=1e-14)
    d1 = C["d0"] + ETA_D * grad(L_D, C["d0"], C["e0"] - ETA_E * grad(L_E, C["e0"], C["a0"])).detach()
    assert torch.allclose(graph.problems["D"].params_tree[""], d1.detach(), rtol=0, atol=1e-14)
    st.step()
    assert dict(st.vjp_calls) == {"W->D": 2, "D->E": 2, "E->A": 2}


def test_mixed_engines_cg_in_the_middle():
    graph = build(mlo.Unrolled(), mlo.CG(iterations=3), mlo.Neumann(iterations=5, alpha=0.2))
    out = mlo.hypergradient(graph, "A")
    assert torch.isfinite(out["total"]).all()
    st = mlo.Stepper(graph)
    for _ in range(3):
        st.step()
    for p in graph.problems.values():
        assert all(torch.isfinite(v).all() for v in p.params_tree.values())


def test_cg_in_the_middle_matches_its_implicit_formula():
    """D->E by CG: (∂δ'/∂E')ᵀu = −M̃ᵀ H̃⁻¹ u with H̃, M̃ of −L_D at the updated δ'."""
    a0 = C["a0"]
    e1 = (C["e0"] - ETA_E * grad(L_E, C["e0"], a0)).detach()
    d1 = (C["d0"] + ETA_D * grad(L_D, C["d0"], e1)).detach()
    w1 = (C["w0"] - ETA_W * grad(L_W, C["w0"], d1)).detach()
    M_E = jacobian(lambda a: grad(L_E, C["e0"], a), a0)
    M_W = jacobian(lambda d: grad(L_W, C["w0"], d), d1)
    neg = lambda d, e: -L_D(d, e)  # noqa: E731
    H_D = jacobian(lambda d: grad(neg, d, e1), d1)
    Mt_D = jacobian(lambda e: grad(neg, d1, e), e1)
    e1r, w1r, ar = (x.clone().requires_grad_() for x in (e1, w1, a0))
    dO_de, dO_dw, dO_da = torch.autograd.grad(O_A(e1r, w1r, ar), (e1r, w1r, ar))
    u_d = -ETA_W * M_W.T @ dO_dw
    u_e = dO_de - Mt_D.T @ torch.linalg.solve(H_D, u_d)
    g_A = dO_da - ETA_E * M_E.T @ u_e
    out = mlo.hypergradient(build(None, mlo.CG(iterations=3)), "A")["total"]
    assert rel(out, g_A) < 1e-9


def test_two_real_steps_equal_hand_simulation():
    """End to end: E reads A's current value, D reads E', W reads δ', A reads E', W'."""
    e, d, w, a = (C[k].clone() for k in ("e0", "d0", "w0", "a0"))
    for _ in range(2):
        ar = a.clone().requires_grad_()
        e1 = e - ETA_E * grad(L_E, e, ar)
        d1 = d + ETA_D * grad(L_D, d, e1)
        w1 = w - ETA_W * grad(L_W, w, d1)
        g_a = torch.autograd.grad(O_A(e1, w1, ar), ar)[0]
        e, d, w, a = e1.detach(), d1.detach(), w1.detach(), a - ETA_A * g_a
    graph = build()
    st = mlo.Stepper(graph)
    st.step()
    st.step()
    got = {n: next(iter(p.params_tree.values())).detach() for n, p in graph.problems.items()}
    for n, ref in (("E", e), ("D", d), ("W", w), ("A", a)):
        assert torch.allclose(got[n], ref, rtol=1e-12, atol=1e-13), n
