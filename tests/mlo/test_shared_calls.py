"""The finite difference runs a module call that does not see the perturbed
parameters once for both points (``mlo.shared.SharedCalls``), and the result is
the same as evaluating both points in full."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlo
from mlo.tree import grads


class Counting(nn.Module):
    """A small classifier that counts its forward calls (with optional dropout)."""

    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Dropout(dropout), nn.Linear(7, 3))
        self.double().train()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.body(x)


def _data(seed, n=6, count=3):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen),
             torch.arange(n)) for _ in range(count)]


def build(net, clean_uses_batch=True, in_place=False):
    """Explainer E (weights of ``net``, reads the top), explanation bank Δ (max), a top problem reading Δ'."""
    bank = torch.full((6, 5), 0.1, dtype=torch.float64, requires_grad=True)
    top_w = torch.zeros(5, dtype=torch.float64, requires_grad=True)

    def explainer_obj(ctx, batch):
        x, y, _ = batch
        logits = ctx.forward(net, x)
        return F.cross_entropy(logits, y) + 0.1 * (logits.sum(1) * (x @ ctx["top"])).mean()

    def explanation_obj(ctx, batch):
        x, _, idx = batch
        delta = ctx["explanation"][idx]
        clean_in = x if clean_uses_batch else x + 0 * delta
        perturbed, clean = ctx.forward(net, x + delta), ctx.forward(net, clean_in)
        if in_place:                      # objectives may modify what a (shared) call returned
            clean.mul_(2.0)
        return -(F.softmax(clean, 1) * F.log_softmax(perturbed, 1)).sum()

    def top_obj(ctx, batch):
        x, _, idx = batch
        return ((ctx["explanation"][idx] * x).sum(1) ** 2).mean() + (ctx["top"] ** 2).sum()

    return mlo.Graph([
        mlo.Problem("explainer", dict(net.named_parameters()), explainer_obj,
                    lambda p: torch.optim.SGD(p, lr=0.1), data=_data(1), reads=["top"]),
        mlo.Problem("explanation", bank, explanation_obj, lambda p: torch.optim.SGD(p, lr=0.5), data=_data(2),
                    reads=["explainer"], mode="max", engine=mlo.FiniteDifference(eps=1e-4)),
        mlo.Problem("top", top_w, top_obj, lambda p: torch.optim.SGD(p, lr=0.1), data=_data(3),
                    reads=["explanation"]),
    ])


def reference_vjp(site, u, eps):
    """Both points evaluated in full, no sharing (the definition)."""
    rec = site.records[-1]
    w = {k: v.detach() for k, v in rec.params.items()}
    v = {k: -site.lr * t for k, t in u.items()}     # plain SGD: (∂U/∂g)ᵀu = -lr·u
    scale = eps / torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in v.values()]))
    out = []
    for sgn in (1.0, -1.0):
        reads = site.bind(["explainer"])
        loss = site.loss({k: w[k] + sgn * scale * v[k] for k in w}, reads, rec)
        out.append(grads(loss, reads["explainer"]))
    return {k: (out[0][k] - out[1][k]) / (2 * scale) for k in out[0]}


@pytest.mark.parametrize("dropout,in_place", [(0.0, False), (0.3, False), (0.0, True)])
def test_shared_clean_pass_matches_full_evaluation(dropout, in_place):
    net = Counting(dropout)
    graph = build(net, in_place=in_place)
    stepper = mlo.Stepper(graph)
    stepper.direction("top")
    site = stepper.runs["explanation"]
    gen = torch.Generator().manual_seed(5)
    u = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in site.solution.items()}
    net.calls = 0
    got = mlo.FiniteDifference(eps=1e-4).vjp(site, u, ["explainer"])["explainer"]
    assert net.calls == 3                       # perturbed pass twice, clean pass once
    net.calls = 0
    want = reference_vjp(site, u, 1e-4)
    assert net.calls == 4
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-8, atol=1e-10)
    assert max(float(t.abs().max()) for t in want.values()) > 1e-3     # not trivially zero


def test_calls_that_see_the_perturbed_parameters_are_not_shared():
    net = Counting()
    graph = build(net, clean_uses_batch=False)   # the clean input now depends on Δ
    stepper = mlo.Stepper(graph)
    stepper.direction("top")
    site = stepper.runs["explanation"]
    u = {k: torch.ones_like(t) for k, t in site.solution.items()}
    net.calls = 0
    got = mlo.FiniteDifference(eps=1e-4).vjp(site, u, ["explainer"])["explainer"]
    assert net.calls == 4
    want = reference_vjp(site, u, 1e-4)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-8, atol=1e-10)


def test_a_different_rng_state_is_not_reused():
    """Sharing requires the same RNG state before the call; otherwise the call runs again."""
    net = Counting(0.5)
    shared = mlo.shared.SharedCalls(batch=None, own="p")
    x = torch.randn(4, 5, dtype=torch.float64)
    runs = []

    def run():
        runs.append(1)
        return net(x)

    torch.manual_seed(1)
    a = shared.call(("k",), run)
    after_first = torch.get_rng_state()
    torch.manual_seed(1)
    b = shared.call(("k",), run)
    assert len(runs) == 1 and torch.equal(a, b) and b is not a     # each caller gets its own copy
    assert torch.equal(torch.get_rng_state(), after_first)   # the state the call would have left
    torch.manual_seed(2)
    shared.call(("k",), run)
    assert len(runs) == 2
