"""Problem lifecycle: restart from another problem (init_from), after_step hooks, gradient
accumulation, the FOMAML engine, and Runner.run's steps/until — all against float64 hand computations."""
import pytest
import torch

import mlo

F64 = torch.float64
D = 3


def _t(x):
    """A hypergradient entry as a tensor, whichever structure ``mlo.hypergradient`` returns."""
    return x if isinstance(x, torch.Tensor) else x[""]


def _data(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(n, D, generator=g, dtype=F64), torch.randn(n, D, generator=g, dtype=F64)
    ys, yq = torch.randn(n, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    return xs, ys, xq, yq


def _inner_loss(w, th, xs, ys, lam):
    loss = ((xs @ w - ys) ** 2).mean()
    return loss + 0.5 * lam * ((w - th) ** 2).sum() if lam else loss


def _maml(engine=None, steps=3, lam=0.0, lr=0.1, momentum=0.0, meta_lr=0.05, seed=0, **kw):
    xs, ys, xq, yq = _data(seed)
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=F64, requires_grad=True)
    phi = torch.zeros(D, dtype=F64, requires_grad=True)

    def inner_obj(ctx, batch):
        return _inner_loss(ctx["inner"], ctx["meta"], xs, ys, lam)

    def outer_obj(ctx, batch):
        return ((xq @ ctx["inner"] - yq) ** 2).mean()

    inner = mlo.Problem("inner", phi, inner_obj, lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum),
                        steps=steps, init_from="meta", engine=engine, **kw)
    meta = mlo.Problem("meta", theta, outer_obj, lambda p: torch.optim.SGD(p, lr=meta_lr), reads=["inner"])
    return mlo.Graph([inner, meta]), (xs, ys, xq, yq)


def _hand_maml(theta, data, steps, lr, lam=0.0, momentum=0.0, first_order=False):
    """d query-loss(φ_K)/dθ with φ_0 = θ and K SGD(momentum) steps on the support loss."""
    xs, ys, xq, yq = data
    th = theta.detach().clone().requires_grad_(True)
    w, buf = th, None
    for _ in range(steps):
        g = torch.autograd.grad(_inner_loss(w, th, xs, ys, lam), w, create_graph=not first_order)[0]
        buf = g if buf is None else momentum * buf + g
        w = w - lr * buf
        if first_order:
            w = w.detach().requires_grad_(True)
    loss = ((xq @ w - yq) ** 2).mean()
    return torch.autograd.grad(loss, w if first_order else th)[0]


# ----------------------------------------------------------------------- init_from and engines
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_unrolled_through_the_reset_is_exact_maml(momentum):
    graph, data = _maml(mlo.Unrolled(steps=3), momentum=momentum)
    theta = graph.problems["meta"].params_tree[""]
    got = _t(mlo.hypergradient(graph, "meta")["hyper"])
    want = _hand_maml(theta, data, 3, 0.1, momentum=momentum)
    assert torch.allclose(got, want, rtol=0, atol=1e-13), (got, want)
    assert mlo.check_hypergradient(graph, "meta").ok


def test_unrolled_sees_both_paths_with_a_proximal_term():
    graph, data = _maml(mlo.Unrolled(steps=2), steps=2, lam=0.7)
    theta = graph.problems["meta"].params_tree[""]
    got = _t(mlo.hypergradient(graph, "meta")["hyper"])
    want = _hand_maml(theta, data, 2, 0.1, lam=0.7)
    assert torch.allclose(got, want, rtol=0, atol=1e-13)


def test_truncated_unrolled_skips_the_reset_path():
    """Unrolled(steps=1) of a 3-step run does not reach the reset: only the read path (here none)."""
    graph, _ = _maml(mlo.Unrolled(steps=1))
    assert torch.count_nonzero(_t(mlo.hypergradient(graph, "meta")["hyper"])) == 0


