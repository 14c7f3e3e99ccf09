"""Auxiliary passes (look-aheads, ± perturbations, HVP recomputation) must not move
BatchNorm running statistics; ``mlo.hypergradient`` must leave everything as it was."""
import copy

import pytest
import torch
from torch import nn

import mlo

ENGINES = [mlo.Unrolled(), mlo.FiniteDifference(), mlo.Neumann(iterations=3, alpha=0.05), mlo.CG(iterations=3)]


def _batches(seed, n, count=3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        out.append((x, torch.sin(x.sum(1, keepdim=True))))
    return out


def make_net(dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(6, 1))
    return nn.Sequential(*layers).double().train()


def build(engine, net, momentum=0.0, outer_lr=0.1):
    theta = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)

    def inner_obj(ctx, batch):
        x, y = batch
        pen = sum((v ** 2).sum() for v in ctx["inner"].values())
        return ((ctx.forward(net, x) - y) ** 2).mean() + 0.5 * torch.exp(ctx["outer"]) * pen

    def outer_obj(ctx, batch):
        x, y = batch
        return ((ctx.forward(net, x) - y) ** 2).mean()

    inner = mlo.Problem("inner", net, inner_obj, lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum),
                        data=_batches(1, 16), reads=["outer"], engine=engine)
    outer = mlo.Problem("outer", theta, outer_obj, lambda p: torch.optim.SGD(p, lr=outer_lr), data=_batches(2, 12),
                        reads=["inner"])
    return mlo.Graph([inner, outer])


def _buffers(net):
    return {k: b.detach().clone() for k, b in net.named_buffers()}


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: type(e).__name__)
def test_step_buffers_identical_to_first_order(engine):
    net_a = make_net()
    net_b = copy.deepcopy(net_a)
    init = _buffers(net_a)
    # outer lr 0: the hyperparameter stays equal in both graphs, so the real passes are identical
    ga, gb = build(engine, net_a, outer_lr=0.0), build(mlo.FirstOrder(), net_b, outer_lr=0.0)
    sa, sb = mlo.Stepper(ga), mlo.Stepper(gb)
    for _ in range(2):
        ma = sa.step()
        sb.step()
        assert ma["outer"]["hypergrad_norm"] > 0  # the engine did contribute
    assert sa.vjp_calls["inner->outer"] == 2 and not sb.vjp_calls
    ba, bb = _buffers(net_a), _buffers(net_b)
    # the primary passes did move the statistics (2 steps x 2 forwards) ...
    assert int(ba["1.num_batches_tracked"]) == 4
    assert not torch.equal(ba["1.running_mean"], init["1.running_mean"])
    # ... and the engine's auxiliary passes added nothing
    for k in ba:
        assert torch.equal(ba[k], bb[k]), k
    for k, p in net_a.named_parameters():
        assert torch.equal(p, dict(net_b.named_parameters())[k]), k


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: type(e).__name__)
def test_hypergradient_leaves_everything_unchanged(engine):
    net = make_net()
    graph = build(engine, net)
    mlo.Stepper(graph).step()  # non-trivial starting state
    bufs = _buffers(net)
    params = {n: {k: v.detach().clone() for k, v in p.params_tree.items()} for n, p in graph.problems.items()}
    rng = torch.get_rng_state()
    out = mlo.hypergradient(graph, "outer")
    assert torch.isfinite(out["total"]).all() and out["hyper"].abs() > 0
    assert torch.equal(rng, torch.get_rng_state())
    for k, b in _buffers(net).items():
        assert torch.equal(b, bufs[k]), k
    for n, p in graph.problems.items():
        for k, v in p.params_tree.items():
            assert torch.equal(v, params[n][k]), (n, k)
    # and it is repeatable
    again = mlo.hypergradient(graph, "outer", batches={"inner": _batches(1, 16)[1], "outer": _batches(2, 12)[1]})
    same = mlo.hypergradient(graph, "outer", batches={"inner": _batches(1, 16)[1], "outer": _batches(2, 12)[1]})
    assert torch.equal(again["total"], same["total"])


def test_hypergradient_restores_momentum_state():
    net = make_net()
    graph = build(mlo.Unrolled(), net, momentum=0.9)
    mlo.Stepper(graph).step()
    opt = graph.problems["inner"].torch_optimizer
    bufs = {id(p): opt.state[p]["momentum_buffer"].clone() for p in net.parameters()}
    fixed = {"inner": _batches(1, 16)[0], "outer": _batches(2, 12)[0]}
    a = mlo.hypergradient(graph, "outer", batches=fixed)["total"]
    for p in net.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], bufs[id(p)])
    b = mlo.hypergradient(graph, "outer", batches=fixed)["total"]
    assert torch.equal(a, b)


def test_dropout_masks_replayed_exactly():
    """With dropout, Unrolled matches the central difference of the real composition
    only if the look-ahead replays the step's random masks."""
    net = make_net(dropout=0.3)
    graph = build(mlo.Unrolled(), net)
    torch.manual_seed(3)
    rep = mlo.check_hypergradient(graph, "outer", eps=1e-5, tol=1e-7)
    assert rep.ok, str(rep)

