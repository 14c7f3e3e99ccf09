"""Row-sparse problem parameters (``Problem(rows=...)``): the same hypergradients as the dense
declaration (float64, 1e-12), the same table after N steps, lazy momentum against a hand-written
reference, bit-identical resume, and batch-sized records.

Objectives are quadratic in each problem's own parameters, so the finite difference is exact up
to rounding and a dense and a row-sparse finite difference (whose ε are normalised over different
vectors when an adjoint names rows the step did not touch) agree to rounding too.
"""
import pytest
import torch

import mlo
from mlo.rows import RowTree

DT = torch.float64
N, D = 10, 3
TOL = 1e-12
g0 = torch.Generator().manual_seed(0)
X = torch.randn(N, D, generator=g0, dtype=DT)
Y = torch.randn(N, generator=g0, dtype=DT)
ROWS_T = [torch.tensor([1, 3, 3, 7]), torch.tensor([0, 9, 2, 9])]     # the table's own batches (repeats)
ROWS_C = [torch.tensor([3, 5, 7, 7]), torch.tensor([9, 4, 4, 8])]     # a reader's batches: overlapping rows
ROWS_A = [torch.tensor([0, 1, 1, 3]), torch.tensor([2, 9, 6, 6])]     # a second reader: overlapping rows


def sgd(lr, **kw):
    return lambda p: torch.optim.SGD(p, lr=lr, **kw)


def chain(sparse: bool, engine, table_opt=None, c_engine=None, c_steps=1):
    """w (reads a) -> T (table, max, reads w) -> c (reads T' on other rows) -> a (reads w, c and T' rows)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(D, generator=g, dtype=DT).requires_grad_()
    T = (0.1 * torch.randn(N, D, generator=g, dtype=DT)).requires_grad_()
    c = torch.randn(D, generator=g, dtype=DT).requires_grad_()
    a = torch.randn(D, generator=g, dtype=DT).requires_grad_()

    def w_loss(ctx, b):
        return ((X @ ctx["w"] - Y) ** 2).mean() + (ctx["w"] * ctx["a"]).sum()

    def t_loss(ctx, b):
        i = b[0]
        t = ctx["T"][i]
        return (((X[i] + t) @ ctx["w"] - Y[i]) ** 2).sum() - 0.5 * (t ** 2).sum() * 3.0

    def c_loss(ctx, b):
        i = b[0]
        return (((X[i] * ctx["T"][i]) @ ctx["c"] - Y[i]) ** 2).mean() + 0.1 * (ctx["c"] ** 2).sum()

    def a_loss(ctx, b):
        i = b[0]
        t = ctx["T"][i]
        return ((X @ ctx["c"]) ** 2).mean() + ((t @ ctx["a"]) ** 2).sum() + (ctx["w"] * t.sum(0)).sum() \
            + (ctx["a"] ** 2).sum()

    rows = (lambda b: b[0]) if sparse else None
    problems = [
        mlo.Problem("w", w, w_loss, sgd(0.1), reads=["a"], engine=engine),
        mlo.Problem("T", T, t_loss, table_opt or sgd(0.05), data=[(i,) for i in ROWS_T], reads=["w"], mode="max",
                    engine=engine, rows=rows),
        mlo.Problem("c", c, c_loss, sgd(0.1), data=[(i,) for i in ROWS_C], reads=["T"], engine=c_engine or engine,
                    steps=c_steps),
        mlo.Problem("a", a, a_loss, sgd(0.1), data=[(i,) for i in ROWS_A], reads=["w", "c", "T"]),
    ]
    return mlo.Graph(problems)


def params(graph):
    return {f"{n}/{k}": v.detach().clone() for n, p in graph.problems.items() for k, v in p.params_tree.items()}


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


ENGINES = [mlo.Unrolled(), mlo.FiniteDifference(), mlo.FirstOrder()]


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: type(e).__name__)
def test_hypergradient_equals_the_dense_declaration(engine):
    dense, sparse = chain(False, engine), chain(True, engine)
    hd = mlo.hypergradient(dense, "a", return_adjoints=True)
    hs = mlo.hypergradient(sparse, "a", return_adjoints=True)
    assert rel(hs["total"], hd["total"]) <= TOL
    if not isinstance(engine, mlo.FirstOrder):
        assert hd["hyper"].norm() > 1e-3                      # the chain through the table carries weight
        assert set(hs["adjoints"]) == set(hd["adjoints"]) and "T" in hs["adjoints"]
        for q in hd["adjoints"]:                                  # the adjoints, whole tables for T
            assert rel(hs["adjoints"][q], hd["adjoints"][q]) <= TOL, q


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: type(e).__name__)
def test_the_table_after_steps_equals_the_dense_run(engine):
    dense, sparse = chain(False, engine), chain(True, engine)
    sd, ss = mlo.Stepper(dense), mlo.Stepper(sparse)
    before = params(sparse)
    for _ in range(4):
        sd.step()
        ss.step()
    pd, ps = params(dense), params(sparse)
    for k in pd:
        if isinstance(engine, mlo.FirstOrder):
            assert torch.equal(ps[k], pd[k]), k                   # plain SGD on the rows: the same ops
        else:
            assert rel(ps[k], pd[k]) <= TOL, k
    untouched = sorted(set(range(N)) - {int(i) for b in ROWS_T for i in b})
    assert untouched and torch.equal(ps["T/"][untouched], before["T/"][untouched])


@pytest.mark.parametrize("c_engine", [mlo.Unrolled(steps=2), mlo.CG(iterations=3)], ids=["unrolled2", "cg"])
def test_a_reader_over_several_batches_binds_the_union_of_their_rows(c_engine):
    """c takes two steps on different rows of T each run; its engine (any engine: c is not the table)
    sees the rows of the steps it keeps."""
    dense = chain(False, mlo.Unrolled(), c_engine=c_engine, c_steps=2)
    sparse = chain(True, mlo.Unrolled(), c_engine=c_engine, c_steps=2)
    hd, hs = mlo.hypergradient(dense, "a"), mlo.hypergradient(sparse, "a")
    assert rel(hs["total"], hd["total"]) <= TOL
    st = mlo.Stepper(sparse)
    st.step()
    # Unrolled(steps=2) keeps both steps: ROWS_C[0] ∪ ROWS_C[1]; CG keeps the last batch only
    want = [3, 4, 5, 7, 8, 9] if isinstance(c_engine, mlo.Unrolled) else [4, 8, 9]
    assert st.runs["c"].rows["T"].index.tolist() == want


def test_records_gradients_and_updates_are_batch_sized():
    graph = chain(True, mlo.Unrolled())
    st = mlo.Stepper(graph)
    d = st.direction("T")
    assert isinstance(d.total, RowTree) and d.total[""].shape == (3, D)     # rows 1, 3, 7
    assert d.total.rows.index.tolist() == [1, 3, 7]
    st.step()
    rec = st.runs["T"].records[-1]
    assert rec.params[""].shape == (3, D) and rec.snapshot.hyper[""]["lr"] == 0.05
    assert st.runs["c"].reads["T"][""].shape == (3, D)                     # c's rows 3, 5, 7


def reference_lazy_sgd(steps, lr, mu, wd, nesterov):
    """The documented semantics, by hand: a visited row's buffer ← μ·buf + (g + wd·w), others untouched."""
    graph = chain(True, mlo.FirstOrder())
    w = graph.problems["w"].params_tree[""].detach()
    T = graph.problems["T"].params_tree[""].detach().clone()
    buf = torch.zeros_like(T)
    for k in range(steps):
        i = ROWS_T[k % 2]
        t = T.clone().requires_grad_()
        loss = -((((X[i] + t[i]) @ w - Y[i]) ** 2).sum() - 0.5 * (t[i] ** 2).sum() * 3.0)   # max: descend on −
        (g,) = torch.autograd.grad(loss, t)
        r = torch.unique(i)
        d = g[r] + wd * T[r]
        buf[r] = mu * buf[r] + d
        T[r] = T[r] - lr * (d + mu * buf[r] if nesterov else buf[r])
    return T, buf


