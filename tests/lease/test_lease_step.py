"""One LeaSE step on a tiny supernet in float64: the architecture hypergradient that mlo
computes equals the chain rule of docs/mlo.md §2 (the reverse sweep) written out with plain autograd."""
import copy

import pytest
import torch
import torch.nn.functional as F

import mlo
from applications.lease import explain

from .tiny_graph import GAMMA, LR_D, LR_W, exact_config, explainer_step_by_autograd, tiny_lease_graph

DT = torch.float64


def _chain_rule(explainer, audience, bank, batches) -> dict:
    """g_A through E' = E − ξ_E∇L_E, δ' = δ + ξ_Δ∇L_Δ, W' = W − ξ_W∇L_W, by plain autograd."""
    E, A, W, D, f, g, E1 = explainer_step_by_autograd(explainer, audience, bank, batches)
    xa, ya, idx = batches["explanation"]
    A_const = {k: v.detach() for k, v in A.items()}
    d = D[idx]
    L_d = explain.explanation_loss(f(E1, A_const, xa + d), f(E1, A_const, xa))
    D1 = D + LR_D * torch.autograd.grad(L_d, D, create_graph=True)[0]          # ascent: it is a max
    gW = torch.autograd.grad(F.cross_entropy(g(W, xa * D1[idx]), ya), list(W.values()), create_graph=True)
    W1 = {k: v - LR_W * gk for (k, v), gk in zip(W.items(), gW)}
    xv, yv, _ = batches["architecture"]
    O_A = F.cross_entropy(f(E1, A, xv), yv) + GAMMA * F.cross_entropy(g(W1, xv), yv)
    return dict(zip(A, torch.autograd.grad(O_A, list(A.values()))))


def _flat(tree):
    return torch.cat([v.reshape(-1) for v in tree.values()])


def test_unrolled_hypergradient_equals_explicit_chain_rule():
    graph, explainer, audience, bank, batches = tiny_lease_graph(exact_config("unrolled"))
    expected = _chain_rule(explainer, audience, bank, batches)
    got = mlo.hypergradient(graph, "architecture")["total"]
    assert set(got) == set(expected)
    e, g = _flat(expected), _flat(got)
    assert e.norm() > 0
    assert torch.allclose(g, e, rtol=1e-8, atol=1e-12), (g - e).norm() / e.norm()


def test_audience_path_contributes():
    """The A → E' → Δ' → W' path is not zero: dropping the audience edge changes g_A."""
    full = mlo.hypergradient(tiny_lease_graph(exact_config("unrolled"))[0], "architecture")["total"]
    cut = mlo.hypergradient(tiny_lease_graph(exact_config("unrolled", **{"engines.audience.name": "first_order"}))[0],
                            "architecture")["total"]
    assert (_flat(full) - _flat(cut)).norm() > 1e-6 * _flat(full).norm()


def test_finite_difference_close_to_exact():
    """Central differences on every edge. The tiny ReLU/max-pool network has kinks within
    DARTS' default 0.01 perturbation, so a smaller eps is used to compare with the exact value."""
    cfg = exact_config("finite_difference", **{f"engines.{e}.eps": 1e-5 for e in ("explainer", "explanation", "audience")})
    graph, explainer, audience, bank, batches = tiny_lease_graph(cfg)
    expected = _flat(_chain_rule(explainer, audience, bank, batches))
    got = _flat(mlo.hypergradient(graph, "architecture")["total"])
    assert (got - expected).norm() / expected.norm() < 1e-4


def test_check_hypergradient_agrees_for_exact_engines_in_baseline_mode():
    """DARTS-2nd (exact): the engine matches a central difference of the composed step.
    (LeaSE mode, whose explanation problem declares A a constant, is checked in test_check_lease.py.)"""
    graph = tiny_lease_graph(exact_config("unrolled", mode="baseline"))[0]
    report = mlo.check_hypergradient(graph, "architecture", directions=3, tol=1e-6)
    assert report.ok, str(report)


def _snapshot(explainer, audience, bank):
    snap = {"E": copy.deepcopy(dict(explainer.named_weight_parameters())),
            "A": copy.deepcopy(dict(explainer.named_arch_parameters())), "D": bank.detach().clone()}
    if audience is not None:
        snap["W"] = copy.deepcopy(dict(audience.named_parameters()))
    return snap


def _changed(before: dict, after: dict) -> bool:
    if isinstance(before, torch.Tensor):
        return not torch.equal(before, after)
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_lease_step_changes_all_four_and_only_batch_rows_of_bank():
    graph, explainer, audience, bank, batches = tiny_lease_graph(exact_config("finite_difference"))
    before = _snapshot(explainer, audience, bank)
    mlo.Stepper(graph).step()
    after = _snapshot(explainer, audience, bank)
    for key in ("E", "A", "D", "W"):
        assert _changed(before[key], after[key]), key
    idx = batches["explanation"][2]
    rows = torch.zeros(bank.shape[0], dtype=torch.bool)
    rows[idx] = True
    assert not torch.equal(before["D"][rows], after["D"][rows])
    assert torch.equal(before["D"][~rows], after["D"][~rows])


