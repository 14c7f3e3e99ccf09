"""``python -m applications.maml``: the graph it declares computes MAML / FOMAML exactly (float64, against
a hand-written ``torch.func`` meta-gradient), and the tiny config runs end to end in a child process."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import mlo
from applications import digits
from applications.common import ConfigError, load_config
from applications.maml import __main__ as cli
from applications.maml import problems
from tests.subproc import run_module

from .helpers import check_outputs, doc_code_is_current, tiny

ARGS = ["--device", "cpu", "--no-progress"]


def _tiny_graph(engine, steps=2, lam=0.0):
    data = problems.load_data([6, 7, 8, 9])
    eps = problems.episodes(data.train, 2, n_way=3, k_shot=2, n_query=3, seed=0)
    eps = [tuple(t.double() if t.is_floating_point() else t for t in e) for e in eps]
    torch.manual_seed(0)
    graph, net = problems.build_meta_graph(engine, [eps], data.features, 8, 3, inner_lr=0.3, inner_steps=steps,
                                           meta_lr=0.01, lam=lam)
    for p in graph.problems.values():
        for m in p.modules:
            m.double()
    return graph, net, eps


def _hand_meta_gradient(net, eps, steps, lr, first_order=False):
    """d mean-query-loss / dθ through ``steps`` SGD steps from φ = θ per task (first order: at φ', as if
    dφ'/dθ = I)."""
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    grads = {k: torch.zeros_like(v) for k, v in theta.items()}
    for xs, ys, xq, yq in eps:
        phi = theta
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(net, phi, (xs,)), ys)
            g = torch.autograd.grad(loss, list(phi.values()), create_graph=not first_order)
            phi = {k: v - lr * gi for (k, v), gi in zip(phi.items(), g)}
            if first_order:
                phi = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
        query = F.cross_entropy(functional_call(net, phi, (xq,)), yq) / len(eps)
        wrt = phi if first_order else theta
        for k, gk in zip(wrt, torch.autograd.grad(query, list(wrt.values()))):
            grads[k] += gk
    return grads


@pytest.mark.parametrize("first_order", [False, True])
def test_the_declared_graph_is_maml(first_order):
    engine = mlo.FOMAML() if first_order else mlo.Unrolled(steps=2)
    graph, net, eps = _tiny_graph(engine)
    got = mlo.hypergradient(graph, "meta")["hyper"]
    want = _hand_meta_gradient(net, eps, 2, 0.3, first_order)
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-12), k


def test_tiny_run_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    run_module("applications.maml", ["--config", tiny("maml"), "--out", out, *ARGS])
    result = check_outputs(out, "maml.png")
    assert list(result["summary"]) == ["scratch", "pretrain", "maml", "imaml", "fomaml"]
    assert result["split"] == "test"
    for name, row in result["summary"].items():
        assert 0.0 <= row["test_acc_mean"] <= 1.0 and len(row["per_seed"]) == 1, name
        assert row["test_acc_ci95"] is None          # one seed: no interval
    assert os.path.isfile(os.path.join(out, "maml.png"))


def test_interval_over_seeds():
    row = cli._over_seeds([0.5, 0.6, 0.7], [1.0, 1.0, 1.0])
    # t(0.975, 2) = 4.3027; std 0.1; half-width 4.3027 * 0.1 / sqrt(3)
    assert row["test_acc_mean"] == 0.6 and abs(row["test_acc_ci95"] - 0.2484) < 1e-4


def test_bad_config_is_one_line_before_running(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["--config", tiny("maml"), "--out", out, "--set", "methods=[maml,reptile]", *ARGS]) == 2
    assert "reptile" in capsys.readouterr().err
    assert cli.main(["--config", tiny("maml"), "--out", out, "--set", "engines.maml.steps=9", *ARGS]) == 2
    assert "cannot exceed inner.steps" in capsys.readouterr().err
    assert not os.path.exists(out)