@pytest.mark.parametrize("nesterov", [False, True])
def test_lazy_momentum_matches_a_hand_written_reference(nesterov):
    lr, mu, wd = 0.05, 0.9, 0.01
    graph = chain(True, mlo.FirstOrder(), table_opt=sgd(lr, momentum=mu, weight_decay=wd, nesterov=nesterov))
    st = mlo.Stepper(graph)
    T0 = graph.problems["T"].params_tree[""].detach().clone()
    for _ in range(5):
        st.step(skip={"w", "c", "a"})
    T_ref, buf_ref = reference_lazy_sgd(5, lr, mu, wd, nesterov)
    T = graph.problems["T"].params_tree[""]
    assert rel(T.detach(), T_ref) <= TOL
    buf = graph.problems["T"].torch_optimizer.state[T]["momentum_buffer"]
    assert buf.shape == T.shape and rel(buf, buf_ref) <= TOL
    never = sorted(set(range(N)) - {int(i) for b in ROWS_T for i in b})
    assert torch.equal(T.detach()[never], T0[never])                      # lazy: unvisited rows stay put


def test_momentum_first_step_hypergradient_equals_dense():
    """From a fresh optimizer a visited row's buffer starts as its gradient in both declarations. (Weight
    decay is left out: the dense step decays rows the batch does not name, which the reader then sees.)"""
    opt = sgd(0.05, momentum=0.9, nesterov=True)
    for engine in (mlo.Unrolled(), mlo.FiniteDifference()):
        hd = mlo.hypergradient(chain(False, engine, opt), "a")
        hs = mlo.hypergradient(chain(True, engine, opt), "a")
        assert rel(hs["total"], hd["total"]) <= TOL