def test_fomaml_passes_the_adjoint_unchanged():
    graph, data = _maml(mlo.FOMAML(), lam=0.3)
    theta = graph.problems["meta"].params_tree[""]
    got = _t(mlo.hypergradient(graph, "meta")["hyper"])
    want = _hand_maml(theta, data, 3, 0.1, lam=0.3, first_order=True)
    assert torch.allclose(got, want, rtol=0, atol=1e-14)
    exact = _hand_maml(theta, data, 3, 0.1, lam=0.3)
    assert not torch.allclose(got, exact, atol=1e-3)        # an approximation, not the MAML gradient
    assert mlo.engine_from_config("fomaml") == mlo.FOMAML()
    assert mlo.engine_to_config(mlo.FOMAML()) == {"name": "fomaml"}
    assert not mlo.check_hypergradient(graph, "meta").ok   # the checker's reference is the exact composition


def test_first_order_is_not_fomaml():
    graph, _ = _maml(mlo.FirstOrder())
    assert torch.count_nonzero(_t(mlo.hypergradient(graph, "meta")["hyper"])) == 0


def test_imaml_cg_is_the_implicit_hypergradient():
    lam = 2.0
    graph, (xs, ys, xq, yq) = _maml(mlo.CG(iterations=10), steps=5, lam=lam)
    got = _t(mlo.hypergradient(graph, "meta")["hyper"])
    # φ' = where the 5 inner steps from θ ended; the hypergradient is λ (H + λI)⁻¹ ∇L_q(φ')
    theta = graph.problems["meta"].params_tree[""].detach()
    phi = theta.clone()
    for _ in range(5):
        phi = phi - 0.1 * (2 * xs.T @ (xs @ phi - ys) / xs.shape[0] + lam * (phi - theta))
    h = 2 * xs.T @ xs / xs.shape[0]
    u = 2 * xq.T @ (xq @ phi - yq) / xq.shape[0]
    want = lam * torch.linalg.solve(h + lam * torch.eye(D, dtype=F64), u)
    assert torch.allclose(got, want, rtol=0, atol=1e-12), (got, want)
    assert mlo.check_hypergradient(graph, "meta").ok


def test_runner_resets_every_outer_step_and_clears_the_optimizer_state():
    graph, data = _maml(mlo.Unrolled(steps=3), momentum=0.9)
    theta = graph.problems["meta"].params_tree[""].detach().clone()
    mlo.Runner(graph, progress=False).run(steps=3)
    for _ in range(3):
        theta = theta - 0.05 * _hand_maml(theta, data, 3, 0.1, momentum=0.9)
    assert torch.allclose(graph.problems["meta"].params_tree[""], theta, rtol=0, atol=1e-13)


def test_resume_gives_the_same_result_and_checks_init_from(tmp_path):
    graph, _ = _maml(mlo.Unrolled(steps=3), momentum=0.9)
    mlo.Runner(graph, progress=False).run(steps=4)
    ckpt = tmp_path / "c.pt"
    first, _ = _maml(mlo.Unrolled(steps=3), momentum=0.9)
    mlo.Runner(first, progress=False, checkpoint=ckpt).run(steps=2)
    assert mlo.read_checkpoint(ckpt).init_from == {"inner": "meta"}
    resumed, _ = _maml(mlo.Unrolled(steps=3), momentum=0.9)
    runner = mlo.Runner(resumed, progress=False)
    runner.resume(ckpt)
    runner.run(until=4)
    for name in ("inner", "meta"):
        assert torch.equal(graph.problems[name].params_tree[""], resumed.problems[name].params_tree[""])
    plain, _ = _maml(mlo.Unrolled(steps=3), momentum=0.9)
    plain.problems["inner"].init_from = None        # as if the declaration had been dropped
    with pytest.raises(mlo.CheckpointError, match="init_from"):
        mlo.Runner(plain, progress=False).resume(ckpt)


