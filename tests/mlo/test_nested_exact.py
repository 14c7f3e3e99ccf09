"""Nested hypergradients: a problem whose update includes a hypergradient is read by a later one.

Every exact claim is checked against a plain-autograd float64 reference written out
by hand: the outer step's problems run as functions (``create_graph`` everywhere, each
problem's update direction = gradient + its own hypergradient), then the last
objective is differentiated with respect to the hyperparameter.
"""
from __future__ import annotations

import dataclasses
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


def chain_graph(d, model_engine=None, weights_engine=None, model2_engine=None, steps=1, decay=0.0, **weights_kw):
    m, a, m2, rho = (d[k].clone().requires_grad_(True) for k in ("m0", "a0", "m20", "rho0"))
    sgd = lambda lr: (lambda p: torch.optim.SGD(p, lr=lr))   # noqa: E731
    model = mlo.Problem("model", m, lambda ctx, b: _train(d["X"], d["y"], ctx["model"], ctx["weights"], ctx["reg"]),
                        sgd(LR_M), reads=["weights", "reg"], engine=model_engine, steps=steps)
    sign = -1.0 if weights_kw.get("mode") == "max" else 1.0
    weights_kw["steps"] = weights_kw.pop("steps_weights", 1)
    weights = mlo.Problem("weights", a, lambda ctx, b: sign * (_val(d["Xv"], d["yv"], ctx["model"]) + decay * (
                          ctx["weights"] ** 2).sum()), weights_kw.pop("optimizer", sgd(LR_A)),
                          reads=["model"], engine=weights_engine, **weights_kw)
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


# ---------------------------------------------------------------- what an approximate engine drops
PATH = ("reg", "model", "weights", "model2")


@pytest.mark.parametrize("where, engine, reason", [
    ("model", mlo.FiniteDifference(), "FiniteDifference on edge model->weights inside the hypergradient of 'weights'"),
    ("model", mlo.CG(iterations=5), "CG on edge model->weights inside the hypergradient of 'weights'"),
    ("model", mlo.Neumann(iterations=5), "Neumann on edge model->weights"),
    ("weights", mlo.FiniteDifference(), "FiniteDifference on edge weights->model differentiates only the gradient"),
    ("weights", mlo.FirstOrder(), "FirstOrder, the engine of 'weights', does not differentiate its hypergradient"),
])
def test_an_approximate_engine_inside_names_the_dropped_path_once(where, engine, reason):
    d = _chain_data()
    with pytest.warns(UserWarning, match="reg -> model -> weights -> model2") as caught:
        graph = chain_graph(d, **{f"{where}_engine": engine})
    assert len([w for w in caught if "not differentiated exactly" in str(w.message)]) == 1
    assert [(p.problem, p.path) for p in graph.dropped_paths] == [("reg", PATH)]
    assert reason in graph.dropped_paths[0].reason
    assert f"not exact for reg: {' -> '.join(PATH)} (" in repr(graph)
    if isinstance(engine, mlo.FiniteDifference):   # quadratic in the model: the difference is exact, only the
        got = _hyper(graph, "reg")                  # nested term is missing, as it was before
        assert _rel(got, chain_reference(d, nested=False)) <= 1e-8


def test_exact_graphs_name_no_path_and_warn_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for graph in (chain_graph(_chain_data()), distill_graph(_distill_data()),
                      chain_graph(_chain_data(), weights_engine=mlo.Unrolled(reuse_step_graph=True))):
            assert graph.dropped_paths == []
            assert "not exact" not in repr(graph)


def test_reuse_step_graph_on_the_nested_problem_falls_back_to_the_exact_recomputation():
    d = _chain_data()
    graph = chain_graph(d, weights_engine=mlo.Unrolled(reuse_step_graph=True),
                        model_engine=mlo.Unrolled(reuse_step_graph=True))
    assert _rel(_hyper(graph, "reg"), chain_reference(d)) <= 1e-10


def test_a_multi_step_model_is_exact_too():
    d = _chain_data(2)
    graph = chain_graph(d, model_engine=mlo.Unrolled(steps=3), steps=3)
    assert _rel(_hyper(graph, "reg"), chain_reference(d, steps=3)) <= 1e-10


def test_check_hypergradient_says_ok_on_the_chain():
    report = mlo.check_hypergradient(chain_graph(_chain_data()), "reg")
    assert report.ok, str(report)


# ---------------------------------------------------------------- the shipped applications have no such path
def _no_nested_path(graph: mlo.Graph) -> None:
    """No sweep differentiates a hypergradient or reaches a value through one, so every plan is the one
    of direct reads only and the stepper runs exactly the VJPs it ran before."""
    assert graph.dropped_paths == []
    for plan in graph.plans.values():
        for s in plan.sweep:
            assert not s.nested, s
            assert all(r in graph.problems[s.problem].reads for r, _ in s.wrt), s


