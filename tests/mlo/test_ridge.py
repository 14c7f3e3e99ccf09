"""Ridge regression with a log-regularisation hyperparameter (docs/mlo.md §3: the implicit engines, −Mᵀ(H + ρI)⁻¹u).

inner: g(w, θ) = (1/2n)‖Xw − y‖² + (e^θ/2)‖w‖²      (min over w, reads outer)
outer: F(w)    = (1/2m)‖X_v w − y_v‖²                (min over θ, reads inner)

Closed form at the optimum w*:
    dF/dθ = −e^θ w*ᵀ (XᵀX/n + e^θ I)⁻¹ X_vᵀ(X_v w* − y_v)/m
"""
import math

import pytest
import torch

import mlo

N, M, D = 30, 20, 5
LR = 0.1


def _data():
    gen = torch.Generator().manual_seed(1234)
    X = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = X @ torch.randn(D, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(N, generator=gen,
                                                                                    dtype=torch.float64)
    Xv = torch.randn(M, D, generator=gen, dtype=torch.float64)
    yv = Xv @ torch.randn(D, generator=gen, dtype=torch.float64)
    return X, y, Xv, yv


X, Y, XV, YV = _data()
THETA0 = math.log(0.3)


def inner_loss(w, theta):
    return ((X @ w - Y) ** 2).sum() / (2 * N) + torch.exp(theta) / 2 * (w ** 2).sum()


def outer_loss(w):
    return ((XV @ w - YV) ** 2).sum() / (2 * M)


def hessian(theta=THETA0):
    return X.T @ X / N + math.exp(theta) * torch.eye(D)


def w_star(theta=THETA0):
    return torch.linalg.solve(hessian(theta), X.T @ Y / N)


def analytic(theta=THETA0):
    w = w_star(theta)
    u = XV.T @ (XV @ w - YV) / M
    return -math.exp(theta) * w @ torch.linalg.solve(hessian(theta), u)


def build(engine, w0=None, inner_opt=None, theta0=THETA0, grad_clip=None):
    w = (w_star(theta0) if w0 is None else w0).clone().requires_grad_()
    theta = torch.tensor(theta0, requires_grad=True)
    inner = mlo.Problem("inner", w, lambda ctx, b: inner_loss(ctx["inner"], ctx["outer"]),
                        inner_opt or (lambda p: torch.optim.SGD(p, lr=LR)), reads=["outer"], engine=engine,
                        grad_clip=grad_clip)
    outer = mlo.Problem("outer", theta, lambda ctx, b: outer_loss(ctx["inner"]),
                        lambda p: torch.optim.SGD(p, lr=0.01), reads=["inner"])
    return mlo.Graph([inner, outer]), w, theta


def rel(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def hg(graph):
    out = mlo.hypergradient(graph, "outer")
    assert set(out) == {"total", "direct", "hyper"}
    assert isinstance(out["total"], torch.Tensor)  # declared as one tensor: returned as one
    return out


# ---------------------------------------------------------------- implicit engines
def test_closed_form_is_a_real_derivative():
    # the known answer itself: central difference of θ -> F(w*(θ))
    e = 1e-6
    num = (outer_loss(w_star(THETA0 + e)) - outer_loss(w_star(THETA0 - e))) / (2 * e)
    assert rel(analytic(), num) < 1e-7


def test_cg_matches_closed_form():
    graph, _, _ = build(mlo.CG(iterations=20))
    out = hg(graph)
    assert out["direct"].abs().item() == 0.0  # F does not depend on θ directly
    assert rel(out["total"], analytic()) < 1e-8
    assert torch.equal(out["total"], out["hyper"])


def test_cg_converges_in_d_iterations_and_not_before():
    errs = [rel(hg(build(mlo.CG(iterations=k))[0])["total"], analytic()) for k in (1, 2, D)]
    assert errs[0] > 1e-3
    assert errs[2] < 1e-8


def test_cg_damping_solves_the_damped_system():
    rho = 0.7
    out = hg(build(mlo.CG(iterations=20, damping=rho))[0])["total"]
    w = w_star()
    u = XV.T @ (XV @ w - YV) / M
    ref = -math.exp(THETA0) * w @ torch.linalg.solve(hessian() + rho * torch.eye(D), u)
    assert rel(out, ref) < 1e-8
    assert rel(out, analytic()) > 1e-2


def test_cg_tol_stops_early_but_accurately():
    out = hg(build(mlo.CG(iterations=50, tol=1e-12))[0])
    assert rel(out["total"], analytic()) < 1e-8


def _neumann_prediction(K, alpha):
    """Exact value of K-term Neumann: −e^θ w*ᵀ α Σ_{j=0..K} (I − αH)^j u."""
    w = w_star()
    u = XV.T @ (XV @ w - YV) / M
    A = torch.eye(D) - alpha * hessian()
    v, q = u.clone(), u.clone()
    for _ in range(K):
        v = A @ v
        q = q + v
    return -math.exp(THETA0) * w @ (alpha * q)


def test_neumann_matches_series_and_converges():
    lam_max = torch.linalg.eigvalsh(hessian()).max().item()
    alpha = 1.0 / lam_max
    errs = []
    for K in (0, 3, 30, 300):
        out = hg(build(mlo.Neumann(iterations=K, alpha=alpha))[0])["total"]
        assert rel(out, _neumann_prediction(K, alpha)) < 1e-10
        errs.append(rel(out, analytic()))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    big = hg(build(mlo.Neumann(iterations=3000, alpha=alpha))[0])["total"]
    assert rel(big, analytic()) < 1e-8


def test_neumann_alpha_defaults_to_problem_lr():
    a = hg(build(mlo.Neumann(iterations=40))[0])["total"]
    b = hg(build(mlo.Neumann(iterations=40, alpha=LR))[0])["total"]
    assert torch.equal(a, b)
    assert rel(a, _neumann_prediction(40, LR)) < 1e-10


# ---------------------------------------------------------------- one-step unrolled
def _w0():
    return torch.randn(D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def hand_one_step(w, theta, update):
    """d/dθ F(update(w, ∇_w g(w, θ))) by plain autograd."""
    th = torch.tensor(float(theta), requires_grad=True)
    wl = w.detach().clone().requires_grad_()
    g = torch.autograd.grad(inner_loss(wl, th), wl, create_graph=True)[0]
    (d,) = torch.autograd.grad(outer_loss(update(wl, g)), th)
    return d


def test_unrolled_sgd_equals_hand_unroll():
    w0 = _w0()
    out = hg(build(mlo.Unrolled(), w0=w0)[0])
    ref = hand_one_step(w0, THETA0, lambda w, g: w - LR * g)
    assert rel(out["total"], ref) < 1e-10
    # not at the optimum this is not the implicit answer: the test can tell them apart
    assert rel(ref, analytic()) > 1e-3


def test_unrolled_and_fd_match_check_hypergradient():
    for eng in (mlo.Unrolled(), mlo.FiniteDifference()):
        graph, _, _ = build(eng, w0=_w0())
        rep = mlo.check_hypergradient(graph, "outer", tol=1e-8)
        assert rep.ok, str(rep)


def _run_real_steps(graph, k=3):
    st = mlo.Stepper(graph)
    for _ in range(k):
        st.step()


def _after_real_steps(engine, opt, k=3):
    graph, w, theta = build(engine, w0=_w0(), inner_opt=opt)
    _run_real_steps(graph, k)
    return graph, w, theta


SGD_MOM = dict(lr=LR, momentum=0.9, weight_decay=0.05, dampening=0.1)


@pytest.mark.parametrize("engine,tol", [(mlo.Unrolled(), 1e-10), (mlo.FiniteDifference(), 1e-6)],
                         ids=["Unrolled", "FD"])
def test_one_step_sgd_momentum_weight_decay_after_real_steps(engine, tol):
    mu, wd, damp = SGD_MOM["momentum"], SGD_MOM["weight_decay"], SGD_MOM["dampening"]
    graph, w, theta = _after_real_steps(engine, lambda p: torch.optim.SGD(p, **SGD_MOM))
    buf = graph.problems["inner"].torch_optimizer.state[w]["momentum_buffer"].clone()
    assert buf.norm() > 1e-3

    def update(wl, g):
        return wl - LR * (mu * buf + (1 - damp) * (g + wd * wl))

    ref = hand_one_step(w.detach(), theta.item(), update)
    assert rel(hg(graph)["total"], ref) < tol
    # dropping the (1 - dampening) factor would be a 10% error: the test can tell
    wrong = hand_one_step(w.detach(), theta.item(), lambda wl, g: wl - LR * (mu * buf + g + wd * wl))
    assert rel(wrong, ref) > 0.05


def test_unrolled_nesterov_after_real_steps():
    mu, wd = 0.8, 0.01
    opt = lambda p: torch.optim.SGD(p, lr=LR, momentum=mu, weight_decay=wd, nesterov=True)  # noqa: E731
    graph, w, theta = _after_real_steps(mlo.Unrolled(), opt)
    buf = graph.problems["inner"].torch_optimizer.state[w]["momentum_buffer"].clone()

    def update(wl, g):
        d = g + wd * wl
        b = mu * buf + d
        return wl - LR * (d + mu * b)

    assert rel(hg(graph)["total"], hand_one_step(w.detach(), theta.item(), update)) < 1e-10


def _adam_update(state, lr, betas, eps, wd=0.0, decoupled=False):
    """Adam's step written out by hand (torch.optim.Adam / AdamW semantics)."""
    b1, b2 = betas
    m0, v0, t = state["exp_avg"].clone(), state["exp_avg_sq"].clone(), int(state["step"]) + 1

    def update(wl, g):
        base = wl
        if decoupled:
            base = wl * (1 - lr * wd)
            d = g
        else:
            d = g + wd * wl
        m = b1 * m0 + (1 - b1) * d
        v = b2 * v0 + (1 - b2) * d * d
        mhat = m / (1 - b1 ** t)
        vhat = v / (1 - b2 ** t)
        return base - lr * mhat / (torch.sqrt(vhat) + eps)
    return update


@pytest.mark.parametrize("engine,tol", [(mlo.Unrolled(), 1e-10), (mlo.FiniteDifference(), 1e-6)],
                         ids=["Unrolled", "FD"])
@pytest.mark.parametrize("kind", ["adam", "adam_l2", "adamw"])
def test_one_step_adam_after_real_steps(kind, engine, tol):
    lr, betas, eps = 0.05, (0.8, 0.95), 1e-8
    wd = {"adam": 0.0, "adam_l2": 0.1, "adamw": 0.1}[kind]
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    graph, w, theta = _after_real_steps(engine, lambda p: cls(p, lr=lr, betas=betas, eps=eps, weight_decay=wd))
    state = graph.problems["inner"].torch_optimizer.state[w]
    assert int(state["step"]) == 3
    update = _adam_update(state, lr, betas, eps, wd, decoupled=(kind == "adamw"))
    ref = hand_one_step(w.detach(), theta.item(), update)
    # FD linearises the same update; exact up to rounding since ∇_θ g is quadratic in w
    assert rel(hg(graph)["total"], ref) < tol


def test_check_hypergradient_after_real_steps_with_momentum():
    """The checker must restore the optimizer state between its evaluations."""
    graph, _, _ = _after_real_steps(mlo.Unrolled(), lambda p: torch.optim.SGD(p, **SGD_MOM))
    rep = mlo.check_hypergradient(graph, "outer", tol=1e-8)
    assert rep.ok, str(rep)


def test_unrolled_with_grad_clip_equals_hand_unroll():
    clip = 0.05
    w0 = _w0()
    graph, _, _ = build(mlo.Unrolled(), w0=w0, grad_clip=clip)
    out = hg(graph)

    def update(wl, g):
        n = g.norm()
        assert n.item() > clip  # the clip is active
        return wl - LR * g * (clip / (n + 1e-6))

    assert rel(out["total"], hand_one_step(w0, THETA0, update)) < 1e-10


# ---------------------------------------------------------------- finite difference
def test_finite_difference_exact_for_quadratic_inner():
    w0 = _w0()
    fd = hg(build(mlo.FiniteDifference(), w0=w0)[0])["total"]
    ex = hg(build(mlo.Unrolled(), w0=w0)[0])["total"]
    assert rel(fd, ex) < 1e-6
    # also with a much larger step: central differences are exact on a quadratic
    fd_big = hg(build(mlo.FiniteDifference(eps=1.0), w0=w0)[0])["total"]
    assert rel(fd_big, ex) < 1e-6


def test_hypergradient_restores_state():
    graph, w, theta = build(mlo.Unrolled(), w0=_w0(),
                            inner_opt=lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9))
    _run_real_steps(graph, 2)
    before = mlo.graph_state_dict(graph)
    rng = torch.get_rng_state()
    a = hg(graph)["total"]
    b = hg(graph)["total"]
    assert torch.equal(a, b)
    after = mlo.graph_state_dict(graph)
    for name in graph.problems:
        for k, v in before["problems"][name]["params"].items():
            assert torch.equal(v, after["problems"][name]["params"][k])
    buf0 = before["problems"]["inner"]["optimizer"]["state"][0]["momentum_buffer"]
    buf1 = after["problems"]["inner"]["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(buf0, buf1)
    assert torch.equal(rng, torch.get_rng_state())
