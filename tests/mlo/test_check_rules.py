"""The checker's rules: kinks inside the difference radius, stop-gradients, FirstOrder beside any
engine, the implicit engines' premises, an independent implicit reference, engines judged at their
limit (wrappers too), pinned batches, and results in the parameters' own structure."""
import pytest
import torch
from torch import nn

import mlo
from mlo import references

from .test_check import _Wrapped, _ridge


def _sgd(lr=0.1):
    return lambda p: torch.optim.SGD(p, lr=lr)


# ------------------------------------------------------------------ kinks
def _kinked(offset):
    """inner: w' = 0.8w + 0.2θ (one SGD step on (w − θ)²); outer: w'² + 3·relu(w' − c), with the
    kink c at θ-distance ``offset`` (None: no kink) from θ0 = 0.3 along the one coordinate."""
    w = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    th = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    w1 = 0.8 * 1.0 + 0.2 * 0.3
    c = w1 + 0.2 * offset
    inner = mlo.Problem("inner", w, lambda ctx, b: ((ctx["inner"] - ctx["outer"]) ** 2).sum(), _sgd(),
                        reads=["outer"])
    outer = mlo.Problem("outer", th, lambda ctx, b: (ctx["inner"] ** 2 + 3 * torch.relu(ctx["inner"] - c)).sum(),
                        _sgd(), reads=["inner"])
    return mlo.Graph([inner, outer])


def test_a_kink_inside_the_radius_is_stepped_over_with_a_smaller_one():
    at_3e6 = mlo.check_hypergradient(_kinked(3e-6), "outer")      # crossed at 1e-5, not at 1e-6
    assert at_3e6.ok and at_3e6.radius == pytest.approx(1e-6), str(at_3e6)
    assert "at radius 1e-06" in str(at_3e6)
    # what a single radius of 1e-5 would have said: the kink adds 3·0.2·(1 − 0.3)/2 to the slope
    f0, value = references.composition(_kinked(3e-6), "outer", {"inner": [None], "outer": [None]},
                                       torch.eye(1, dtype=torch.float64), [1e-5], {}, {})
    slope = (value(0, 0, 1.0) - value(0, 0, -1.0)) / 2e-5
    assert slope - 0.2 * 2 * 0.86 == pytest.approx(0.21, rel=1e-3)
    smooth = mlo.check_hypergradient(_kinked(1.0), "outer")
    assert smooth.ok and smooth.radius == pytest.approx(1e-5), str(smooth)


def test_a_kink_at_the_point_itself_cannot_be_checked_and_says_so_in_one_line():
    report = mlo.check_hypergradient(_kinked(0.0), "outer")
    assert not report.ok and not report.smooth
    assert str(report).splitlines()[0] == "cannot check here: non-smooth at radius 1e-07 (ReLU/max-pool kinks)"


# ------------------------------------------------------------------ stop-gradients
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.w = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.a = nn.Parameter(torch.rand(3, dtype=torch.float64) + 0.5)

    def forward(self, x):
        return torch.tanh(x * self.a) @ self.w


def _stopped(stop: bool):
    """arch's first term uses the trained w' without gradient (``ctx.forward(constants=("w",))``)."""
    net = _Net()
    g = torch.Generator().manual_seed(4)
    x, y, xv, yv = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 3), (6,), (5, 3), (5,)))
    stop_w = ("w",) if stop else ()
    return mlo.Graph([
        mlo.Problem("w", {"w": net.w}, lambda c, b: ((c.forward(net, x) - y) ** 2).mean(), _sgd(), reads=["arch"]),
        mlo.Problem("arch", {"a": net.a}, lambda c, b: ((c.forward(net, xv, constants=stop_w) - yv) ** 2).mean()
                    + 0.1 * (c["w"]["w"] ** 2).sum(), _sgd(), reads=["w"]),
    ])


