"""K unrolled SGD steps from the optimum ≡ Neumann with K−1 terms and α = η
(docs/mlo.md §3, "When to use which"), and K-step Unrolled against a hand-written K-step unroll.

inner: g(w, θ) = (1/2n)‖Xw − y‖² + ½ Σ_j e^{θ_j} w_j²   (per-feature weight decay)
outer: F(w)    = (1/2m)‖X_v w − y_v‖²
"""
import pytest
import torch

import mlo

N, M, D = 25, 15, 4
ETA = 0.2


def _data():
    gen = torch.Generator().manual_seed(99)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    X, Xv = r(N, D), r(M, D)
    return X, X @ r(D) + 0.1 * r(N), Xv, Xv @ r(D), r(D) * 0.5 - 1.0, r(D)


X, Y, XV, YV, THETA0, W_OFF = _data()


def g(w, th):
    return ((X @ w - Y) ** 2).sum() / (2 * N) + 0.5 * (torch.exp(th) * w * w).sum()


def F(w):
    return ((XV @ w - YV) ** 2).sum() / (2 * M)


def w_star(th):
    return torch.linalg.solve(X.T @ X / N + torch.diag(torch.exp(th)), X.T @ Y / N)


def build(engine, K, w0, opt=None, scheduler=None):
    w = w0.clone().requires_grad_()
    th = THETA0.clone().requires_grad_()
    inner = mlo.Problem("inner", w, lambda c, b: g(c["inner"], c["outer"][0]),
                        opt or (lambda p: torch.optim.SGD(p, lr=ETA)), reads=["outer"], steps=K,
                        engine=engine, scheduler=scheduler)
    outer = mlo.Problem("outer", [th], lambda c, b: F(c["inner"]), lambda p: torch.optim.SGD(p, lr=0.1),
                        reads=["inner"])
    return mlo.Graph([inner, outer])


def hyper(graph):
    out = mlo.hypergradient(graph, "outer")
    assert isinstance(out["hyper"], list) and len(out["hyper"]) == 1  # declared as a list: returned as one
    return out["hyper"][0]


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("K", [1, 2, 5, 12])
def test_k_unrolled_steps_equal_neumann_k_minus_1_at_optimum(K):
    ws = w_star(THETA0)
    unrolled = hyper(build(mlo.Unrolled(steps=K), K, ws))
    neumann = hyper(build(mlo.Neumann(iterations=K - 1, alpha=ETA), K, ws))
    neumann_default = hyper(build(mlo.Neumann(iterations=K - 1), K, ws))  # α = problem lr
    assert unrolled.norm() > 1e-3
    assert rel(unrolled, neumann) < 1e-12
    assert rel(neumann_default, neumann) < 1e-14
    if K > 1:  # and it is not just the one-step answer
        assert rel(hyper(build(mlo.Unrolled(steps=1), K, ws)), unrolled) > 1e-3


def _hand_unroll(w0, K_total, K_diff, opt_kind, lrs):
    """Run K_total steps by hand; differentiate only through the last K_diff (θ fixed at THETA0)."""
    mu, wd, damp = 0.9, 0.01, 0.2
    th = THETA0.clone().requires_grad_()
    w = w0.clone()
    buf = None
    for k in range(K_total):
        live = k >= K_total - K_diff
        if not live:
            w = w.detach()
            buf = None if buf is None else buf.detach()
        wl = w if w.requires_grad else w.detach().requires_grad_()
        grad = torch.autograd.grad(g(wl, th if live else th.detach()), wl, create_graph=live)[0]
        if opt_kind == "sgd":
            w = wl - lrs[k] * grad
        else:
            d = grad + wd * wl
            buf = d if buf is None else mu * buf + (1 - damp) * d
            w = wl - lrs[k] * buf
    return torch.autograd.grad(F(w), th)[0]


@pytest.mark.parametrize("opt_kind", ["sgd", "momentum"])
@pytest.mark.parametrize("K_total,K_diff", [(3, 3), (4, 2)])
def test_k_step_unrolled_equals_hand_unroll_with_scheduler(opt_kind, K_total, K_diff):
    w0 = w_star(THETA0) + W_OFF  # away from the optimum: not the Neumann identity any more
    opt = (lambda p: torch.optim.SGD(p, lr=ETA)) if opt_kind == "sgd" else \
        (lambda p: torch.optim.SGD(p, lr=ETA, momentum=0.9, weight_decay=0.01, dampening=0.2))
    sched = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)  # noqa: E731
    lrs = [ETA * 0.5 ** k for k in range(K_total)]
    out = hyper(build(mlo.Unrolled(steps=K_diff), K_total, w0, opt, sched))
    ref = _hand_unroll(w0, K_total, K_diff, opt_kind, lrs)
    assert rel(out, ref) < 1e-10
