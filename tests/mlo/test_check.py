"""The checker compares each engine with its own target, holds declared constants fixed, and
leaves the caller's random streams alone; a sweep's adjoints are public."""
import os
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

import mlo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _readme_example() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## A bilevel problem in 20 lines"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_checks_ok_in_float64(tmp_path, monkeypatch):
    """The README's own code (CG engine), run as written in float64: its check says OK against the
    implicit hypergradient, which the unrolled composition is not (the lower problem is unconverged)."""
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), scope)      # float64: the tests' default dtype
    graph = scope["graph"]
    assert graph.engines[("model", "hyper")] == mlo.CG(iterations=10)
    report = mlo.check_hypergradient(graph, "hyper")
    assert report.ok, str(report)
    assert report.reference == mlo.check.IMPLICIT and str(report).startswith("OK")
    unrolled = graph.with_engines(lambda e: mlo.Unrolled(steps=5))   # the composition, engine for engine
    assert mlo.check_hypergradient(unrolled, "hyper").ok
    assert not torch.allclose(mlo.hypergradient(graph, "hyper")["total"],
                              mlo.hypergradient(unrolled, "hyper")["total"], rtol=1e-3)
    # the premises are in the report: five steps do not solve the lower problem; Neumann(20) has not converged
    assert any("inner problem not solved: use Unrolled or more steps" in p for p in report.premises), str(report)
    neumann = mlo.check_hypergradient(graph.with_engines(lambda e: mlo.Neumann(iterations=20)), "hyper")
    assert not neumann.ok and "Neumann not converged: raise iterations" in str(neumann), str(neumann)


def _ridge(engine, dtype=torch.float64, n=6, steps=3):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, n, generator=g, dtype=dtype), torch.randn(20, generator=g, dtype=dtype)
    w = (0.3 * torch.randn(n, generator=g, dtype=dtype)).requires_grad_(True)
    lam = torch.full((n,), -1.0, dtype=dtype, requires_grad=True)
    inner = mlo.Problem("inner", w, lambda c, b: ((X @ c["inner"] - y) ** 2).mean()
                        + (c["outer"].exp() * c["inner"] ** 2).sum(),
                        lambda p: torch.optim.SGD(p, lr=0.1), reads=["outer"], steps=steps, engine=engine)
    outer = mlo.Problem("outer", lam, lambda c, b: ((X[:5] @ c["inner"] - y[:5]) ** 2).mean(),
                        lambda p: torch.optim.SGD(p, lr=0.1), reads=["inner"])
    return mlo.Graph([inner, outer])


def test_implicit_engines_are_checked_against_their_target():
    assert mlo.check_hypergradient(_ridge(mlo.Neumann(iterations=300, alpha=0.05)), "outer").ok
    report = mlo.check_hypergradient(_ridge(mlo.Neumann(iterations=1)), "outer")   # far from converged
    assert not report.ok and report.reference == mlo.check.IMPLICIT
    damped = mlo.check_hypergradient(_ridge(mlo.CG(damping=0.1)), "outer")
    assert damped.ok and any("damped system (H + 0.1·I)" in n for n in damped.notes)
    with pytest.raises(mlo.ConfigError, match="cannot check 'outer'.*max_params"):
        mlo.check_hypergradient(_ridge(mlo.CG(), n=5000), "outer", directions=1)


def test_notes_say_when_an_engine_targets_less_than_the_composition():
    report = mlo.check_hypergradient(_ridge(mlo.Unrolled(steps=1)), "outer")
    assert not report.ok
    assert any("Unrolled(steps=1) differentiates only the last 1 of the 3 steps problem 'inner' takes" in n for n in report.notes)
    assert mlo.check_hypergradient(_ridge(mlo.Unrolled(steps=3)), "outer").ok


class _BrokenFD(mlo.FiniteDifference):
    """A finite difference with a wrong scale (what a bug in the engine would look like)."""

    def vjp(self, run, u, wrt):
        return {r: {k: 1.5 * v for k, v in t.items()} for r, t in super().vjp(run, u, wrt).items()}