def test_a_declared_stop_gradient_is_held_by_the_reference():
    stopped = mlo.check_hypergradient(_stopped(True), "arch")
    assert stopped.ok and not stopped.notes, str(stopped)
    assert mlo.check_hypergradient(_stopped(False), "arch").ok
    # the stop-gradient matters: the two hypergradients differ
    a, b = (mlo.hypergradient(_stopped(s), "arch")["total"]["a"] for s in (True, False))
    assert (a - b).norm() > 1e-3 * b.norm()


# ------------------------------------------------------------------ FirstOrder beside any engine
def _two_lower(engine_b):
    """A and B both fit θ-weighted ridge problems; A's edge is FirstOrder, B's ``engine_b``; O reads both."""
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    th = torch.full((3,), -0.5, dtype=torch.float64, requires_grad=True)

    def ridge(name):
        return lambda c, b: ((X @ c[name] - y) ** 2).mean() + (c["O"].exp() * c[name] ** 2).sum()
    a = mlo.Problem("A", torch.zeros(3, dtype=torch.float64, requires_grad=True), ridge("A"), _sgd(),
                    reads=["O"], steps=2, engine=mlo.FirstOrder())
    b = mlo.Problem("B", torch.zeros(3, dtype=torch.float64, requires_grad=True), ridge("B"), _sgd(),
                    reads=["O"], steps=2, engine=engine_b)
    o = mlo.Problem("O", th, lambda c, b_: ((X[:4] @ (c["A"] + c["B"]) - y[:4]) ** 2).mean(), _sgd(),
                    reads=["A", "B"])
    return mlo.Graph([a, b, o])


@pytest.mark.parametrize("engine_b", [mlo.Unrolled(steps=2), mlo.CG(iterations=10), mlo.FiniteDifference()],
                         ids=["Unrolled", "CG", "FiniteDifference"])
def test_first_order_is_judged_the_same_way_beside_every_engine(engine_b):
    report = mlo.check_hypergradient(_two_lower(engine_b), "O")
    note = "edge A->O: FirstOrder drops the path through it; the reference drops it too"
    assert report.ok and any(n.startswith(note) for n in report.notes), str(report)
    assert not any(n.startswith("edge B->O") and "drops" in n for n in report.notes)


# ------------------------------------------------------------------ premises of the implicit engines
def test_an_unsolved_inner_problem_and_an_unconverged_solver_get_their_hints():
    unsolved = mlo.check_hypergradient(_ridge(mlo.CG(iterations=30)), "outer")     # 3 steps from the start
    assert unsolved.ok, str(unsolved)            # CG solves the system it is given: the engine is right ...
    assert any("inner problem not solved: use Unrolled or more steps" in p for p in unsolved.premises)
    assert not any("not converged" in p for p in unsolved.premises)   # ... and its solver converged
    neumann = mlo.check_hypergradient(_ridge(mlo.Neumann(iterations=20)), "outer")
    assert not neumann.ok and any("Neumann not converged: raise iterations" in p for p in neumann.premises)
    solved = mlo.check_hypergradient(_ridge(mlo.CG(iterations=30), steps=400), "outer")
    assert solved.ok and len(solved.premises) == 2 and not any(";" in p for p in solved.premises), str(solved)


def test_the_implicit_reference_is_built_by_torch_func_and_matches_the_closed_form():
    """Ridge: ℓ = mean((Xw − y)²) + Σ e^λ w², F = mean((X₅w − y₅)²) at w' (after 400 steps):
    dF/dλ = −Mᵀ H⁻¹ ∇F with H = 2XᵀX/n + 2 diag(e^λ), M = 2 diag(e^λ w')."""
    graph = _ridge(references.FuncImplicit(), steps=400)
    got = mlo.hypergradient(graph, "outer")["total"]
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    mlo.Stepper(graph).direction("outer")          # take the inner steps; read w' there
    w = graph.problems["inner"].params_tree[""].detach()
    lam = graph.problems["outer"].params_tree[""].detach()
    H = 2 * X.T @ X / 20 + 2 * torch.diag(lam.exp())
    dF = 2 * X[:5].T @ (X[:5] @ w - y[:5]) / 5
    want = -(2 * lam.exp() * w) * torch.linalg.solve(H, dF)
    assert float((got - want).norm() / want.norm()) < 1e-12