def test_init_from_validation():
    x = lambda: torch.zeros(2, dtype=F64, requires_grad=True)   # noqa: E731
    obj = lambda ctx, b: (ctx["a"] ** 2).sum()                  # noqa: E731
    sgd = lambda p: torch.optim.SGD(p, lr=0.1)                   # noqa: E731
    meta = lambda params=None: mlo.Problem("m", x() if params is None else params,  # noqa: E731
                                           lambda ctx, b: (ctx["a"] ** 2).sum(), sgd, reads=["a"])
    with pytest.raises(mlo.GraphError, match="did you mean 'm'"):
        mlo.Graph([mlo.Problem("a", x(), obj, sgd, init_from="mm"), meta()])
    with pytest.raises(mlo.GraphError, match="'' is \\(2,\\) torch.float64 here, \\(3,\\)"):
        mlo.Graph([mlo.Problem("a", x(), obj, sgd, init_from="m"),
                   meta(torch.zeros(3, dtype=F64, requires_grad=True))])
    with pytest.raises(mlo.GraphError, match="parameter names differ"):
        mlo.Graph([mlo.Problem("a", {"w": x()}, obj, sgd, init_from="m"), meta({"v": x()})])
    with pytest.raises(mlo.GraphError, match="FiniteDifference cannot differentiate a start value"):
        mlo.Graph([mlo.Problem("a", x(), obj, sgd, init_from="m", engine=mlo.FiniteDifference()), meta()])
    with pytest.raises(mlo.GraphError, match="FOMAML needs Problem.init_from"):
        mlo.Graph([mlo.Problem("a", x(), obj, sgd, reads=["m"], engine=mlo.FOMAML()), meta()])
    with pytest.raises(mlo.ConfigError, match="names the problem itself"):
        mlo.Problem("a", x(), obj, sgd, init_from="a")
    with pytest.raises(mlo.ConfigError, match="also in constants"):
        mlo.Problem("a", x(), obj, sgd, init_from="m", constants=["m"])
    p = mlo.Problem("a", x(), obj, sgd, init_from="m")
    assert p.reads == ["m"]                                       # the source is read


# ----------------------------------------------------------------------- after_step
def test_after_step_projects_each_step():
    w = torch.tensor([1.0, 0.2], dtype=F64, requires_grad=True)
    seen = []

    def clamp(params):
        seen.append((type(params), torch.is_grad_enabled()))
        params.clamp_(min=0.5)

    p = mlo.Problem("w", w, lambda ctx, b: ((ctx["w"] - torch.tensor([0.0, 3.0], dtype=F64)) ** 2).sum(),
                    lambda q: torch.optim.SGD(q, lr=0.1), steps=2, after_step=clamp)
    mlo.Runner(mlo.Graph([p]), progress=False).run(steps=1)
    want = torch.tensor([1.0, 0.2], dtype=F64)
    for _ in range(2):
        want = (want - 0.1 * 2 * (want - torch.tensor([0.0, 3.0], dtype=F64))).clamp(min=0.5)
    assert torch.equal(w.detach(), want)
    assert seen == [(torch.Tensor, False)] * 2
    d = {"a": torch.ones(2, dtype=F64, requires_grad=True)}
    got = []
    q = mlo.Problem("d", d, lambda ctx, b: (ctx["d"]["a"] ** 2).sum(), lambda z: torch.optim.SGD(z, lr=0.1),
                    after_step=lambda t: got.append(sorted(t)))
    mlo.Runner(mlo.Graph([q]), progress=False).run(steps=1)
    assert got == [["a"]]
    with pytest.raises(mlo.ConfigError, match="after_step: expected a callable"):
        mlo.Problem("e", torch.ones(1, requires_grad=True), lambda c, b: c["e"].sum(),
                    lambda z: torch.optim.SGD(z, lr=0.1), after_step=3)


# ----------------------------------------------------------------------- accumulate
def _batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, D, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)) for _ in range(n)]