def test_checkpoint_resume_is_bit_identical(tmp_path):
    opt = sgd(0.05, momentum=0.9)
    straight = chain(True, mlo.Unrolled(), opt)
    mlo.Runner(straight, progress=False).run(4)
    first = chain(True, mlo.Unrolled(), opt)
    mlo.Runner(first, progress=False, checkpoint=tmp_path / "c.pt", checkpoint_every=2).run(2)
    resumed = chain(True, mlo.Unrolled(), opt)
    runner = mlo.Runner(resumed, progress=False, checkpoint=tmp_path / "c.pt")
    runner.resume()
    runner.run(until=4)
    a, b = params(straight), params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ta, tb = (g.problems["T"] for g in (straight, resumed))
    assert torch.equal(ta.torch_optimizer.state[ta.params_tree[""]]["momentum_buffer"],
                       tb.torch_optimizer.state[tb.params_tree[""]]["momentum_buffer"])


def reweighting(sparse: bool, engine):
    """A per-example weight table (upper, rows of the model's batch) read as a value by a model m."""
    g = torch.Generator().manual_seed(2)
    m = torch.randn(D, generator=g, dtype=DT).requires_grad_()
    wt = torch.randn(N, generator=g, dtype=DT).requires_grad_()
    Xv, Yv = torch.randn(6, D, generator=g, dtype=DT), torch.randn(6, generator=g, dtype=DT)

    def m_loss(ctx, b):
        i = b[0]
        return (ctx["wt"][i] ** 2 * (X[i] @ ctx["m"] - Y[i]) ** 2).sum()

    def wt_loss(ctx, b):
        i = b[0]
        return ((Xv @ ctx["m"] - Yv) ** 2).mean() + 0.1 * (ctx["wt"][i] ** 2).sum()

    batches = [(torch.tensor([2, 4, 4, 8]),), (torch.tensor([0, 2, 5]),)]
    return mlo.Graph([
        mlo.Problem("m", m, m_loss, sgd(0.05), data=batches, reads=["wt"], engine=engine),
        mlo.Problem("wt", wt, wt_loss, sgd(0.5), data=mlo.SameBatch("m"), reads=["m"],
                    rows=(lambda b: b[0]) if sparse else None)])


@pytest.mark.parametrize("engine", ENGINES[:2], ids=lambda e: type(e).__name__)
def test_a_table_as_the_upper_problem(engine):
    hd = mlo.hypergradient(reweighting(False, engine), "wt")
    hs = mlo.hypergradient(reweighting(True, engine), "wt")
    assert hd["hyper"].norm() > 1e-3
    assert rel(hs["total"], hd["total"]) <= TOL
    dense, sparse = reweighting(False, engine), reweighting(True, engine)
    sd, ss = mlo.Stepper(dense), mlo.Stepper(sparse)
    for _ in range(3):
        sd.step()
        ss.step()
    pd, ps = params(dense), params(sparse)
    assert all(rel(ps[k], pd[k]) <= TOL for k in pd)


def test_check_hypergradient_on_a_row_sparse_graph():
    report = mlo.check_hypergradient(chain(True, mlo.Unrolled()), "a")
    assert report.ok, str(report)


def test_declaration_errors():
    T = torch.zeros(N, D, dtype=DT, requires_grad=True)
    rows = lambda b: b[0]   # noqa: E731
    obj = lambda ctx, b: ctx["T"][b[0]].sum()   # noqa: E731
    with pytest.raises(mlo.ConfigError, match="SGD or define row_step"):
        mlo.Problem("T", T, obj, lambda p: torch.optim.Adam(p), rows=rows)
    with pytest.raises(mlo.ConfigError, match="dampening"):
        mlo.Problem("T", T, obj, sgd(0.1, momentum=0.9, dampening=0.1), rows=rows)
    with pytest.raises(mlo.ConfigError, match="grad_clip"):
        mlo.Problem("T", T, obj, sgd(0.1), rows=rows, grad_clip=1.0)
    with pytest.raises(mlo.ConfigError, match="not a module"):
        mlo.Problem("T", torch.nn.Linear(2, 2).double(), obj, sgd(0.1), rows=rows)
    with pytest.raises(mlo.ConfigError, match="not a table"):
        mlo.Problem("T", {"a": T, "b": torch.zeros(N + 1, requires_grad=True)}, obj, sgd(0.1), rows=rows)
    with pytest.raises(mlo.ConfigError, match="function batch"):
        mlo.Problem("T", T, obj, sgd(0.1), rows=3)
    with pytest.raises(mlo.GraphError, match="Unrolled\\(steps=1\\)"):
        g = chain(True, mlo.Unrolled())
        mlo.Graph([p if p.name != "T" else mlo.Problem("T", p.params, p.objective, sgd(0.1), data=p.data,
                                                       reads=["w"], engine=mlo.CG(), rows=rows)
                   for p in g.problems.values()])


def test_reading_rows_the_batch_does_not_name_raises():
    graph = chain(True, mlo.FirstOrder())
    graph.problems["T"].objective = lambda ctx, b: ctx["T"][torch.tensor([4])].sum()   # row 4 is not in [1, 3, 7]
    with pytest.raises(mlo.MLOError, match="does not name"):
        mlo.Stepper(graph).step()
    graph.problems["T"].rows = lambda b: b[0].double()
    with pytest.raises(mlo.MLOError, match="integer row numbers"):
        mlo.Stepper(graph).step()