def test_finite_difference_is_checked_at_its_limit_and_its_configured_error_reported():
    """Quadratic lower problem: DARTS' difference is exact at any radius, so the configured error is
    rounding; a wrongly scaled difference is a MISMATCH whatever the radius."""
    report = mlo.check_hypergradient(_ridge(mlo.FiniteDifference(eps=0.01), steps=1), "outer")
    assert report.ok and report.reference == mlo.check.COMPOSITION, str(report)
    assert report.configured_error is not None and report.configured_error < 1e-7
    assert "at their configured setting the relative error is" in str(report)
    broken = mlo.check_hypergradient(_ridge(_BrokenFD(eps=0.01), steps=1), "outer")
    assert not broken.ok and broken.rel_error == pytest.approx(0.5, rel=1e-3), str(broken)
    assert mlo.check_hypergradient(_ridge(mlo.Unrolled(steps=1), steps=1), "outer").configured_error is None


def test_low_precision_is_refused_or_warned():
    graph = _ridge(mlo.Unrolled(steps=3), dtype=torch.float32)
    with pytest.raises(mlo.ConfigError, match="float32, not float64"):
        mlo.check_hypergradient(graph, "outer")
    with pytest.warns(UserWarning, match="LOW PRECISION"):
        mlo.check_hypergradient(graph, "outer", allow_low_precision=True)


class _Net(nn.Module):
    """f(x) = (x * a) @ w: ``w`` belongs to one problem, ``a`` to another."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))
        self.a = nn.Parameter(torch.rand(3) + 0.5)

    def forward(self, x):
        return (x * self.a) @ self.w


def _constant_graph(declare: bool):
    """LeaSE's shape in small: ``e`` uses the architecture ``a`` as a constant, ``arch`` reads ``e``."""
    torch.manual_seed(1)
    net = _Net()
    x, y, xv, yv = torch.randn(6, 3), torch.randn(6), torch.randn(5, 3), torch.randn(5)
    e0 = (0.5 * torch.randn(6, 3)).requires_grad_(True)

    def e_loss(ctx, batch):   # how far a perturbation moves the trained model's outputs (to be kept small)
        return ((ctx.forward(net, x + ctx["e"]) - ctx.forward(net, x)) ** 2).sum() - (ctx["e"] * x).sum()

    return mlo.Graph([
        mlo.Problem("w", {"w": net.w}, lambda c, b: ((c.forward(net, x) - y) ** 2).mean(),
                    lambda p: torch.optim.SGD(p, lr=0.1), reads=["arch"]),
        mlo.Problem("e", e0, e_loss, lambda p: torch.optim.SGD(p, lr=0.1), reads=["w"],
                    constants=["arch"] if declare else ()),
        mlo.Problem("arch", {"a": net.a}, lambda c, b: ((c.forward(net, xv) - yv) ** 2).mean()
                    + (c["e"] ** 2).sum(), lambda p: torch.optim.SGD(p, lr=0.1), reads=["w", "e"]),
    ])


def test_declared_constants_are_held_fixed_by_the_checker():
    undeclared = mlo.check_hypergradient(_constant_graph(declare=False), "arch")
    assert not undeclared.ok
    assert any("'e' uses the parameters of 'arch'" in n and "Problem.constants" in n for n in undeclared.notes), undeclared.notes
    declared = mlo.check_hypergradient(_constant_graph(declare=True), "arch")
    assert declared.ok and not declared.notes, str(declared)
    # declaring changes nothing else: the engines held it fixed either way
    a = mlo.hypergradient(_constant_graph(False), "arch")["total"]["a"]
    b = mlo.hypergradient(_constant_graph(True), "arch")["total"]["a"]
    assert torch.equal(a, b)


def test_constants_are_validated_and_readable_detached():
    g = _constant_graph(declare=True)
    seen = {}

    def peek(ctx, batch):
        seen["a"] = ctx["arch"]["a"]
        return (ctx["peek"] ** 2).sum()
    mlo.Stepper(mlo.Graph([*g.problems.values(), mlo.Problem("peek", torch.ones(1, requires_grad=True), peek,
                                                               lambda p: torch.optim.SGD(p, lr=0.1),
                                                               constants=["arch"])],
                          allow_unread=["peek"])).step()
    assert not seen["a"].requires_grad and torch.equal(seen["a"], g.problems["arch"].params_tree["a"].detach())
    with pytest.raises(mlo.ConfigError, match="in both reads and constants"):
        mlo.Problem("p", torch.ones(1, requires_grad=True), peek, lambda p: torch.optim.SGD(p, lr=0.1),
                    reads=["q"], constants=["q"])
    with pytest.raises(mlo.GraphError, match="constants: unknown problem 'arhc'"):
        mlo.Graph([mlo.Problem("p", torch.ones(1, requires_grad=True), peek, lambda p: torch.optim.SGD(p, lr=0.1),
                               constants=["arhc"]), g.problems["arch"]], allow_unread=["p", "arch"])


