"""End to end: ``python -m applications.ignore`` on configs/tiny.yaml (in a child process, seconds),
plus a float64 check of the three-level hypergradient against a central difference.

Directions checked (tiny config, target shifted one pixel; seeds 0 and 1, and
by hand also 2 and 3): on every seed the three-level program beats both its
two-level ablation and using every source example (``no_ignore``), and gives
corrupted source examples a lower mean weight than clean ones. Not checked:
three levels vs ``target_only`` (it loses on seeds 2 and 3).
"""

from __future__ import annotations

import pytest
import torch

import mlo
from applications.ignore import problems

from tests.subproc import run_module

from .helpers import check_outputs, doc_code_is_current, tiny

pytestmark = pytest.mark.slow


def test_tiny_run_three_levels_beat_two_levels_and_no_ignoring(tmp_path):
    out = str(tmp_path / "run")
    run_module("applications.ignore", ["--config", tiny("ignore"), "--out", out, "--device", "cpu", "--no-progress"])
    result = check_outputs(out, "ignore.png")
    runs = result["runs"]
    assert set(result["summary"]) == {"target_only", "no_ignore", "two_level", "three_level"}
    for seed in ("0", "1"):
        three = runs["three_level"][seed]
        assert three["test_acc"] > runs["two_level"][seed]["test_acc"], seed
        assert three["test_acc"] > runs["no_ignore"][seed]["test_acc"], seed
        assert three["mean_weight_corrupted"] < three["mean_weight_clean"], seed


def test_three_level_hypergradient_is_exact_with_unrolled_engines():
    torch.set_num_threads(1)
    small = problems.load_data(0, 6, 0.4, 3, 3, 0)
    data = problems.Data(*[(x.double(), y) for x, y in (small.source, small.target_train, small.target_val,
                                                         small.target_test)], small.corrupted)
    graph, _, _, _ = problems.build_graph(
        data, "three_level", pretrain_engine=mlo.Unrolled(steps=3), finetune_engine=mlo.Unrolled(steps=3),
        pretrain_steps=3, finetune_steps=3, lr=0.1, momentum=0.9, ignore_lr=0.1, gamma=0.1, source_decay=1e-3)
    report = mlo.check_hypergradient(graph, "ignore", directions=4, tol=1e-5)
    assert report.ok, str(report)


def test_doc_shows_the_current_declaration():
    doc_code_is_current("ignore.md")