def test_accumulate_steps_along_the_mean_gradient():
    batches = _batches()
    w = torch.tensor([0.1, -0.4, 0.2], dtype=F64, requires_grad=True)
    p = mlo.Problem("w", w, lambda ctx, b: ((b[0] @ ctx["w"] - b[1]) ** 2).mean(),
                    lambda q: torch.optim.SGD(q, lr=0.1), data=batches, accumulate=3)
    mlo.Runner(mlo.Graph([p]), progress=False).run(steps=2)
    want = torch.tensor([0.1, -0.4, 0.2], dtype=F64)
    for step in range(2):
        grads = [2 * x.T @ (x @ want - y) / x.shape[0] for x, y in batches[3 * step: 3 * step + 3]]
        want = want - 0.1 * sum(grads) / 3
    assert torch.allclose(w.detach(), want, rtol=0, atol=1e-15)
    assert p.stream.position == 6 and p.stream.epoch == 0       # positions count the batches underneath
    assert isinstance(p.stream.last, mlo.Accumulated) and len(p.stream.last) == 3
    with pytest.raises(mlo.ConfigError, match="accumulate=2 needs a data source"):
        mlo.Problem("v", torch.ones(1, requires_grad=True), lambda c, b: c["v"].sum(),
                    lambda z: torch.optim.SGD(z, lr=0.1), accumulate=2)
    with pytest.raises(mlo.ConfigError, match="accumulate: expected an integer >= 1"):
        mlo.Problem("v", torch.ones(1, requires_grad=True), lambda c, b: c["v"].sum(),
                    lambda z: torch.optim.SGD(z, lr=0.1), data=batches, accumulate=0)


@pytest.mark.parametrize("engine", [mlo.Unrolled(), mlo.Unrolled(steps=2)])
def test_engines_differentiate_the_accumulated_mean(engine):
    """Per-feature weight decay λ; the inner step's record holds its 2 batches; the loss is their mean."""
    batches, val = _batches(), _batches(1, seed=5)[0]
    w = torch.zeros(D, dtype=F64, requires_grad=True)
    lam = torch.tensor([0.3, 0.1, 0.2], dtype=F64, requires_grad=True)

    def inner_loss(wv, lv, b):
        return ((b[0] @ wv - b[1]) ** 2).mean() + (lv * wv ** 2).sum()

    inner = mlo.Problem("inner", w, lambda ctx, b: inner_loss(ctx["inner"], ctx["lam"], b),
                        lambda q: torch.optim.SGD(q, lr=0.1), data=batches, accumulate=2, steps=2,
                        reads=["lam"], engine=engine)
    outer = mlo.Problem("lam", lam, lambda ctx, b: ((val[0] @ ctx["inner"] - val[1]) ** 2).mean(),
                        lambda q: torch.optim.SGD(q, lr=0.1), reads=["inner"])
    graph = mlo.Graph([inner, outer])
    got = _t(mlo.hypergradient(graph, "lam")["hyper"])
    lv, wv = lam.detach().clone().requires_grad_(True), w.detach().clone()
    for step in range(2):
        if step <= 2 - engine.steps:                       # before the engine's window: a constant
            wv = wv.detach().requires_grad_(True)
        group = batches[2 * step: 2 * step + 2]
        loss = sum(inner_loss(wv, lv, b) for b in group) / 2
        wv = wv - 0.1 * torch.autograd.grad(loss, wv, create_graph=True)[0]
    want = torch.autograd.grad(((val[0] @ wv - val[1]) ** 2).mean(), lv)[0]
    assert torch.allclose(got, want, rtol=0, atol=1e-14), (got, want)


# ----------------------------------------------------------------------- Runner.run
def test_run_steps_counts_from_now_and_until_stops_at_a_total():
    graph, _ = _maml(mlo.Unrolled(steps=3))
    seen = []
    runner = mlo.Runner(graph, progress=False, callbacks=[lambda step, row: seen.append(step)])
    runner.run(steps=2)
    runner.run(2)
    assert runner.step == 4 and seen == [1, 2, 3, 4]
    runner.run(until=6)
    assert runner.step == 6
    assert runner.run(until=6) == runner.last_row and runner.step == 6
    for kw, msg in (({}, "exactly one"), ({"steps": 1, "until": 9}, "exactly one"),
                    ({"until": 5}, "below the step counter"), ({"steps": -1}, "integer >= 0"),
                    ({"steps": 1.5}, "integer >= 0")):
        with pytest.raises(ValueError, match=msg):
            runner.run(**kw)
    assert runner.step == 6


