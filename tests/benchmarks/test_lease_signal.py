"""``benchmarks.lease_signal``: its split of the architecture's hypergradient against plain autograd,
and the invariants of its ``--quick`` table."""
import json
import math

import torch
import torch.nn.functional as F

import mlo
from applications.lease import explain
from benchmarks import lease_signal
from tests.lease.tiny_graph import GAMMA, LR_D, LR_W, exact_config, explainer_step_by_autograd, tiny_lease_graph
from tests.subproc import run_module


def _parts_by_autograd(explainer, audience, bank, batches) -> dict:
    """direct / DARTS / chain written out: E' = E − ξ_E∇L_E, δ' = δ + ξ_Δ∇L_Δ(E'), W' = W − ξ_W∇L_W(δ');
    the chain is cut by computing δ' (and so W') from E' detached, which removes exactly the
    A → E' → δ' → W' path; the direct term holds both E' and W'."""
    E, A, W, D, f, g, E1 = explainer_step_by_autograd(explainer, audience, bank, batches)
    xa, ya, idx = batches["explanation"]
    A_const = {k: v.detach() for k, v in A.items()}

    def audience_after(e):
        d = D[idx]
        loss = explain.explanation_loss(f(e, A_const, xa + d), f(e, A_const, xa))
        D1 = D + LR_D * torch.autograd.grad(loss, D, create_graph=True)[0]
        gW = torch.autograd.grad(F.cross_entropy(g(W, xa * D1[idx]), ya), list(W.values()), create_graph=True)
        return {k: v - LR_W * gk for (k, v), gk in zip(W.items(), gW)}

    W1, W1_cut = audience_after(E1), audience_after({k: v.detach() for k, v in E1.items()})
    xv, yv, _ = batches["architecture"]

    def grad_a(e, w):
        o = F.cross_entropy(f(e, A, xv), yv) + GAMMA * F.cross_entropy(g(w, xv), yv)
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(o, list(A.values()), retain_graph=True)])
    total, first = grad_a(E1, W1), grad_a(E1, W1_cut)
    direct = grad_a({k: v.detach() for k, v in E1.items()}, {k: v.detach() for k, v in W1.items()})
    W1_leaf = {k: v.detach().requires_grad_() for k, v in W1.items()}
    u_W = torch.autograd.grad(GAMMA * F.cross_entropy(g(W1_leaf, xv), yv), list(W1_leaf.values()))
    return {"direct": direct, "darts": first - direct, "chain": total - first, "total": total,
            "u_W": float(torch.cat([t.reshape(-1) for t in u_W]).norm())}


def test_parts_equal_the_chain_rule_written_out_in_float64():
    """The benchmark's direct, DARTS and chain parts (mlo, exact engines, a graph rebuilt from a saved
    state) equal an independent plain-autograd composition of the one-step updates to 1e-8."""
    cfg = exact_config("unrolled")
    graph, explainer, audience, bank, batches = tiny_lease_graph(cfg)
    want = _parts_by_autograd(explainer, audience, bank, batches)
    got, links = lease_signal.parts(cfg, (explainer, audience, bank), mlo.graph_state_dict(graph),
                                    [batches["explainer"], batches["explanation"], batches["architecture"]],
                                    torch.float64, "exact", horizon=3)
    for k in ("direct", "darts", "chain", "total"):
        assert want[k].norm() > 1e-8, k
        assert torch.allclose(got[k], want[k], rtol=1e-8, atol=1e-13), (k, (got[k] - want[k]).norm() / want[k].norm())
    assert math.isclose(links["u_W"], want["u_W"], rel_tol=1e-8)


def test_quick_table_invariants(tmp_path):
    """``--quick`` on the digits preset: four points (initialisation, end of warm-up, middle, end),
    the parts add up to the total, the shares are the norms' ratios, float32 exact agrees with
    float64, every FD row has its errors and cosines, and the plot is written."""
    out = tmp_path / "signal"
    run_module("benchmarks.lease_signal", ["--quick", "--presets", "digits", "--out", str(out)])
    r = json.loads((out / "result.json").read_text())
    rows = r["rows"]
    assert [row["step"] for row in rows] == [0, 2, 3, 4] and all(row["warmup_end"] == 2 for row in rows)
    for row in rows:
        assert row["sum_error"] <= 1e-10
        assert math.isclose(row["chain_share"], row["chain"] / row["direct"], rel_tol=1e-12)
        assert row["direct"] > 0 and row["u_W"] > 0
    assert all(c["ok"] for c in r["checks"]) and len(r["checks"]) == 4
    by = {(e["step"], e["precision"], e["engine"]): e for e in r["errors"]}
    assert set(by) == {(s, p, e) for s in (0, 2, 3, 4)
                       for p, e in (("float32", "exact"), ("float64", "fd eps=0.01"), ("float32", "fd eps=0.01"))}
    for s in (0, 2, 3, 4):
        assert by[(s, "float32", "exact")]["total_rel_error"] < 1e-3
        assert by[(s, "float32", "exact")]["total_cosine"] > 0.999
    for e in r["errors"]:
        for k in ("darts", "chain", "total"):
            assert e[f"{k}_rel_error"] >= 0 and -1.0 - 1e-9 <= e[f"{k}_cosine"] <= 1.0 + 1e-9
    assert (out / "plot.png").stat().st_size > 1000 and "chain / direct" in (out / "table.md").read_text()


def test_runs_reads_a_finished_search(tmp_path):
    """``--runs DIR``: the parts at a finished search's last checkpoint, rebuilt from its folder."""
    search = tmp_path / "search"
    run_module("applications.lease.search", ["--out", str(search), "--no-progress", "--set", "device=cpu",
                                             *[a for kv in lease_signal.QUICK for a in ("--set", kv)]])
    out = tmp_path / "signal"
    run_module("benchmarks.lease_signal", ["--runs", str(search), "--out", str(out)])
    rows = json.loads((out / "result.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["step"] == 4 and rows[0]["preset"] == str(search)
    assert rows[0]["sum_error"] <= 1e-10 and rows[0]["direct"] > 0 and rows[0]["chain"] > 0
