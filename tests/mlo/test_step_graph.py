"""``Unrolled(reuse_step_graph=True)``: the edge VJP is a double backward through the real step's
kept gradient graph. It must give what ``Unrolled(steps=1)`` gives (same number, float64), take
that path, leave the real updates unchanged, and be configurable like every engine option."""
import pytest
import torch

import mlo
import mlo.engines.unrolled as unrolled

from .test_chain import build as chain

REUSE = mlo.Unrolled(steps=1, reuse_step_graph=True)


@pytest.fixture
def through_graph(monkeypatch):
    calls = []
    real = unrolled._through_step_graph

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(unrolled, "_through_step_graph", spy)
    return calls


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_four_level_chain_same_hypergradient_through_the_step_graph(through_graph):
    """E reads A, which comes later in the order (its value is copied for the kept graph)."""
    plain = mlo.hypergradient(chain(), "A")["total"]
    reused = mlo.hypergradient(chain(REUSE, REUSE, REUSE), "A")["total"]
    assert len(through_graph) == 3                     # W->D, D->E, E->A all took the kept graph
    assert _rel(reused, plain) < 1e-14
    assert mlo.check_hypergradient(chain(REUSE, REUSE, REUSE), "A", tol=1e-7).ok


def _bilevel(engine, optimizer, clip=None, steps=3):
    gen = torch.Generator().manual_seed(3)
    X, y = torch.randn(30, 5, generator=gen, dtype=torch.float64), torch.randn(30, generator=gen, dtype=torch.float64)
    w = (0.5 * torch.randn(5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    lam = torch.full((5,), -0.5, dtype=torch.float64, requires_grad=True)
    inner = mlo.Problem("inner", w, lambda c, b: (torch.tanh(X @ c["inner"]) - y).pow(2).mean()
                        + (c["outer"].exp() * c["inner"] ** 2).sum(), optimizer, reads=["outer"], steps=steps,
                        engine=engine, grad_clip=clip)
    outer = mlo.Problem("outer", lam, lambda c, b: (torch.tanh(X[:10] @ c["inner"]) - y[:10]).pow(2).mean(),
                        lambda p: torch.optim.SGD(p, lr=0.05), reads=["inner"])
    return mlo.Graph([inner, outer])


OPTIMIZERS = {
    "sgd-momentum-decay": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("clip", [None, 0.05])
def test_real_optimizers_and_clip_match_the_recomputation(name, clip, through_graph):
    plain, reused = (_bilevel(e, OPTIMIZERS[name], clip) for e in (mlo.Unrolled(steps=1), REUSE))
    s1, s2 = mlo.Stepper(plain), mlo.Stepper(reused)
    for _ in range(3):          # optimizer state builds up; the real updates must stay identical
        s1.step()
        s2.step()
        for p in ("inner", "outer"):
            a, b = plain.problems[p].params_tree[""], reused.problems[p].params_tree[""]
            assert torch.allclose(a, b, rtol=1e-13, atol=1e-15), (p, _rel(b, a))
    assert len(through_graph) == 3


def test_config_and_refusals():
    assert mlo.engine_from_config({"name": "unrolled", "reuse_step_graph": True}) == REUSE
    assert mlo.engine_to_config(REUSE) == {"name": "unrolled", "steps": 1, "reuse_step_graph": True}
    with pytest.raises(mlo.ConfigError, match=r"engine.reuse_step_graph: expected true or false, got 'yes'"):
        mlo.engine_from_config({"name": "unrolled", "reuse_step_graph": "yes"})
    assert mlo.Unrolled(steps=3, reuse_step_graph=True).reference() == mlo.Unrolled(steps=3)
    assert REUSE.reference() == mlo.Unrolled(steps=1)


@pytest.mark.parametrize("engine, kept", [(REUSE, True), (mlo.Unrolled(), False), (mlo.FiniteDifference(), False)])
def test_the_stepper_keeps_a_step_graph_only_for_reuse_edges(engine, kept):
    """The Stepper decides what to keep (the engine interface has no say): a reuse edge only."""
    stepper = mlo.Stepper(chain(engine, engine, engine))
    stepper.direction("A")
    assert [stepper.runs[p].last.step_graph is not None for p in ("E", "D", "W")] == [kept] * 3


# ---------------------------------------------------------------- K steps: Unrolled(steps=K, reuse_step_graph=True)
@pytest.fixture
def kept_calls(monkeypatch):
    calls = []
    real = unrolled._kept_gradient

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(unrolled, "_kept_gradient", spy)
    return calls


def _close(a, b, tol=1e-12):
    for k in b:
        assert float((a[k] - b[k]).abs().max()) <= tol * float(b[k].abs().max()), (k, a[k], b[k])
        assert b[k].abs().max() > 1e-6


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("k, steps", [(3, 3), (2, 3)])   # all the run's steps; its last two (truncated)
def test_k_steps_through_the_kept_graphs_match_the_recomputation(name, clip, k, steps, kept_calls):
    plain = _bilevel(mlo.Unrolled(steps=k), OPTIMIZERS[name], clip, steps=steps)
    reused = _bilevel(mlo.Unrolled(steps=k, reuse_step_graph=True), OPTIMIZERS[name], clip, steps=steps)
    s1, s2 = mlo.Stepper(plain), mlo.Stepper(reused)
    for _ in range(2):          # real steps: optimizer state builds up, the updates stay the same
        s1.step()
        s2.step()
    a, b = mlo.hypergradient(reused, "outer")["hyper"], mlo.hypergradient(plain, "outer")["hyper"]
    assert len(kept_calls) == 3 * k        # two real steps and the hypergradient, k kept graphs each
    _close({"": a}, {"": b})
    for p in ("inner", "outer"):
        x, y = plain.problems[p].params_tree[""], reused.problems[p].params_tree[""]
        assert torch.allclose(x, y, rtol=1e-13, atol=1e-15), p


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_k_steps_through_the_reset_are_exact_maml(momentum, kept_calls):
    from .test_lifecycle import _hand_maml, _maml
    graph, data = _maml(mlo.Unrolled(steps=3, reuse_step_graph=True), steps=3, lam=0.4, momentum=momentum)
    plain, _ = _maml(mlo.Unrolled(steps=3), steps=3, lam=0.4, momentum=momentum)
    theta = graph.problems["meta"].params_tree[""]
    got = {"": mlo.hypergradient(graph, "meta")["hyper"]}
    assert len(kept_calls) == 3
    _close(got, {"": mlo.hypergradient(plain, "meta")["hyper"]})
    _close(got, {"": _hand_maml(theta, data, 3, 0.1, lam=0.4, momentum=momentum)})
    assert mlo.check_hypergradient(graph, "meta").ok


def test_k_steps_on_a_task_batched_problem(kept_calls):
    from .test_lifecycle import _meta_graphs
    _, reused = _meta_graphs(mlo.Unrolled(steps=3, reuse_step_graph=True))
    _, plain = _meta_graphs(mlo.Unrolled(steps=3))
    separate, _ = _meta_graphs(mlo.Unrolled(steps=3))
    got = mlo.hypergradient(reused, "meta")["hyper"]
    assert len(kept_calls) == 3
    _close(got, mlo.hypergradient(plain, "meta")["hyper"])
    _close(got, mlo.hypergradient(separate, "meta")["hyper"], tol=1e-10)