# ----------------------------------------------------------------------- task-batched problems
N_TASKS = 3


def _tiny_net():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()


def _task_data():
    g = torch.Generator().manual_seed(7)
    xs, xq = torch.randn(N_TASKS, 6, 4, generator=g, dtype=F64), torch.randn(N_TASKS, 6, 4, generator=g, dtype=F64)
    ys, yq = torch.randint(0, 2, (N_TASKS, 6), generator=g), torch.randint(0, 2, (N_TASKS, 6), generator=g)
    return xs, ys, xq, yq


def _ce(net, params, x, y):
    return torch.nn.functional.cross_entropy(torch.func.functional_call(net, params, (x,)), y)


def _meta_graphs(engine, lam=1.0, vectorize=True):
    """The same meta-learning program twice: N separate task problems, and one task-batched problem."""
    net, (xs, ys, xq, yq) = _tiny_net(), _task_data()
    theta0 = {k: v.detach().clone() for k, v in net.named_parameters()}
    sgd = lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.5)    # noqa: E731

    def prox(phi, theta):
        return 0.5 * lam * sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)

    def one(t):
        return lambda ctx, b: _ce(net, ctx[f"t{t}"], xs[t], ys[t]) + prox(ctx[f"t{t}"], ctx["meta"])

    def meta_sep(ctx, b):
        return sum(_ce(net, ctx[f"t{t}"], xq[t], yq[t]) for t in range(N_TASKS)) / N_TASKS

    tasks = [mlo.Problem(f"t{t}", {k: torch.zeros_like(v, requires_grad=True) for k, v in theta0.items()}, one(t),
                         sgd, steps=3, init_from="meta", engine=engine) for t in range(N_TASKS)]
    meta = mlo.Problem("meta", {k: v.clone().requires_grad_(True) for k, v in theta0.items()}, meta_sep,
                       lambda p: torch.optim.SGD(p, lr=0.1), reads=[f"t{t}" for t in range(N_TASKS)])
    separate = mlo.Graph(tasks + [meta])

    def task_objective(ctx, batch):        # written for one task
        x, y = batch
        return _ce(net, ctx["tasks"], x, y) + prox(ctx["tasks"], ctx["meta"])

    def meta_batched(ctx, b):
        per_task = torch.func.vmap(lambda p, x, y: _ce(net, p, x, y))(ctx["tasks"], xq, yq)
        return per_task.mean()

    stacked = {k: torch.zeros(N_TASKS, *v.shape, dtype=F64, requires_grad=True) for k, v in theta0.items()}
    batched_tasks = mlo.Problem("tasks", stacked, task_objective, sgd, data=[(xs, ys)], steps=3, init_from="meta",
                                engine=engine, tasks=N_TASKS, vectorize=vectorize)
    meta_b = mlo.Problem("meta", {k: v.clone().requires_grad_(True) for k, v in theta0.items()}, meta_batched,
                         lambda p: torch.optim.SGD(p, lr=0.1), reads=["tasks"])
    return separate, mlo.Graph([batched_tasks, meta_b])


@pytest.mark.parametrize("engine", [mlo.Unrolled(steps=3), mlo.CG(iterations=200, tol=1e-14),
                                    mlo.Neumann(iterations=4), mlo.FOMAML()],
                         ids=lambda e: type(e).__name__)
def test_task_batched_problem_equals_separate_problems(engine):
    separate, batched = _meta_graphs(engine)
    a, b = mlo.hypergradient(separate, "meta")["hyper"], mlo.hypergradient(batched, "meta")["hyper"]
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-10), (k, (a[k] - b[k]).abs().max())
        assert a[k].abs().max() > 1e-3
    # a real outer step: the same meta-parameters, and every task's adapted slice equals its own problem's
    mlo.Runner(separate, progress=False).run(steps=2)
    mlo.Runner(batched, progress=False).run(steps=2)
    for k in a:
        assert torch.allclose(separate.problems["meta"].params_tree[k], batched.problems["meta"].params_tree[k],
                              rtol=0, atol=1e-10)
        for t in range(N_TASKS):
            assert torch.allclose(separate.problems[f"t{t}"].params_tree[k],
                                  batched.problems["tasks"].params_tree[k][t], rtol=0, atol=1e-10)