@pytest.mark.parametrize("val_classes", [[], [3, 4, 5]], ids=["held-out-examples", "val-classes"])
def test_the_three_pools_are_disjoint(val_classes):
    labels = digits.arrays()[1]
    test_classes = [7, 8, 9] if val_classes else [6, 7, 8, 9]
    idx = problems.split_indices(labels, test_classes, val_classes, 0.3)
    train, val, test = (set(idx[k].tolist()) for k in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert len(train) + len(val) + len(test) == len(labels)
    assert set(labels[idx["test"]].tolist()) == set(test_classes)
    assert not set(labels[idx["train"]].tolist()) & set(test_classes)
    assert not set(labels[idx["val"]].tolist()) & set(test_classes)
    if val_classes:
        assert set(labels[idx["val"]].tolist()) == set(val_classes)
        assert not set(labels[idx["train"]].tolist()) & set(val_classes)
    else:                                    # 30 % of every meta-train class, the rest for training
        for c in range(6):
            n_val, n_all = (labels[idx["val"]] == c).sum(), (labels == c).sum()
            assert abs(n_val - 0.3 * n_all) <= 1
    # the pools' tensors are exactly those examples, standardized with the meta-train pool's statistics
    data = problems.load_data(test_classes, val_classes=val_classes, val_fraction=0.3)
    x = digits.standardize(digits.load()[0][idx["train"]], digits.load()[0])[1]
    for part in ("train", "val", "test"):
        pool = getattr(data, part)
        assert sorted(pool) == sorted(set(labels[idx[part]].tolist()))
        for c, rows in pool.items():
            assert torch.equal(rows, torch.as_tensor(x[idx[part][labels[idx[part]] == c]])), (part, c)


@pytest.mark.parametrize("val_classes", [[], [3, 4, 5]], ids=["held-out-examples", "val-classes"])
def test_val_evaluation_never_draws_a_meta_test_class(tmp_path, monkeypatch, val_classes):
    drawn = []
    real = problems.sample_episode

    def spy(pool, *args, **kw):
        drawn.append((sorted(pool), sum(len(v) for v in pool.values())))
        return real(pool, *args, **kw)

    monkeypatch.setattr(problems, "sample_episode", spy)
    test_classes = [7, 8, 9] if val_classes else [6, 7, 8, 9]
    sets = ["--set", f"data.test_classes={test_classes}", "--set", f"data.val_classes={val_classes}",
            "--set", "eval.split=val", "--set", "methods=[scratch,fomaml]", "--set", "outer_steps=2"]
    out = str(tmp_path / "run")
    assert cli.main(["--config", tiny("maml"), "--out", out, *sets, *ARGS]) == 0
    data = problems.load_data(test_classes, val_classes=val_classes)
    pools = {part: (sorted(pool), sum(len(v) for v in pool.values()))
             for part, pool in (("train", data.train), ("val", data.val), ("test", data.test))}
    assert all(not set(classes) & set(test_classes) for classes, _ in drawn)
    # tiny, one seed: its 10 evaluation episodes (shared by the methods); 2 steps x meta_batch 2 per method
    assert drawn.count(pools["val"]) == 10 and drawn.count(pools["train"]) == 8 and len(drawn) == 18
    with open(os.path.join(out, "result.json"), encoding="utf-8") as fh:
        result = json.load(fh)
    assert result["split"] == "val" and "val_acc_mean" in result["summary"]["fomaml"]


def test_bad_split_config_is_one_line(tmp_path, capsys):
    out = str(tmp_path / "run")
    cases = ((["eval.split=train"], "eval.split", "eval.split"),
             (["data.val_classes=[6,7]"], "overlap", "data.val_classes"),
             (["data.val_classes=[]", "data.val_fraction=1.0"], "val_fraction", "data.val_fraction"),
             (["data.val_classes=[0,1,2,3,4]"], "number of train classes (2)", "data.n_way"),
             (["data.val_classes=[0,1]"], "number of val classes (2)", "data.n_way"),
             (["data.val_classes=[]", "data.val_fraction=0.02"], "smallest val class", "data.k_shot"))
    for sets, words, key in cases:
        args = [a for kv in sets for a in ("--set", kv)]
        assert cli.main(["--config", tiny("maml"), "--out", out, *args, *ARGS]) == 2
        assert words in capsys.readouterr().err, sets
        with pytest.raises(ConfigError) as err:
            load_config(cli.MAMLConfig, tiny("maml"), sets)
        assert err.value.field == key, sets
    assert not os.path.exists(out)


def test_doc_shows_the_current_declaration():
    doc_code_is_current("maml.md")


@pytest.mark.parametrize("engine", [mlo.Unrolled(steps=2), mlo.CG(iterations=300, tol=1e-14)],
                         ids=lambda e: type(e).__name__)
def test_task_batched_graph_equals_the_separate_problems(engine):
    data = problems.load_data([6, 7, 8, 9])
    eps = problems.episodes(data.train, 3, n_way=3, k_shot=2, n_query=3, seed=0)
    eps = [tuple(t.double() if t.is_floating_point() else t for t in e) for e in eps]
    out = []
    for build in (problems.build_meta_graph, problems.build_batched_meta_graph):
        torch.manual_seed(0)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)       # the networks and the stacked parameters in float64
        try:
            graph, _ = build(engine, [eps], data.features, 8, 3, inner_lr=0.3, inner_steps=2, meta_lr=0.01, lam=0.5)
        finally:
            torch.set_default_dtype(old)
        out.append(mlo.hypergradient(graph, "meta")["hyper"])
    for k in out[0]:
        assert out[0][k].dtype == torch.float64 and out[0][k].abs().max() > 1e-4, k
        assert torch.allclose(out[0][k], out[1][k], rtol=0, atol=1e-10), k