# ------------------------------------------------------------------ engines at their limit
def _curved(engine):
    """A one-step inner problem with a quartic term, so DARTS' difference at 0.01 is visibly off."""
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    w = (0.5 * torch.randn(3, generator=g, dtype=torch.float64)).requires_grad_(True)
    lam = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    inner = mlo.Problem("inner", w, lambda c, b: ((X @ c["inner"] - y) ** 2).mean()
                        + (c["outer"].exp() * c["inner"] ** 4).sum(), _sgd(0.5), reads=["outer"], engine=engine)
    outer = mlo.Problem("outer", lam, lambda c, b: ((X[:4] @ c["inner"] - y[:4]) ** 2).mean(), _sgd(),
                        reads=["inner"])
    return mlo.Graph([inner, outer])


class _LimitedWrapper(_Wrapped):
    """The counting wrapper, declaring what it wraps approximates and how to move it to its limit."""

    def reference(self):
        return self.inner.reference()

    def limit(self, radius):
        return _LimitedWrapper(self.inner.limit(radius))


class _ReferenceOnly(_Wrapped):
    """A wrapper that says what it approximates but not how to move it to its limit."""

    def reference(self):
        return self.inner.reference()


def test_a_wrapped_finite_difference_is_judged_like_finite_difference():
    fd = mlo.FiniteDifference(eps=0.5)
    plain = mlo.check_hypergradient(_curved(fd), "outer")
    wrapped = mlo.check_hypergradient(_curved(_LimitedWrapper(fd)), "outer")
    assert plain.ok and wrapped.ok, str(wrapped)
    assert wrapped.configured_error == pytest.approx(plain.configured_error) and plain.configured_error > 1e-4
    bare = mlo.check_hypergradient(_curved(_Wrapped(fd)), "outer")     # no limit(): judged as configured
    assert not bare.ok and bare.rel_error == pytest.approx(plain.configured_error)
    half = mlo.check_hypergradient(_curved(_ReferenceOnly(fd)), "outer")   # says what it approximates: noted
    assert not half.ok and any("_ReferenceOnly approximates Unrolled(steps=1" in n and "no limit()" in n
                               for n in half.notes), str(half)
    three = mlo.check_hypergradient(_ridge(_LimitedWrapper(fd), steps=3), "outer")   # noted like FD itself
    assert any("_LimitedWrapper differentiates only the last 1 of the 3 steps" in n for n in three.notes), str(three)


# ------------------------------------------------------------------ batches and structure
def _data_graph(params, objective):
    batches = [torch.full((2,), float(i + 1), dtype=torch.float64) for i in range(5)]
    inner = mlo.Problem("inner", torch.ones(2, dtype=torch.float64, requires_grad=True),
                        lambda c, b: ((c["inner"] - b) ** 2).sum() + objective(c), _sgd(), data=batches,
                        reads=["outer"])
    outer = mlo.Problem("outer", params, lambda c, b: (c["inner"] ** 3).sum(), _sgd(), reads=["inner"])
    return mlo.Graph([inner, outer])