def test_task_batched_loop_equals_vmap_and_checks():
    _, vmapped = _meta_graphs(mlo.Unrolled(steps=3))
    _, looped = _meta_graphs(mlo.Unrolled(steps=3), vectorize=False)
    a, b = mlo.hypergradient(vmapped, "meta")["hyper"], mlo.hypergradient(looped, "meta")["hyper"]
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-12)
    assert mlo.check_hypergradient(looped, "meta", directions=4).ok


def test_task_batched_validation():
    obj = lambda ctx, b: ctx["p"].sum()          # noqa: E731
    sgd = lambda q: torch.optim.SGD(q, lr=0.1)  # noqa: E731
    with pytest.raises(mlo.ConfigError, match="leading dimension of 3"):
        mlo.Problem("p", torch.zeros(2, 4, requires_grad=True), obj, sgd, tasks=3)
    with pytest.raises(mlo.ConfigError, match="grad_clip"):
        mlo.Problem("p", torch.zeros(3, 4, requires_grad=True), obj, sgd, tasks=3, grad_clip=1.0)
    meta = mlo.Problem("m", torch.zeros(5, requires_grad=True), lambda c, b: c["p"].sum(), sgd, reads=["p"])
    with pytest.raises(mlo.GraphError, match=r"is \(3, 4\) torch.float\d+ here, \(5,\)"):
        mlo.Graph([mlo.Problem("p", torch.zeros(3, 4, requires_grad=True), obj, sgd, tasks=3, init_from="m"), meta])


def test_task_batched_maml_step_equals_a_hand_written_torch_func_step():
    """The benchmark's check: one MAML step on a conv net, vectorized = 2 separate problems = torch.func."""
    from benchmarks import maml_batched
    maml_batched.check(tasks=2)


def test_task_batched_batchnorm_needs_the_loop():
    """BatchNorm in training mode updates its statistics in place: vmap cannot batch it; the loop can."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)).double()
    xs, ys = torch.randn(2, 5, 4, dtype=F64), torch.randint(0, 2, (2, 5))

    def graph(vectorize):
        theta = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
        stacked = {k: torch.zeros(2, *v.shape, dtype=F64, requires_grad=True) for k, v in theta.items()}
        tasks = mlo.Problem("tasks", stacked, lambda ctx, b: _ce(net, ctx["tasks"], *b),
                            lambda p: torch.optim.SGD(p, lr=0.1), data=[(xs, ys)], init_from="meta", tasks=2,
                            vectorize=vectorize, engine=mlo.Unrolled())
        meta = mlo.Problem("meta", theta, lambda ctx, b: sum((v ** 2).sum() for v in ctx["tasks"].values()),
                           lambda p: torch.optim.SGD(p, lr=0.1), reads=["tasks"])
        return mlo.Graph([tasks, meta])
    with pytest.raises(mlo.MLOError, match="vectorize=False"):
        mlo.Stepper(graph(True)).step()
    looped = graph(False)
    mlo.Stepper(looped).step()
    assert all(torch.isfinite(v).all() for v in looped.problems["meta"].params_tree.values())


def test_unrolled_reusing_the_step_graph_goes_through_the_reset():
    graph, data = _maml(mlo.Unrolled(steps=1, reuse_step_graph=True), steps=1, lam=0.4)
    theta = graph.problems["meta"].params_tree[""]
    got = _t(mlo.hypergradient(graph, "meta")["hyper"])
    assert torch.allclose(got, _hand_maml(theta, data, 1, 0.1, lam=0.4), rtol=0, atol=1e-13)
