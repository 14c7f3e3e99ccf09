"""Nested hypergradients: a problem whose update includes a hypergradient is read by a later one.

Every exact claim is checked against a plain-autograd float64 reference written out
by hand: the outer step's problems run as functions (``create_graph`` everywhere, each
problem's update direction = gradient + its own hypergradient), then the last
objective is differentiated with respect to the hyperparameter.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import mlo

D = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _hyper(graph, name) -> torch.Tensor:
    """``mlo.hypergradient(graph, name)["total"]`` of a one-tensor problem."""
    t = mlo.hypergradient(graph, name)["total"]
    return t[""] if isinstance(t, dict) else t


def _grad(out, wrt, create_graph=True):
    return torch.autograd.grad(out, wrt, create_graph=create_graph)[0]


# ---------------------------------------------------------------- the reweighting + ridge chain
N, NV, DIM = 12, 8, 3
LR_M, LR_A, LR_M2 = 0.3, 2.0, 0.25


def _chain_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=D)   # noqa: E731
    return dict(X=r(N, DIM), y=r(N), Xv=r(NV, DIM), yv=r(NV), Xt=r(NV, DIM), yt=r(NV),
                m0=0.3 * r(DIM), a0=0.5 * r(N), m20=0.3 * r(DIM), rho0=torch.tensor([-0.7], dtype=D))


def _train(X, y, m, a, rho):          # level 1 (and its re-fit): ridge on weighted data
    return (torch.sigmoid(a) * (X @ m - y) ** 2).mean() + rho.exp().sum() * (m * m).sum()


def _val(X, y, m):
    return ((X @ m - y) ** 2).mean()


def chain_graph(d, model_engine=None, weights_engine=None, model2_engine=None, steps=1):
    m, a, m2, rho = (d[k].clone().requires_grad_(True) for k in ("m0", "a0", "m20", "rho0"))
    sgd = lambda lr: (lambda p: torch.optim.SGD(p, lr=lr))   # noqa: E731
    model = mlo.Problem("model", m, lambda ctx, b: _train(d["X"], d["y"], ctx["model"], ctx["weights"], ctx["reg"]),
                        sgd(LR_M), reads=["weights", "reg"], engine=model_engine, steps=steps)
    weights = mlo.Problem("weights", a, lambda ctx, b: _val(d["Xv"], d["yv"], ctx["model"]), sgd(LR_A),
                          reads=["model"], engine=weights_engine)
    model2 = mlo.Problem("model2", m2,
                         lambda ctx, b: _train(d["X"], d["y"], ctx["model2"], ctx["weights"], ctx["reg"]),
                         sgd(LR_M2), reads=["weights", "reg"], engine=model2_engine)
    reg = mlo.Problem("reg", rho, lambda ctx, b: _val(d["Xt"], d["yt"], ctx["model2"]),
                      lambda p: torch.optim.Adam(p, lr=0.01), reads=["model2"])
    return mlo.Graph([model, weights, model2, reg])


def chain_reference(d, steps=1, nested=True):
    """d(level-3 objective)/d rho of the composed step, by plain autograd."""
    rho = d["rho0"].clone().requires_grad_(True)
    a = d["a0"].clone().requires_grad_(True)         # the weights' own value: the model's step is a function of it

    def model_after(a_, rho_):
        m = d["m0"].clone().requires_grad_(True)
        for _ in range(steps):
            m = m - LR_M * _grad(_train(d["X"], d["y"], m, a_, rho_), m)
        return m
    m1 = model_after(a, rho)
    # the weights' update: the hypergradient of the validation loss through the model's step
    a1 = a - LR_A * _grad(_val(d["Xv"], d["yv"], m1), a)
    if not nested:   # the formula before: the weights' update as a constant of rho
        a1 = a1.detach()
    m2 = d["m20"].clone().requires_grad_(True)
    m2 = m2 - LR_M2 * _grad(_train(d["X"], d["y"], m2, a1, rho), m2)
    return _grad(_val(d["Xt"], d["yt"], m2), rho, create_graph=False)


def test_chain_of_the_issue_is_exact_with_unrolled():
    d = _chain_data()
    graph = chain_graph(d)
    assert not graph.dropped_paths
    got = _hyper(graph, "reg")
    ref = chain_reference(d)
    assert _rel(got, ref) <= 1e-10, (got, ref)
    old = chain_reference(d, nested=False)
    assert _rel(old, ref) > 1e-3          # the term matters here


# ---------------------------------------------------------------- a five-problem distillation chain
# teacher (reads temp; momentum SGD, 2 steps) -> student (reads teacher, gate; Nesterov SGD) ->
# gate (per-example weights, reads student; Adam, 2 steps, each with its hypergradient) ->
# student2 (reads gate and teacher; SGD with momentum and weight decay) -> temp (reads student2).
# The gate's hypergradient depends on the teacher's solution (read by the student), which depends
# on temp: a term inside the gate's update that temp's hypergradient must differentiate.
LR_T, MU_T, LR_S, MU_S, LR_G, LR_S2, MU_S2, WD_S2 = 0.2, 0.9, 0.3, 0.5, 0.05, 0.2, 0.9, 0.01
BETAS, EPS = (0.9, 0.999), 1e-8


def _distill_data(seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=D)   # noqa: E731
    return dict(X=r(N, DIM), y=r(N), Xv=r(NV, DIM), yv=r(NV), Xt=r(NV, DIM), yt=r(NV),
                t0=0.3 * r(DIM), s0=0.3 * r(DIM), g0=0.5 * r(N), s20=0.3 * r(DIM), tau0=torch.tensor(-0.4, dtype=D))


def _teacher_loss(d, t, tau):
    return ((d["X"] @ t - d["y"]) ** 2).mean() + tau.exp() * (t * t).sum()


def _student_loss(d, s, t, gate):
    return (torch.sigmoid(gate) * (d["X"] @ s - d["X"] @ t) ** 2).mean() + 0.1 * (s * s).sum()


def _gate_loss(d, s, gate):
    return ((d["Xv"] @ s - d["yv"]) ** 2).mean() + 0.01 * (gate * gate).sum()


def distill_graph(d, gate_engine=None, student_engine=None):
    t, s, gt, s2, tau = (d[k].clone().requires_grad_(True) for k in ("t0", "s0", "g0", "s20", "tau0"))
    teacher = mlo.Problem("teacher", t, lambda c, b: _teacher_loss(d, c["teacher"], c["temp"]),
                          lambda p: torch.optim.SGD(p, lr=LR_T, momentum=MU_T), reads=["temp"], steps=2,
                          engine=mlo.Unrolled(steps=2))
    student = mlo.Problem("student", s, lambda c, b: _student_loss(d, c["student"], c["teacher"], c["gate"]),
                          lambda p: torch.optim.SGD(p, lr=LR_S, momentum=MU_S, nesterov=True),
                          reads=["teacher", "gate"], engine=student_engine)
    gate = mlo.Problem("gate", gt, lambda c, b: _gate_loss(d, c["student"], c["gate"]),
                       lambda p: torch.optim.Adam(p, lr=LR_G, betas=BETAS, eps=EPS), reads=["student"], steps=2,
                       engine=gate_engine or mlo.Unrolled(steps=2))
    student2 = mlo.Problem("student2", s2, lambda c, b: _student_loss(d, c["student2"], c["teacher"], c["gate"]),
                           lambda p: torch.optim.SGD(p, lr=LR_S2, momentum=MU_S2, weight_decay=WD_S2),
                           reads=["gate", "teacher"])
    temp = mlo.Problem("temp", tau, lambda c, b: ((d["Xt"] @ c["student2"] - d["yt"]) ** 2).mean(),
                       lambda p: torch.optim.SGD(p, lr=0.1), reads=["student2"])
    return mlo.Graph([teacher, student, gate, student2, temp])


def distill_reference(d):
    tau = d["tau0"].clone().requires_grad_(True)
    t, buf = d["t0"].clone().requires_grad_(True), None
    for _ in range(2):                                   # momentum SGD, two steps
        g = _grad(_teacher_loss(d, t, tau), t)
        buf = g if buf is None else MU_T * buf + g
        t = t - LR_T * buf

    def student_after(gate):                             # Nesterov, first step: buf = g, d = g + mu*buf
        s = d["s0"].clone().requires_grad_(True)
        return s - LR_S * (1 + MU_S) * _grad(_student_loss(d, s, t, gate), s)
    g0 = d["g0"].clone().requires_grad_(True)
    s1 = student_after(g0)
    # the gate's hypergradient: through the student's step at the gate's value before its steps
    hyper = _grad(_gate_loss(d, s1, g0.detach()), g0)
    gate, m, v = g0, None, None
    for k in (1, 2):                                     # Adam, two steps, each with the same hypergradient
        direction = _grad(_gate_loss(d, s1.detach(), gate), gate) + hyper
        m = (1 - BETAS[0]) * direction if m is None else BETAS[0] * m + (1 - BETAS[0]) * direction
        v = (1 - BETAS[1]) * direction ** 2 if v is None else BETAS[1] * v + (1 - BETAS[1]) * direction ** 2
        gate = gate - LR_G / (1 - BETAS[0] ** k) * m / (v.sqrt() / (1 - BETAS[1] ** k) ** 0.5 + EPS)
    s2 = d["s20"].clone().requires_grad_(True)
    step = _grad(_student_loss(d, s2, t, gate), s2) + WD_S2 * s2    # momentum, first step: buf = d
    s2 = s2 - LR_S2 * step
    return _grad(((d["Xt"] @ s2 - d["yt"]) ** 2).mean(), tau, create_graph=False)


def test_distillation_chain_with_momentum_and_adam_is_exact():
    d = _distill_data()
    graph = distill_graph(d)
    assert not graph.dropped_paths
    nested = {s.problem for p in graph.plans.values() for s in p.sweep if s.nested}
    assert nested == {"gate"}
    got = _hyper(graph, "temp")
    ref = distill_reference(d)
    assert _rel(got, ref) <= 1e-10, (got, ref)
