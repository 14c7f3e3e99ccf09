"""The reweight app's per-example weight table (``weight_table``, a row-sparse mlo table).

A float64 unit test: the row-sparse declaration gives the dense declaration's
hypergradient (1e-12, both one-step engines) and the same tables after a few
steps. End to end (child process): after two steps of 100 on 321 training
examples, exactly the 200 examples of those two batches moved away from the
initial logit.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import mlo
from applications.reweight import problems
from tests.subproc import run_module

from .helpers import check_outputs, tiny

TOL = 1e-12


def data64() -> problems.Data:
    d = problems.load_data(0, imbalance=20.0, noise=0.2, val_per_class=10, test_fraction=0.4)
    f = lambda xy: (xy[0].double(), xy[1])  # noqa: E731
    return dataclasses.replace(d, train=f(d.train), val=f(d.val), test=f(d.test))


def graph(data, sparse: bool, engine) -> mlo.Graph:
    g, _, table = problems.build_graph(data, "weight_table", seed=0, hidden=0, lr=0.1, momentum=0.9,
                                       batch_size=20, table_lr=300.0, sparse_table=sparse, engine=engine)
    with torch.no_grad():   # a non-uniform start, so every factor of the hypergradient is exercised
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(3), dtype=table.dtype))
    return g


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("engine", [mlo.Unrolled(steps=1), mlo.FiniteDifference()], ids=["unrolled", "fd"])
def test_table_hypergradient_equals_the_dense_declaration(engine):
    data = data64()
    hs = mlo.hypergradient(graph(data, True, engine), "weights")["total"]
    hd = mlo.hypergradient(graph(data, False, engine), "weights")["total"]
    assert hs.dtype == torch.float64 and hs.shape == (len(data.train[1]),)
    assert (hd != 0).sum() == 20 and hd.norm() > 1e-6     # one batch's rows, and not vanishing
    assert rel(hs, hd) <= TOL


def test_table_after_steps_equals_the_dense_run():
    data = data64()
    gs, gd = graph(data, True, mlo.Unrolled(steps=1)), graph(data, False, mlo.Unrolled(steps=1))
    ss, sd = mlo.Stepper(gs), mlo.Stepper(gd)
    for _ in range(4):
        ss.step()
        sd.step()
    for name in ("classifier", "weights"):
        for k, v in gd.problems[name].params_tree.items():
            assert rel(gs.problems[name].params_tree[k], v) <= TOL, (name, k)


@pytest.mark.slow
def test_only_visited_rows_move(tmp_path):
    out = str(tmp_path / "run")
    run_module("applications.reweight", ["--config", tiny("reweight"), "--out", out, "--device", "cpu",
                                         "--no-progress", "--set", "steps=2", "--set", "seeds=[0]",
                                         "--set", "methods=[weight_table]", "--set", "weight_table.init=0.5"])
    result = check_outputs(out, "reweight.png")
    logits = torch.tensor(result["runs"]["weight_table"]["0"]["logits"])
    moved = (logits != 0.5).nonzero().squeeze(1)
    # the rows of the run's first two batches (the loader's order is fixed by the seed)
    data = problems.load_data(0, 20.0, 0.2, 10, 0.4)
    batches = iter(problems.train_loader(data, 100, 0))
    visited = torch.cat([next(batches)[2], next(batches)[2]]).sort().values
    assert len(logits) == len(data.train[1]) > 200
    assert torch.equal(moved, visited)
    with open(os.path.join(out, "config.yaml"), encoding="utf-8") as fh:
        assert "weight_table:" in fh.read()
    assert 0.0 <= result["summary"]["weight_table"]["balanced_test_acc_mean"] <= 1.0


def test_bad_table_settings_are_one_line_errors():
    for setting, message in [("weight_table.lr=0", "weight_table.lr: must be > 0"),
                             ("weight_table.engine=cg", "weight_table.engine.name: unknown engine 'cg'; "
                                                         "choose one of unrolled, finite_difference")]:
        proc = run_module("applications.reweight", ["--print-config", "--set", setting], expect=2)
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