def test_hypergradient_and_check_leave_the_global_random_streams_alone():
    graph = _ridge(mlo.Unrolled(steps=3))

    def streams():
        return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    before = streams()
    mlo.hypergradient(graph, "outer")
    mlo.check_hypergradient(graph, "outer")
    after = streams()
    assert torch.equal(before[0], after[0]) and (before[1] == after[1]).all() and before[2] == after[2]


def test_return_adjoints_gives_what_reached_each_problem():
    graph = _ridge(mlo.Unrolled(steps=3))
    out = mlo.hypergradient(graph, "outer", return_adjoints=True)
    assert set(out["adjoints"]) == {"inner"}
    # the adjoint at inner's solution is d(outer objective)/d(inner's updated w)
    w = graph.problems["inner"].params_tree[""]
    saved = mlo.graph_state_dict(graph)
    mlo.Stepper(graph).direction("outer")        # take inner's real steps, then read the gradient there
    wl = w.detach().clone().requires_grad_(True)
    mlo.load_graph_state_dict(graph, saved)
    expected = torch.autograd.grad(graph.problems["outer"].objective({"inner": wl}, None), wl)[0]
    assert torch.allclose(out["adjoints"]["inner"], expected, rtol=1e-10, atol=1e-12)
    assert "adjoints" not in mlo.hypergradient(graph, "outer")


class _Wrapped(mlo.Engine):
    """An engine that counts its calls and delegates (what a user debugging a sweep might write)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    @property
    def passes_adjoint(self):
        return self.inner.passes_adjoint

    @property
    def needs_records(self):
        return self.inner.needs_records

    def validate_for(self, problem, where):
        self.inner.validate_for(problem, where)

    def vjp(self, run, u, wrt):
        self.calls += 1
        return self.inner.vjp(run, u, wrt)


@pytest.mark.parametrize("inner", [mlo.Unrolled(steps=3), mlo.FirstOrder()])
def test_wrapping_an_engine_does_not_change_the_plan(inner):
    plain = _ridge(inner)
    wrapper = _Wrapped(inner)
    wrapped = plain.with_engines(lambda e: wrapper)
    assert wrapped.plans == {p: type(plan)(plan.upstream, tuple(type(s)(s.problem, tuple((r, wrapper) for r, _ in s.wrt))
                                                                 for s in plan.sweep))
                             for p, plan in plain.plans.items()}
    assert torch.equal(mlo.hypergradient(plain, "outer")["total"], mlo.hypergradient(wrapped, "outer")["total"])
    assert wrapper.calls == (1 if inner.passes_adjoint else 0)


def test_graph_validation_does_not_touch_the_problems_streams():
    data = [torch.ones(2)]
    a = mlo.Problem("a", torch.zeros(2, requires_grad=True), lambda c, b: (c["a"] * b).sum() + c["b"].sum(),
                    lambda p: torch.optim.SGD(p, lr=0.1), data=data, reads=["b"])
    seen = []
    b = mlo.Problem("b", torch.zeros(2, requires_grad=True),
                    lambda c, batch: seen.append(batch) or ((c["b"] - c["a"]) ** 2).sum(),
                    lambda p: torch.optim.SGD(p, lr=0.1), data=mlo.SameBatch("a"), reads=["a"])
    before = [dict(vars(p.stream)) for p in (a, b)]
    graph = mlo.Graph([a, b])
    assert [dict(vars(p.stream)) for p in (a, b)] == before
    mlo.Stepper(graph).step()
    assert seen and seen[0] is data[0] and b.stream.last is data[0]
    with pytest.raises(mlo.ConfigError, match="SameBatch"):
        b.stream.next()