def test_drawn_batches_pin_repeated_calls_and_results_keep_the_declared_structure():
    theta = torch.tensor([0.2, -0.1], dtype=torch.float64, requires_grad=True)
    graph = _data_graph(theta, lambda c: (c["outer"] * c["inner"]).sum())
    first, second = (mlo.hypergradient(graph, "outer")["total"] for _ in range(2))
    assert isinstance(first, torch.Tensor) and not torch.equal(first, second)      # the stream moved on
    pinned = mlo.draw_batches(graph, "outer")
    a, b = (mlo.hypergradient(graph, "outer", batches=pinned)["total"] for _ in range(2))
    assert torch.equal(a, b)
    report = mlo.check_hypergradient(graph, "outer", batches=pinned)
    assert report.ok and report.batches["inner"] == pinned["inner"]
    lst = [torch.tensor([0.2], dtype=torch.float64, requires_grad=True),
           torch.tensor([-0.1], dtype=torch.float64, requires_grad=True)]
    as_list = mlo.hypergradient(_data_graph(lst, lambda c: c["outer"][0] * c["inner"][0] + c["outer"][1]
                                            * c["inner"][1]), "outer")
    assert isinstance(as_list["total"], list) and len(as_list["hyper"]) == 2
    lin = nn.Linear(2, 1).double()
    as_module = mlo.hypergradient(_data_graph(lin, lambda c: c.forward(lin, c["inner"]).sum()), "outer",
                                  return_adjoints=True)
    assert set(as_module["total"]) == {"weight", "bias"} and isinstance(as_module["adjoints"]["inner"], torch.Tensor)


def test_a_mismatch_cites_the_paths_the_graph_says_are_dropped():
    """The three-level chain with DARTS' difference on the weights' edge: the graph names the nested
    path it cannot differentiate, and the checker's MISMATCH cites it."""
    from .test_nested_exact import PATH, _chain_data, chain_graph
    with pytest.warns(UserWarning):
        graph = chain_graph(_chain_data(), weights_engine=mlo.FiniteDifference())
    report = mlo.check_hypergradient(graph, "reg")
    assert not report.ok
    assert any(" -> ".join(PATH) in n and "Graph.dropped_paths" in n for n in report.notes), str(report)
    assert mlo.check_hypergradient(chain_graph(_chain_data()), "reg").ok


def test_implicit_maml_on_a_few_inner_steps_gets_both_hints():
    """The few-shot situation of the implicit MAML example: a non-convex inner problem after 5 SGD
    steps, CG(3): the check says the inner problems are not solved and CG has not converged."""
    from tests.apps.test_maml import _tiny_graph
    report = mlo.check_hypergradient(_tiny_graph(mlo.CG(iterations=3), steps=5, lam=1.0)[0], "meta", directions=2)
    assert not report.ok
    text = str(report)
    assert text.count("inner problem not solved: use Unrolled or more steps") == 2, text
    assert "CG not converged: raise iterations" in text


def test_bad_arguments_are_one_line_errors():
    graph = _ridge(mlo.Unrolled(steps=3))
    with pytest.raises(mlo.GraphError, match="unknown problem 'outr'; did you mean 'outer'"):
        mlo.check_hypergradient(graph, "outr")
    with pytest.raises(mlo.GraphError, match="unknown problem 'outr'"):
        mlo.hypergradient(graph, "outr")
    with pytest.raises(mlo.ConfigError, match="eps: expected a finite number > 0, got 0"):
        mlo.check_hypergradient(graph, "outer", eps=0)
    with pytest.raises(mlo.ConfigError, match="tol: expected a finite number > 0"):
        mlo.check_hypergradient(graph, "outer", tol=float("nan"))


@pytest.mark.parametrize("where", ["mixed_vjp", "hvp"])
def test_a_bug_in_the_engines_own_products_does_not_pass(where, monkeypatch):
    """The implicit reference does not share the engines' Hessian and mixed products: scale one of
    them wrongly and the check of a converged CG says MISMATCH."""
    graph = _ridge(mlo.CG(iterations=30), steps=400)
    assert mlo.check_hypergradient(graph, "outer").ok
    import mlo.engines.implicit as implicit
    right = getattr(implicit, where)
    monkeypatch.setattr(implicit, where, lambda *a: {k: (1.5 * v if isinstance(v, torch.Tensor) else
                                                         {kk: 1.5 * vv for kk, vv in v.items()})
                                                     for k, v in right(*a).items()})
    report = mlo.check_hypergradient(graph, "outer")
    assert not report.ok and report.rel_error > 0.2, str(report)