def _same_without_the_feature(graph: mlo.Graph, name: str, monkeypatch) -> None:
    batches = mlo.check.draw_batches(graph, name)
    on = mlo.hypergradient(graph, name, batches=batches)["total"]
    monkeypatch.setattr(mlo.Unrolled, "exact_nested", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a graph with a nested path says what the patch drops
        off_graph = graph.with_engines(lambda e: e)
    off = mlo.hypergradient(off_graph, name, batches=batches)["total"]
    monkeypatch.undo()
    flat = lambda t: torch.cat([v.reshape(-1) for v in (t.values() if isinstance(t, dict) else [t])])  # noqa: E731
    assert torch.equal(flat(on), flat(off))


def test_lease_search_graph_has_no_nested_path(monkeypatch):
    from tests.lease.tiny_graph import exact_config, tiny_lease_graph
    for engine in ("unrolled", "finite_difference"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            graph = tiny_lease_graph(exact_config(engine))[0]
        _no_nested_path(graph)
    _same_without_the_feature(graph, "architecture", monkeypatch)
    _same_without_the_feature(tiny_lease_graph(exact_config("unrolled"))[0], "architecture", monkeypatch)


def test_hpo_reweight_and_ignore_graphs_have_no_nested_path(monkeypatch):
    from applications.hpo import problems as hpo
    from applications.ignore import problems as ignore
    from applications.reweight import problems as reweight
    f64 = lambda d: dataclasses.replace(d, **{k: (getattr(d, k)[0].double(), getattr(d, k)[1])  # noqa: E731
                                              for k in ("train", "val", "test")})
    h = f64(hpo.load_data(0, 5, 5, 2))
    graph = hpo.build_graph(h, mlo.Unrolled(steps=2), inner_lr=0.1, momentum=0.9, inner_steps=2, hyper_lr=0.01,
                            init_weight_decay=1e-3)[0]
    _no_nested_path(graph)
    _same_without_the_feature(graph, "hyper", monkeypatch)
    r = f64(reweight.load_data(0, imbalance=20.0, noise=0.2, val_per_class=5, test_fraction=0.4))
    for method in ("meta_weight_net", "weight_table"):
        graph = reweight.build_graph(r, method, seed=0, hidden=0, lr=0.1, momentum=0.9, batch_size=10)[0]
        _no_nested_path(graph)
    _same_without_the_feature(graph, "weights", monkeypatch)
    small = ignore.load_data(0, 6, 0.4, 3, 3, 0)
    data = ignore.Data(*[(x.double(), y) for x, y in (small.source, small.target_train, small.target_val,
                                                       small.target_test)], small.corrupted)
    for method in ("three_level", "two_level"):
        graph = ignore.build_graph(data, method, pretrain_engine=mlo.Unrolled(steps=2),
                                   finetune_engine=mlo.CG(iterations=3), pretrain_steps=2, finetune_steps=2,
                                   lr=0.1, momentum=0.9, ignore_lr=0.1, gamma=0.1, source_decay=1e-3)[0]
        _no_nested_path(graph)
    _same_without_the_feature(graph, "ignore", monkeypatch)


def test_the_two_checks_above_fail_on_a_graph_with_a_nested_path(monkeypatch):
    graph = chain_graph(_chain_data())
    with pytest.raises(AssertionError):
        _no_nested_path(graph)
    with pytest.raises(AssertionError):
        _same_without_the_feature(graph, "reg", monkeypatch)


# ---------------------------------------------------------------- DenseImplicit, where it applies
DECAY = 0.3


def _model_after(d, a, rho):
    m = d["m0"].clone().requires_grad_(True)
    return m - LR_M * _grad(_train(d["X"], d["y"], m, a, rho), m)


def _obj_after_model2(d, a1, rho):
    m2 = d["m20"].clone().requires_grad_(True)
    m2 = m2 - LR_M2 * _grad(_train(d["X"], d["y"], m2, a1, rho), m2)
    return _val(d["Xt"], d["yt"], m2)


def test_dense_implicit_on_the_nested_problem_solves_with_its_whole_direction():
    """The weights' update direction is D(a) = 2·decay·a + (its hypergradient through the model); at its
    solution a' the implicit derivative is −(∂D/∂x)ᵀ (∂D/∂a)⁻ᵀ u for x = the model's solution and rho."""
    d = _chain_data()
    graph = chain_graph(d, weights_engine=mlo.DenseImplicit(), decay=DECAY)
    assert graph.dropped_paths == []
    rho = d["rho0"].clone().requires_grad_(True)
    a0 = d["a0"].clone().requires_grad_(True)
    m1 = _model_after(d, a0, rho)
    hyper = _grad(_val(d["Xv"], d["yv"], m1), a0)
    a1 = (a0 - LR_A * (2 * DECAY * a0 + hyper)).detach().requires_grad_(True)
    obj = _obj_after_model2(d, a1, rho)
    direct, u = torch.autograd.grad(obj, [rho, a1])

    def direction(a, m, r):     # the weights' update direction at a, from the model's record (a0, rho)
        at = d["a0"].clone().requires_grad_(True)
        m_rec = _model_after(d, at, r)
        mm = m if m.requires_grad else m.clone().requires_grad_(True)
        seed = _grad(_val(d["Xv"], d["yv"], mm), mm)
        return 2 * DECAY * a + torch.autograd.grad(m_rec, at, seed, create_graph=True)[0]
    jac = torch.autograd.functional.jacobian(lambda a: direction(a, m1.detach(), rho.detach()), a1.detach())
    q = torch.linalg.solve(jac.T, u)
    ref = direct - torch.autograd.grad(direction(a1.detach(), m1, rho), rho, q)[0]
    assert _rel(_hyper(graph, "reg"), ref) <= 1e-10


def test_dense_implicit_inside_the_nested_hypergradient_is_differentiated():
    """The model's edges on DenseImplicit: the weights' hypergradient is −Mᵀ H⁻¹ ∇val at the model's
    solution m', and reg's hypergradient differentiates it (through m', rho and the solve); m' moves with
    rho by the implicit derivative −H⁻¹ ∂²L/∂m∂rho, which the engine on model->reg takes."""
    d = _chain_data()
    graph = chain_graph(d, model_engine=mlo.DenseImplicit())
    assert graph.dropped_paths == []
    rho0, a0 = d["rho0"], d["a0"]
    m_sol = _model_after(d, a0, rho0).detach()
    hess = torch.autograd.functional.hessian(lambda m: _train(d["X"], d["y"], m, a0, rho0), m_sol)
    cross = torch.autograd.functional.jacobian(
        lambda r: torch.autograd.functional.jacobian(lambda m: _train(d["X"], d["y"], m, a0, r), m_sol,
                                                     create_graph=True), rho0)
    rho = rho0.clone().requires_grad_(True)
    m1 = m_sol + (-torch.linalg.solve(hess, cross.reshape(DIM, -1)) @ (rho - rho0))   # m'(rho), to first order

    def implicit_hyper(m, r):   # −(∂²L/∂m∂a)ᵀ H⁻¹ ∇val at (m, a0, r), differentiable in m and r
        at = a0.clone().requires_grad_(True)
        mm = m if m.requires_grad else m.clone().requires_grad_(True)
        g = _grad(_train(d["X"], d["y"], mm, at, r), mm)
        h = torch.stack([_grad(g[i], mm) for i in range(DIM)])
        q = torch.linalg.solve(h.T, _grad(_val(d["Xv"], d["yv"], mm), mm))
        return -torch.autograd.grad(g, at, q, create_graph=True)[0]
    a1 = a0 - LR_A * implicit_hyper(m1, rho)
    ref = _grad(_obj_after_model2(d, a1, rho), rho, create_graph=False)
    assert _rel(_hyper(graph, "reg"), ref) <= 1e-10


# ---------------------------------------------------------------- more update rules, against a central difference
def _composed_difference(make_graph, h=1e-5) -> torch.Tensor:
    """d(reg's objective)/d rho of the step mlo really runs, by a central difference in rho."""
    values = []
    for sgn in (1.0, -1.0):
        d = _chain_data(4)
        d["rho0"] = d["rho0"] + sgn * h
        values.append(mlo.Stepper(make_graph(d), nan_policy="off").direction("reg").loss)
    return (values[0] - values[1]) / (2 * h)


@pytest.mark.parametrize("kw", [
    dict(mode="max"),                                                   # the weights maximize −val
    dict(grad_clip=0.02, decay=0.1),                                    # an active clip on the whole direction
    dict(steps_w=2, optimizer=lambda p: torch.optim.Adam(p, lr=0.05)),  # two Adam steps, each with its hypergradient
    dict(optimizer=lambda p: torch.optim.SGD(p, lr=LR_A, momentum=0.9, nesterov=True, weight_decay=0.01)),
], ids=["max", "clip", "adam2", "nesterov"])
def test_update_rules_of_the_nested_problem(kw):
    def make(d):
        k = dict(kw)
        steps = k.pop("steps_w", 1)
        return chain_graph(d, weights_engine=mlo.Unrolled(steps=steps), steps_weights=steps, **k)
    got = _hyper(make(_chain_data(4)), "reg")
    assert _rel(got, _composed_difference(make)) <= 1e-7


# ---------------------------------------------------------------- a hypergradient inside a hypergradient
# inner (reads outer's value and reg) -> outer (reads inner: its update has a hypergradient; reads meta's
# value) -> meta (reads outer: its hypergradient passes through outer's, which must be differentiated) ->
# fit (reads meta and reg) -> reg (reads fit). reg's hypergradient goes through meta's update, whose
# hypergradient goes through outer's update, whose hypergradient depends on reg through inner's step.
LR = dict(inner=0.3, outer=0.4, meta=0.5, fit=0.3)


def _deep_data(seed=5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=D)   # noqa: E731
    return dict(X=r(6, DIM), y=r(6), Xt=r(6, DIM), yt=r(6), target=r(DIM),
                inner=0.3 * r(DIM), outer=0.3 * r(DIM), meta=0.3 * r(DIM), fit=0.3 * r(DIM), reg=torch.tensor(-0.3))


def _f_inner(d, a, b, reg):
    return ((a - b) ** 2).sum() + reg.exp() * (a * a).sum() + 0.1 * (a ** 3).sum()


def _f_outer(d, b, a, m):
    return ((d["X"] @ a - d["y"]) ** 2).mean() + 0.5 * ((b - m) ** 2).sum() + 0.1 * (b * a).sum()


def _f_meta(d, m, b):
    return ((b - d["target"]) ** 2).sum() + 0.2 * (m * m).sum() + 0.1 * (m * b).sum()


def _f_fit(d, e, m, reg):
    return ((e - m) ** 2).sum() + reg.exp() * (e * e).sum()


def deep_graph(d):
    v = {k: d[k].clone().requires_grad_(True) for k in ("inner", "outer", "meta", "fit", "reg")}
    sgd = lambda lr: (lambda p: torch.optim.SGD(p, lr=lr))   # noqa: E731
    P = mlo.Problem
    return mlo.Graph([
        P("inner", v["inner"], lambda c, b: _f_inner(d, c["inner"], c["outer"], c["reg"]), sgd(LR["inner"]),
          reads=["outer", "reg"]),
        P("outer", v["outer"], lambda c, b: _f_outer(d, c["outer"], c["inner"], c["meta"]), sgd(LR["outer"]),
          reads=["inner", "meta"]),
        P("meta", v["meta"], lambda c, b: _f_meta(d, c["meta"], c["outer"]), sgd(LR["meta"]), reads=["outer"]),
        P("fit", v["fit"], lambda c, b: _f_fit(d, c["fit"], c["meta"], c["reg"]), sgd(LR["fit"]),
          reads=["meta", "reg"]),
        P("reg", v["reg"], lambda c, b: ((d["Xt"] @ c["fit"] - d["yt"]) ** 2).mean(), sgd(0.1), reads=["fit"]),
    ])


def deep_reference(d):
    reg = d["reg"].clone().requires_grad_(True)

    def inner_after(b, r):
        a = d["inner"].clone().requires_grad_(True)
        return a - LR["inner"] * _grad(_f_inner(d, a, b, r), a)

    def outer_after(m):     # outer's update: the total derivative of its objective through inner's step
        b = d["outer"].clone().requires_grad_(True)
        a1 = inner_after(b, reg)
        return b - LR["outer"] * _grad(_f_outer(d, b, a1, m), b)
    m = d["meta"].clone().requires_grad_(True)
    m1 = m - LR["meta"] * _grad(_f_meta(d, m, outer_after(m)), m)   # meta's update: through outer's whole step
    e = d["fit"].clone().requires_grad_(True)
    e1 = e - LR["fit"] * _grad(_f_fit(d, e, m1, reg), e)
    return _grad(((d["Xt"] @ e1 - d["yt"]) ** 2).mean(), reg, create_graph=False)


def test_a_hypergradient_inside_a_hypergradient_is_differentiated():
    d = _deep_data()
    graph = deep_graph(d)
    assert graph.dropped_paths == []
    assert {s.problem for s in graph.plans["meta"].sweep if s.nested} == {"outer"}
    assert {s.problem for s in graph.plans["reg"].sweep if s.nested} == {"outer", "meta"}
    assert _rel(_hyper(graph, "reg"), deep_reference(d)) <= 1e-10
    mlo.Unrolled.exact_nested = False       # the same graph without the nested terms is measurably off
    try:
        with pytest.warns(UserWarning, match="not differentiated exactly"):
            off = _hyper(deep_graph(d), "reg")
    finally:
        mlo.Unrolled.exact_nested = True
    assert _rel(off, deep_reference(d)) > 1e-4
