"""``python -m benchmarks.hypergrad``: every engine against exact hypergradients.

Engines: first-order, one-step (``Unrolled(1)``), K-step (``Unrolled(K)``),
finite difference, ``Neumann(K)`` and ``CG(K)``. Problems (float64):

* ``ridge``: ridge regression, scalar λ = e^θ; exact hypergradient in closed form.
* ``quad-k10`` / ``quad-k100`` / ``quad-k1000``: quadratic bilevel problem whose
  lower Hessian has condition number κ (eigenvalues at the Chebyshev nodes of
  [1, κ]); closed form.
* ``logistic``: per-feature weight decay (64 coefficients) on multinomial logistic
  regression of scikit-learn's digits; the lower problem is solved by Newton's
  method, the exact hypergradient is the implicit one with dense matrices.
* ``chain``: a 4-level LeaSE-shaped chain (explainer E reads A; explanation bank Δ
  maximises and reads E'; audience W reads Δ'; A reads E' and W') of small smooth
  networks; exact = autograd through the composed steps.

The bilevel problems start at the lower optimum, so every engine is measured
against the true bilevel hypergradient: unrolling K steps from there equals the
Neumann series with K−1 terms, and one-step / finite difference / first-order
show their bias. In the chain each level takes one step (K for ``Unrolled(K)``),
as LeaSE does, and "exact" is the derivative of those steps.

Per engine: relative error, time per hypergradient (the lower problem's steps
plus the upper problem's update direction, ``Stepper.direction(upper)``)
and peak memory. The plot is error against time, one curve per engine family:
the curve for choosing K.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

import mlo
from applications.lease.explain import explanation_loss

from . import common

DT = torch.float64

GRIDS = {
    "tiny": {"unrolled": [1, 5], "neumann": [1, 10], "cg": [1, 5]},
    "small": {"unrolled": [1, 2, 5, 10, 20, 50, 100], "neumann": [1, 3, 10, 30, 100, 300, 1000],
              "cg": [1, 2, 5, 10, 20, 50, 100]},
    "paper": {"unrolled": [1, 2, 5, 10, 20, 50, 100, 200, 500],
              "neumann": [1, 3, 10, 30, 100, 300, 1000, 3000, 10000],
              "cg": [1, 2, 5, 10, 20, 50, 100, 200, 500]},
}
CHAIN_UNROLL = {"tiny": [1, 2], "small": [1, 2, 5], "paper": [1, 2, 5, 10]}

# ridge (n, d, m); quad (d_z, d_x); logistic: training examples (None: all); chain (p, h, bank, batch)
DIMS = {
    "tiny": {"ridge": (60, 10, 30), "quad": (20, 5), "logistic": 200, "chain": (4, 4, 8, 6)},
    "small": {"ridge": (400, 50, 200), "quad": (100, 20), "logistic": None, "chain": (8, 8, 32, 16)},
    "paper": {"ridge": (5000, 1000, 2000), "quad": (1000, 100), "logistic": None, "chain": (64, 64, 1000, 128)},
}

# documented accuracy tolerances (docs/benchmarks.md), checked by the tests
TOL = {"closed_form_vs_dense": 1e-8, "chain_unrolled_exact": 1e-9, "fd_equals_one_step_on_quadratic": 1e-7,
       "neumann_equals_unrolled_at_optimum": 1e-9, "cg_converged": 1e-8, "logistic_solved": 1e-9,
       "chain_fd": 1e-3}


@dataclass(frozen=True)
class Spec:
    """One engine configuration: ``family`` and K (iterations or unrolled steps)."""

    family: str        # first_order | unrolled | finite_difference | neumann | cg
    k: int = 0

    @property
    def label(self) -> str:
        if self.family == "unrolled":
            return "one-step" if self.k == 1 else f"unrolled K={self.k}"
        if self.family in ("neumann", "cg"):
            return f"{'Neumann' if self.family == 'neumann' else 'CG'} K={self.k}"
        return {"first_order": "first-order", "finite_difference": "finite difference"}[self.family]

    def engine(self) -> mlo.Engine:
        return {"first_order": lambda: mlo.FirstOrder(), "unrolled": lambda: mlo.Unrolled(steps=self.k),
                "finite_difference": lambda: mlo.FiniteDifference(), "neumann": lambda: mlo.Neumann(iterations=self.k),
                "cg": lambda: mlo.CG(iterations=self.k)}[self.family]()

    @property
    def steps(self) -> int:
        """Lower-level steps per outer step: K for unrolling, else one."""
        return self.k if self.family == "unrolled" else 1


def specs(size: str, chain: bool = False) -> list[Spec]:
    grid = GRIDS[size]
    out = [Spec("first_order"), Spec("finite_difference")]
    out += [Spec("unrolled", k) for k in (CHAIN_UNROLL[size] if chain else grid["unrolled"])]
    out += [Spec("neumann", k) for k in grid["neumann"]]
    out += [Spec("cg", k) for k in grid["cg"]]
    return out


# ----------------------------------------------------------------------------- bilevel cases
class Bilevel:
    """Lower ``z`` (a dict of tensors) minimises ``g(z, x)``; upper ``x`` minimises ``F(z', x)``.

    The lower problem starts at its optimum ``z*`` and runs plain SGD with ``lr``.
    """

    upper = "upper"

    def __init__(self, name: str, g: Callable, f: Callable, z_star: dict, x0: torch.Tensor, lr: float,
                 exact: torch.Tensor, info: dict):
        self.name, self.g, self.f, self.z_star, self.x0, self.lr = name, g, f, z_star, x0, lr
        self._exact, self.info = exact, info

    def graph(self, spec: Spec) -> mlo.Graph:
        z = {k: v.detach().clone().requires_grad_() for k, v in self.z_star.items()}
        x = self.x0.detach().clone().requires_grad_()
        lower = mlo.Problem("lower", z, lambda ctx, b: self.g(ctx["lower"], ctx["upper"]),
                            lambda p: torch.optim.SGD(p, lr=self.lr), reads=["upper"], steps=spec.steps,
                            engine=spec.engine())
        upper = mlo.Problem("upper", x, lambda ctx, b: self.f(ctx["lower"], ctx["upper"]),
                            lambda p: torch.optim.SGD(p, lr=1e-3), reads=["lower"])
        return mlo.Graph([lower, upper])

    def exact(self, spec: Spec) -> torch.Tensor:
        return self._exact


def dense_implicit(g: Callable, f: Callable, z_star: dict, x: torch.Tensor) -> torch.Tensor:
    """``∇_x F − (∂_x∇_z g)ᵀ H⁻¹ ∇_z F`` at ``z*`` with dense matrices (torch.func), independent of mlo."""
    keys = list(z_star)
    shapes = [z_star[k].shape for k in keys]
    sizes = [z_star[k].numel() for k in keys]

    def unflat(v):
        return {k: t.reshape(s) for k, t, s in zip(keys, torch.split(v, sizes), shapes)}

    z0 = common.flat(z_star).to(x.device)
    H = torch.func.hessian(lambda v: g(unflat(v), x))(z0)
    Mt = torch.func.jacrev(lambda xx: torch.func.grad(lambda v: g(unflat(v), xx))(z0))(x)   # (n_z, n_x)
    u = torch.func.grad(lambda v: f(unflat(v), x))(z0)
    direct = torch.func.grad(lambda xx: f(unflat(z0), xx))(x)
    return (direct.reshape(-1) - Mt.reshape(len(z0), -1).T @ torch.linalg.solve(H, u)).detach()


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=DT)


def ridge_case(size: str, seed: int, device) -> tuple[Bilevel, dict]:
    n, d, m = DIMS[size]["ridge"]
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -1, d, dtype=DT)
    X, Xv = _randn(gen, n, d) * scale, _randn(gen, m, d) * scale
    w_true = _randn(gen, d)
    y, yv = X @ w_true + 0.5 * _randn(gen, n), Xv @ w_true + 0.5 * _randn(gen, m)
    theta = torch.tensor([math.log(0.01)], dtype=DT)
    X, Xv, y, yv, theta = (t.to(device) for t in (X, Xv, y, yv, theta))
    lam = float(theta.exp())
    A = X.T @ X / n + lam * torch.eye(d, dtype=DT, device=device)
    w_star = torch.linalg.solve(A, X.T @ y / n)
    closed = -lam * w_star @ torch.linalg.solve(A, Xv.T @ (Xv @ w_star - yv) / m)

    def g(z, th):
        w = z["w"]
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * th.exp().sum() * (w * w).sum()

    def f(z, th):
        return 0.5 * ((Xv @ z["w"] - yv) ** 2).mean()

    eig = torch.linalg.eigvalsh(A)
    case = Bilevel("ridge", g, f, {"w": w_star}, theta, 1.0 / float(eig[-1]), closed.reshape(1),
                   {"lower_params": d, "upper_params": 1, "kappa": float(eig[-1] / eig[0])})
    dense = dense_implicit(g, f, {"w": w_star}, theta)
    return case, {"closed_vs_dense": common.rel_error(dense, case._exact)}


def quad_case(kappa: float, size: str, seed: int, device) -> tuple[Bilevel, dict]:
    dz, dx = DIMS[size]["quad"]
    gen = torch.Generator().manual_seed(seed + int(kappa))
    Q, _ = torch.linalg.qr(_randn(gen, dz, dz))
    i = torch.arange(dz, dtype=DT)
    eig = (kappa + 1) / 2 + (kappa - 1) / 2 * torch.cos(math.pi * (2 * i + 1) / (2 * dz))
    A = Q @ torch.diag(eig) @ Q.T
    A = (A + A.T) / 2
    S = _randn(gen, dx, dx)
    B = S @ S.T / dx + torch.eye(dx, dtype=DT)
    C = _randn(gen, dx, dz) / math.sqrt(dz)
    S = _randn(gen, dz, dz)
    Fzz = S @ S.T / dz
    Hx = torch.eye(dx, dtype=DT)
    K = _randn(gen, dx, dz) / math.sqrt(dz)
    a, b, fz, h, x0 = _randn(gen, dz), _randn(gen, dx), _randn(gen, dz), _randn(gen, dx), _randn(gen, dx)
    A, B, C, Fzz, Hx, K, a, b, fz, h, x0 = (t.to(device) for t in (A, B, C, Fzz, Hx, K, a, b, fz, h, x0))

    def g(zz, x):
        z = zz["z"]
        return 0.5 * z @ A @ z + 0.5 * x @ B @ x + x @ C @ z + a @ z + b @ x

    def f(zz, x):
        z = zz["z"]
        return 0.5 * z @ Fzz @ z + 0.5 * x @ Hx @ x + x @ K @ z + fz @ z + h @ x

    z_star = -torch.linalg.solve(A, C.T @ x0 + a)
    closed = (Hx @ x0 + K @ z_star + h) - C @ torch.linalg.solve(A, Fzz @ z_star + K.T @ x0 + fz)
    case = Bilevel(f"quad-k{int(kappa)}", g, f, {"z": z_star}, x0, 1.0 / float(eig.max()), closed,
                   {"lower_params": dz, "upper_params": dx, "kappa": float(eig.max() / eig.min())})
    dense = dense_implicit(g, f, {"z": z_star}, x0)
    return case, {"closed_vs_dense": common.rel_error(dense, closed)}


def logistic_case(size: str, seed: int, device) -> tuple[Bilevel, dict]:
    data = common.digits(seed)
    n = DIMS[size]["logistic"]
    X, y = data["x_train"][:n].to(device), data["y_train"][:n].to(device)
    Xv, yv = data["x_val"][: (n // 2 if n else None)].to(device), data["y_val"][: (n // 2 if n else None)].to(device)
    gen = torch.Generator().manual_seed(seed)
    theta0 = (math.log(1e-2) + 0.5 * _randn(gen, X.shape[1])).to(device)

    # no intercept: softmax is invariant to a common shift of the biases, which would make H singular

    def g(z, th):
        return F.cross_entropy(X @ z["W"], y) + 0.5 * (th.exp()[:, None] * z["W"] ** 2).sum()

    def f(z, th):
        return F.cross_entropy(Xv @ z["W"], yv)

    z, grad_norm = _newton(g, {"W": torch.zeros(X.shape[1], 10, dtype=DT, device=device)}, theta0)
    keys = list(z)
    sizes = [z[k].numel() for k in keys]
    shapes = [z[k].shape for k in keys]
    H = torch.func.hessian(lambda v: g({k: t.reshape(s) for k, t, s in zip(keys, torch.split(v, sizes), shapes)},
                                       theta0))(common.flat(z).to(device))
    eig = torch.linalg.eigvalsh(H)
    exact = dense_implicit(g, f, z, theta0)
    case = Bilevel("logistic", g, f, z, theta0, 1.0 / float(eig[-1]), exact,
                   {"lower_params": sum(sizes), "upper_params": X.shape[1], "kappa": float(eig[-1] / eig[0]),
                    "train_examples": X.shape[0]})
    return case, {"lower_grad_norm": grad_norm}


def _newton(g: Callable, z0: dict, x: torch.Tensor, iters: int = 50) -> tuple[dict, float]:
    """Solve ``min_z g(z, x)`` by damped Newton with dense Hessians; returns z* and ‖∇g(z*)‖."""
    keys = list(z0)
    sizes = [z0[k].numel() for k in keys]
    shapes = [z0[k].shape for k in keys]

    def fn(v):
        return g({k: t.reshape(s) for k, t, s in zip(keys, torch.split(v, sizes), shapes)}, x)

    v = common.flat(z0).to(x.device)
    gn = math.inf
    for _ in range(iters):
        grad = torch.func.grad(fn)(v)
        gn = float(grad.norm())
        if gn < 1e-12:
            break
        step = torch.linalg.solve(torch.func.hessian(fn)(v), grad)
        t, f0 = 1.0, float(fn(v))
        while float(fn(v - t * step)) > f0 - 0.25 * t * float(grad @ step) and t > 1e-8:
            t *= 0.5
        v = v - t * step
    gn = float(torch.func.grad(fn)(v).norm())
    return {k: t.reshape(s).clone() for k, t, s in zip(keys, torch.split(v, sizes), shapes)}, gn


# ----------------------------------------------------------------------------- the 4-level chain
class Chain:
    """E (explainer, reads A) → Δ (explanation bank, max, reads E') → W (audience, reads Δ') → A (reads E', W').

    ``f(x; E, A) = (Σ_k softmax(A)_k ⊙ act_k(x E₁)) E₂`` with tanh / sigmoid / softplus / identity;
    ``g(z; W) = tanh(z W₁) W₂``; Δ maximises Σ_i CE(f(x_i+δ_i), f(x_i)); W learns on x ⊙ δ'; A
    minimises CE(f(x_v; E', A)) + γ CE(g(x_v; W')). Plain SGD everywhere, float64.
    """

    name = "chain"
    upper = "A"
    LR: ClassVar[dict] = {"E": 0.1, "D": 0.5, "W": 0.1}
    GAMMA = 0.7

    def __init__(self, size: str, seed: int, device):
        p, h, nbank, n = DIMS[size]["chain"]
        c = 3
        gen = torch.Generator().manual_seed(seed)
        r = lambda *s: _randn(gen, *s).to(device)
        self.E0 = {"W1": r(p, h) / math.sqrt(p), "W2": r(h, c) / math.sqrt(h)}
        self.A0 = 0.5 * r(h, 4)
        self.W0 = {"V1": r(p, h) / math.sqrt(p), "V2": r(h, c) / math.sqrt(h)}
        self.D0 = 0.3 * r(nbank, p)
        cls = lambda m: torch.randint(0, c, (m,), generator=gen).to(device)
        self.xe, self.ye = r(n, p), cls(n)
        self.xa, self.ya = r(n, p), cls(n)
        self.idx = torch.randperm(nbank, generator=gen)[:n].to(device)
        self.xv, self.yv = r(n, p), cls(n)
        self.info = {"lower_params": sum(t.numel() for t in (*self.E0.values(), *self.W0.values(), self.D0)),
                     "upper_params": self.A0.numel(), "kappa": None}

    @staticmethod
    def f(x, E, A):
        z = x @ E["W1"]
        acts = torch.stack([torch.tanh(z), torch.sigmoid(z), F.softplus(z), z], dim=-1)
        return (acts * torch.softmax(A, dim=-1)).sum(-1) @ E["W2"]

    @staticmethod
    def g(x, W):
        return torch.tanh(x @ W["V1"]) @ W["V2"]

    def loss_E(self, E, A):
        return F.cross_entropy(self.f(self.xe, E, A), self.ye)

    def loss_D(self, D, E, A_const):
        return explanation_loss(self.f(self.xa + D[self.idx], E, A_const), self.f(self.xa, E, A_const))

    def loss_W(self, W, D):
        return F.cross_entropy(self.g(self.xa * D[self.idx], W), self.ya)

    def loss_A(self, E, W, A):
        return F.cross_entropy(self.f(self.xv, E, A), self.yv) + self.GAMMA * F.cross_entropy(self.g(self.xv, W),
                                                                                              self.yv)

    def graph(self, spec: Spec) -> mlo.Graph:
        E = {k: v.clone().requires_grad_() for k, v in self.E0.items()}
        W = {k: v.clone().requires_grad_() for k, v in self.W0.items()}
        D = self.D0.clone().requires_grad_()
        A = self.A0.clone().requires_grad_()
        sgd = lambda lr: (lambda ps: torch.optim.SGD(ps, lr=lr))
        s, eng = spec.steps, spec.engine
        return mlo.Graph([
            mlo.Problem("E", E, lambda ctx, b: self.loss_E(ctx["E"], ctx["A"]), sgd(self.LR["E"]), reads=["A"],
                        steps=s, engine=eng()),
            mlo.Problem("D", D, lambda ctx, b: self.loss_D(ctx["D"], ctx["E"], A.detach()), sgd(self.LR["D"]),
                        reads=["E"], mode="max", steps=s, engine=eng()),
            mlo.Problem("W", W, lambda ctx, b: self.loss_W(ctx["W"], ctx["D"]), sgd(self.LR["W"]), reads=["D"],
                        steps=s, engine=eng()),
            mlo.Problem("A", A, lambda ctx, b: self.loss_A(ctx["E"], ctx["W"], ctx["A"]), sgd(1e-3),
                        reads=["E", "W"]),
        ])

    def exact(self, spec: Spec) -> torch.Tensor:
        """d O_A / dA through S steps of every level, by plain autograd (create_graph)."""
        A = self.A0.clone().requires_grad_()
        E, D, W = dict(self.E0), {"D": self.D0}, dict(self.W0)
        for _ in range(spec.steps):
            E = _sgd(E, lambda e: self.loss_E(e, A), self.LR["E"])
        for _ in range(spec.steps):   # ascent: the explanation problem maximises
            D = _sgd(D, lambda d: -self.loss_D(d["D"], E, A.detach()), self.LR["D"])
        for _ in range(spec.steps):
            W = _sgd(W, lambda w: self.loss_W(w, D["D"]), self.LR["W"])
        return torch.autograd.grad(self.loss_A(E, W, A), A)[0].detach().reshape(-1)


def _sgd(params: dict, loss_fn: Callable, lr: float) -> dict:
    """One differentiable SGD step ``p − lr ∇_p loss_fn(p)`` (graph kept for higher derivatives)."""
    p = {k: (v if v.requires_grad else v.detach().requires_grad_()) for k, v in params.items()}
    gs = torch.autograd.grad(loss_fn(p), list(p.values()), create_graph=True)
    return {k: v - lr * gk for (k, v), gk in zip(p.items(), gs)}


# ----------------------------------------------------------------------------- FD on a ReLU supernet
SUPERNET_EPS = (1e-2, 1e-3, 1e-4, 1e-6)


def supernet_fd(size: str, seed: int, device) -> list[dict]:
    """DARTS' finite difference against the exact one-step term on the DARTS supernet (float64).

    ReLU and max-pool make ∇_A ℓ(w) piecewise smooth in w: a central difference
    whose ±ε points straddle a kink measures the jump, not the mixed derivative.
    (Costs: see ``benchmarks.lease_step``; here only the error is measured.)
    """
    from . import nas

    def hyper(**engine):
        cfg = nas.config(size, mode="baseline", dtype="float64",
                         **{f"engines.explainer.{k}": v for k, v in engine.items()})
        graph = nas.mlo_step(nas.fixture(cfg, size, seed, device, torch.float64))[1]
        return common.flat(mlo.hypergradient(graph, "architecture")["hyper"])
    exact = hyper(name="unrolled")
    return [{"engine": f"finite difference eps={e:g}", "eps": e,
             "rel_error": common.rel_error(hyper(name="finite_difference", eps=e), exact)} for e in SUPERNET_EPS]


# ----------------------------------------------------------------------------- running
CASES = {
    "ridge": ridge_case,
    "quad-k10": lambda size, seed, device: quad_case(10.0, size, seed, device),
    "quad-k100": lambda size, seed, device: quad_case(100.0, size, seed, device),
    "quad-k1000": lambda size, seed, device: quad_case(1000.0, size, seed, device),
    "logistic": logistic_case,
    "chain": lambda size, seed, device: (Chain(size, seed, device), {}),
}


def make_cases(size: str, seed: int, device, names=None) -> tuple[list, dict]:
    """The cases (all, or those in ``names``), plus the side checks computed while building them."""
    cases, extra = [], {}
    for name, build in CASES.items():
        if names is None or name in names:
            case, extra[name] = build(size, seed, device)
            cases.append(case)
    return cases, extra


def hypergradient(case, spec: Spec) -> torch.Tensor:
    return common.flat(mlo.hypergradient(case.graph(spec), case.upper)["total"])


def _stepper_fn(case, spec: Spec) -> Callable[[], object]:
    stepper = mlo.Stepper(case.graph(spec), nan_policy="off")
    return lambda: stepper.direction(case.upper)


def memory_child(case_name: str, size: str, seed: int, device: str, spec_list: list, warmup: int) -> dict:
    """(child process) Peak extra bytes of one hypergradient for each spec of one case."""
    torch.manual_seed(seed)
    case = make_cases(size, seed, device, names=[case_name])[0][0]
    out = {}
    for fam, k in spec_list:
        spec = Spec(fam, k)
        out[spec.label] = common.step_peak(lambda spec=spec: _stepper_fn(case, spec), device, warmup)
    return out


def side_checks(cases: list, extra: dict, size: str) -> list[dict]:
    """Accuracy checks with documented tolerances (TOL), independent of the K grid."""
    by = {c.name: c for c in cases}
    checks = [common.check(f"{n}: closed form vs dense implicit", extra[n]["closed_vs_dense"],
                           TOL["closed_form_vs_dense"]) for n in ("ridge", "quad-k10", "quad-k100", "quad-k1000")]
    checks.append(common.check("logistic: lower problem solved (‖∇g(z*)‖)", extra["logistic"]["lower_grad_norm"],
                               TOL["logistic_solved"]))
    q = by["quad-k10"]
    checks.append(common.check("quad-k10: finite difference = one-step (quadratic lower loss)",
                               common.rel_error(hypergradient(q, Spec("finite_difference")),
                                                hypergradient(q, Spec("unrolled", 1))),
                               TOL["fd_equals_one_step_on_quadratic"]))
    checks.append(common.check("quad-k10: Unrolled(5) at z* = Neumann(4, α=lr)",
                               common.rel_error(hypergradient(q, Spec("unrolled", 5)), hypergradient(q, Spec("neumann", 4))),
                               TOL["neumann_equals_unrolled_at_optimum"]))
    r = by["ridge"]
    n = r.info["lower_params"]
    checks.append(common.check(f"ridge: CG({2 * n}) vs exact", common.rel_error(hypergradient(r, Spec("cg", 2 * n)),
                                                                               r.exact(Spec("cg", 2 * n))),
                               TOL["cg_converged"]))
    ch = by["chain"]
    for k in CHAIN_UNROLL[size][:2]:
        sp = Spec("unrolled", k)
        checks.append(common.check(f"chain: Unrolled({k}) vs autograd composition",
                                   common.rel_error(hypergradient(ch, sp), ch.exact(sp)), TOL["chain_unrolled_exact"]))
    sp = Spec("finite_difference")
    checks.append(common.check("chain: finite difference vs autograd composition",
                               common.rel_error(hypergradient(ch, sp), ch.exact(sp)), TOL["chain_fd"]))
    return checks


def run(args) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cases, extra = make_cases(args.size, args.seed, device)
    rows = []
    for case in cases:
        spec_list = specs(args.size, chain=isinstance(case, Chain))
        errors, fns = {}, {}
        for sp in spec_list:
            errors[sp.label] = common.rel_error(hypergradient(case, sp), case.exact(sp))
            fns[sp.label] = _stepper_fn(case, sp)
        times = common.time_interleaved(fns, args.reps, args.warmup, device)
        mem = {}
        if not args.no_memory and common.memory_supported(device):
            mem = common.isolated("benchmarks.hypergrad:memory_child", device, case_name=case.name, size=args.size,
                                  seed=args.seed, device=str(device), spec_list=[(s.family, s.k) for s in spec_list],
                                  warmup=args.warmup)
        for sp in spec_list:
            t = common.summary(times[sp.label])
            rows.append({"case": case.name, "engine": sp.family, "k": sp.k, "label": sp.label,
                         "rel_error": errors[sp.label], "time_ms": common.ms(t["median"]),
                         "time_q25_ms": common.ms(t["q25"]), "time_q75_ms": common.ms(t["q75"]),
                         "peak_mib": common.mib(mem.get(sp.label))})
        print(f"  {case.name}: {len(spec_list)} engine configurations done", file=sys.stderr)
    checks = side_checks(cases, extra, args.size)
    fd_rows = supernet_fd(args.size, args.seed, device)
    return {"cases": {c.name: c.info for c in cases}, "rows": rows, "supernet_fd": fd_rows, "checks": checks,
            "tolerances": TOL, "goals": []}


TARGETS = (1e-2, 1e-6)


def cheapest(result: dict) -> list[dict]:
    """Per case and engine family: the fastest configuration whose error is within each target."""
    out = []
    for case in result["cases"]:
        row = {"case": case}
        for fam in ("unrolled", "neumann", "cg"):
            for tgt in TARGETS:
                ok = [r for r in result["rows"] if r["case"] == case and r["engine"] == fam and r["rel_error"] <= tgt]
                best = min(ok, key=lambda r: r["time_ms"], default=None)
                row[f"{fam}@{tgt:g}"] = f"K={best['k']}: {common.fmt(best['time_ms'])} ms" if best else "not reached"
        out.append(row)
    return out


def markdown(result: dict) -> str:
    summary_cols = [("case", "case")] + [(f"{f}@{t:g}", f"{n} ≤ {t:g}") for f, n in
                                          (("unrolled", "unrolled"), ("neumann", "Neumann"), ("cg", "CG"))
                                          for t in TARGETS]
    head = ("Cheapest configuration reaching a relative error (time per hypergradient):\n\n"
            + common.markdown_table(cheapest(result), summary_cols))
    cols = [("label", "engine"), ("rel_error", "rel. error"), ("time_ms", "time/hypergrad (ms)"),
            ("iqr", "IQR (ms)"), ("peak_mib", "peak (MiB)")]
    parts = [head]
    for name, info in result["cases"].items():
        rows = [dict(r, iqr=f"{common.fmt(r['time_q25_ms'])}–{common.fmt(r['time_q75_ms'])}")
                for r in result["rows"] if r["case"] == name]
        kappa = f", κ = {common.fmt(info['kappa'])}" if info.get("kappa") else ""
        parts.append(f"### {name} ({info['lower_params']} lower / {info['upper_params']} upper parameters{kappa})\n\n"
                     + common.markdown_table(rows, cols))
    parts.append("### finite difference on the DARTS supernet (float64, vs the exact one-step term)\n\n"
                 + common.markdown_table(result["supernet_fd"], [("engine", "engine"), ("rel_error", "rel. error")]))
    parts.append(common.checks_markdown(result["checks"]))
    return "\n\n".join(parts)


def plot(result: dict, path: str) -> None:
    import matplotlib.pyplot as plt
    names = list(result["cases"])
    cols = 3
    rows_n = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 4 * rows_n), squeeze=False)
    styles = {"unrolled": ("tab:blue", "o-"), "neumann": ("tab:orange", "s-"), "cg": ("tab:green", "^-"),
              "finite_difference": ("tab:red", "D"), "first_order": ("tab:gray", "x")}
    for ax, name in zip(axes.flat, names):
        rows = [r for r in result["rows"] if r["case"] == name]
        for fam, (color, style) in styles.items():
            # errors are drawn within [1e-16, 1e3]: an implicit engine that diverges sits on the top edge
            pts = [(r["time_ms"], min(max(r["rel_error"], 1e-16), 1e3), r["k"]) for r in rows
                   if r["engine"] == fam and r["rel_error"] == r["rel_error"]]
            if not pts:
                continue
            xs, ys, _ = zip(*pts)
            label = {"unrolled": "unrolled K (K=1: one-step)", "neumann": "Neumann K", "cg": "CG K",
                     "finite_difference": "finite difference", "first_order": "first-order"}[fam]
            ax.plot(xs, ys, style, color=color, label=label, markersize=5)
            if fam in ("unrolled", "neumann", "cg"):
                for x, y, k in pts:
                    ax.annotate(str(k), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("time per hypergradient (ms)")
        ax.set_ylabel("relative error")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = common.finish_args(common.parser("hypergrad", __doc__.splitlines()[0], reps=7, warmup=1).parse_args(argv))
    result = run(args)
    common.write_outputs(args, result, markdown(result), lambda p: plot(result, p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