def test_baseline_step_changes_only_explainer_and_architecture():
    graph, explainer, audience, bank, _ = tiny_lease_graph(exact_config("finite_difference", mode="baseline"))
    assert graph.order == ["explainer", "architecture"]
    before_bank = bank.detach().clone()
    before = _snapshot(explainer, None, bank)
    mlo.Stepper(graph).step()
    after = _snapshot(explainer, None, bank)
    assert _changed(before["E"], after["E"]) and _changed(before["A"], after["A"])
    assert torch.equal(before_bank, bank.detach())


def test_pgd_cuts_the_audience_path():
    """With PGD explanations the audience's validation loss gives A no gradient."""
    pgd = {"explain.method": "pgd", "explain.pgd_steps": 2}
    graph = tiny_lease_graph(exact_config("unrolled", **pgd))[0]
    assert graph.plans["architecture"].upstream == ("explainer",)
    g_pgd = _flat(mlo.hypergradient(graph, "architecture")["total"])
    g_no_audience = _flat(mlo.hypergradient(tiny_lease_graph(exact_config("unrolled", gamma=0.0, **pgd))[0], "architecture")["total"])
    assert g_pgd.norm() > 0
    assert torch.allclose(g_pgd, g_no_audience, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("reweight", ["mul", "mul_abs", "mul_one_plus_abs"])
def test_reweight_options(reweight):
    x, d = torch.tensor([2.0, 3.0]), torch.tensor([-0.5, 0.25])
    want = {"mul": x * d, "mul_abs": x * d.abs(), "mul_one_plus_abs": x * (1 + d.abs())}[reweight]
    assert torch.equal(explain.reweight(x, d, reweight), want)


def test_explanation_edge_runs_the_clean_pass_once():
    """The Δ'→E' finite difference shares f(x; E') between its two points: three explainer
    passes, not four, and the same numbers as evaluating both points in full."""
    graph, explainer, _, _, _ = tiny_lease_graph(exact_config("finite_difference", **{"engines.explanation.eps": 1e-4}))
    stepper = mlo.Stepper(graph)
    stepper.direction("architecture")
    site = stepper.runs["explanation"]
    u = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
         for k, v in site.solution.items()}
    calls = []
    hook = explainer.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = mlo.FiniteDifference(eps=1e-4).vjp(site, u, ["explainer"])["explainer"]
    finally:
        hook.remove()
    assert len(calls) == 3
    # both points in full (no sharing), as the definition reads
    rec = site.records[-1]
    w = {k: t.detach() for k, t in rec.params.items()}
    v = {k: -LR_D * t for k, t in u.items()}           # SGD on the signed loss: (∂U/∂g)ᵀu = −ξ_Δ·u
    scale = 1e-4 / _flat(v).norm()
    out = []
    for sgn in (1.0, -1.0):
        reads = site.bind(["explainer"])
        loss = site.loss({k: w[k] + sgn * scale * v[k] for k in w}, reads, rec)
        out.append(torch.autograd.grad(loss, list(reads["explainer"].values()), allow_unused=True,
                                       materialize_grads=True))
    want = {k: (a - b) / (2 * scale) for k, a, b in zip(site.reads["explainer"], *out)}
    assert float(_flat(want).abs().max()) > 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-7, atol=1e-9)   # rounding / 2ε


@pytest.mark.parametrize("engine,extra", [("unrolled", {}), ("finite_difference", {}),
                                          ("unrolled", {"explain.method": "pgd", "explain.pgd_steps": 2})],
                         ids=["unrolled", "finite_difference", "pgd"])
def test_row_sparse_bank_equals_the_dense_bank(engine, extra):
    """The bank declared row-sparse (the default) and dense: the same architecture hypergradient
    (float64, 1e-12) and the same four problems after two steps; the sparse bank's step records
    hold the batch's rows only."""
    cfg = exact_config(engine, **extra)
    assert rel_err(_flat(mlo.hypergradient(tiny_lease_graph(cfg)[0], "architecture")["total"]),
                   _flat(mlo.hypergradient(tiny_lease_graph(cfg, sparse_bank=False)[0], "architecture")["total"])) <= 1e-12
    runs = []
    for sparse in (True, False):
        graph, explainer, audience, bank, batches = tiny_lease_graph(cfg, sparse_bank=sparse)
        stepper = mlo.Stepper(graph)
        for _ in range(2):
            stepper.step()
        runs.append(_snapshot(explainer, audience, bank))
        if sparse and "explanation" in stepper.runs:
            n_rows = batches["explanation"][2].unique().numel()
            assert stepper.runs["explanation"].records[-1].params[""].shape[0] == n_rows < bank.shape[0]
    if extra:   # PGD: the dense step also projects the rows it did not visit (this bank starts wider than ε)
        seen = batches["explanation"][2]
        runs[0]["D"], runs[1]["D"] = runs[0]["D"][seen], runs[1]["D"][seen]
    for key in ("E", "A", "W", "D"):
        a, b = runs[0][key], runs[1][key]
        a, b = (_flat(a), _flat(b)) if isinstance(a, dict) else (a, b)
        assert rel_err(a, b) <= 1e-12, key


def rel_err(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))
