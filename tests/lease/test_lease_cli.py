"""`python -m applications.lease.search` end to end on a tiny digits config, in child processes (settings refused
before any work: in this process)."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import mlo
from tests.subproc import ROOT, child_env, popen_module, run_module

from .tiny import search_args

TINY = search_args()
ARTIFACTS = ["config.yaml", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "genotype.json", "genotype.txt",
             "cells.png", "alphas.png", "explanations.png", "result.json"]


def _run(args, expect=0):
    return run_module("applications.lease.search", args, expect=expect)


def _params(out):
    ckpt = mlo.read_checkpoint(os.path.join(out, "checkpoint.pt"))
    return ckpt.step, {f"{p}/{k}": v for p, s in ckpt.graph_state["problems"].items() for k, v in s["params"].items()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted tiny search (progress bar on), shared by this file's tests: the reference of the
    resume test, the finished run the extension test copies. Never written to."""
    full = str(tmp_path_factory.mktemp("finished") / "full")
    return full, _run([a for a in TINY if a != "--no-progress"] + ["--out", full])


@pytest.mark.slow
def test_search_writes_every_artifact_and_resume_equals_uninterrupted(tmp_path, finished):
    full, r = finished
    for name in ARTIFACTS:
        assert os.path.getsize(os.path.join(full, name)) > 0, name
    result = json.load(open(os.path.join(full, "result.json")))
    assert result["mode"] == "lease" and result["genotype"].startswith("Genotype(")
    rows = [json.loads(line) for line in open(os.path.join(full, "metrics.jsonl"))]
    assert [row["step"] for row in rows] == list(range(1, 11))
    for key in ("explainer/loss", "explanation/loss", "audience/loss", "architecture/loss",
                "architecture/hypergrad_norm"):
        assert key in rows[-1]
    assert "explainer" in r.stderr and "ETA" in r.stderr      # the graph printout and the progress bar

    # interrupt a second run with Ctrl-C after its first checkpoint, then resume it
    part = str(tmp_path / "part")
    proc = popen_module("applications.lease.search", [*TINY, "--out", part], sigint_ignored=True)   # as `cmd &` does
    while not os.path.exists(os.path.join(part, "checkpoint.pt")) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, f"Ctrl-C did not stop the run (exit {proc.returncode}):\n{err[-3000:]}"
    assert f"--resume {part}" in err and not os.path.exists(os.path.join(part, "result.json"))
    step, _ = _params(part)
    assert 2 <= step < 10
    seconds_before = mlo.read_checkpoint(os.path.join(part, "checkpoint.pt")).extra["search"]["seconds"]
    assert seconds_before > 0
    r2 = _run(["--resume", part, "--no-progress"])
    # it continued from the checkpoint (a run that starts over prints its graph again)
    assert f"resuming from step {step} " in r2.stderr and "Graph(order=" not in r2.stderr, r2.stderr[-3000:]
    assert json.load(open(os.path.join(part, "genotype.json"))) == json.load(open(os.path.join(full, "genotype.json")))
    step_full, p_full = _params(full)
    step_part, p_part = _params(part)
    assert step_full == step_part
    assert p_full and p_full.keys() == p_part.keys()
    for k in p_full:
        assert torch.equal(p_full[k], p_part[k]), k
    rows_part = [json.loads(line)["step"] for line in open(os.path.join(part, "metrics.jsonl"))]
    assert rows_part == list(range(1, 11))
    # the search time adds up over the interrupted and the resumed part
    assert json.load(open(os.path.join(part, "result.json")))["search_seconds"] >= round(seconds_before, 1)
    # metrics.csv: one header, the same steps, every line ending as the csv module writes it
    with open(os.path.join(part, "metrics.csv"), newline="") as fh:
        raw = fh.read()
    assert raw.count("\r\n") == raw.count("\n") == 11
    with open(os.path.join(part, "metrics.csv"), newline="") as fh:
        assert [int(float(r["step"])) for r in csv.DictReader(fh)] == list(range(1, 11))


@pytest.mark.slow
def test_resume_may_change_a_setting_and_saves_it_and_more_epochs_extend_a_finished_search(tmp_path, finished):
    """``--set`` on resume is written back to config.yaml (the folder says what ran). A finished search resumed
    with more epochs runs on to the new total; resumed without, it says it is finished and how to extend it."""
    import shutil

    out = str(tmp_path / "run")
    shutil.copytree(finished[0], out)                # 2 epochs of 5 steps, finished
    r = _run(["--resume", out, "--set", "nan_policy=skip", "--set", "epochs=3", "--no-progress"])
    assert "resuming a finished search at step 10 and continuing to step 15" in r.stderr, r.stderr[-3000:]
    config = open(os.path.join(out, "config.yaml")).read()
    assert "nan_policy: skip" in config and "epochs: 3" in config
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == list(range(1, 16))
    assert _params(out)[0] == 15
    assert len(open(os.path.join(out, "alphas.jsonl")).readlines()) == 15
    result = open(os.path.join(out, "result.json")).read()
    again = _run(["--resume", out, "--no-progress"])
    assert "the search finished at step 15" in again.stderr and "--set epochs=N" in again.stderr, again.stderr[-3000:]
    assert "resuming" not in again.stderr
    assert _params(out)[0] == 15 and len(open(os.path.join(out, "metrics.jsonl")).readlines()) == 15
    assert json.loads(open(os.path.join(out, "result.json")).read())["genotype"] == json.loads(result)["genotype"]


def _refused(args, capsys) -> str:
    """A setting refused before any work: ``main`` in this process (nothing is built, so no child is
    needed) returns 2 and prints one line; returns that line."""
    from applications.lease import search

    capsys.readouterr()
    assert search.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_unknown_config_key_fails_before_any_work(tmp_path, capsys):
    err = _refused(["--set", "space.channels=4", "--out", str(tmp_path / "x")], capsys)
    assert "space.channels" in err and "valid" in err.lower()
    assert not os.path.exists(tmp_path / "x")


def test_bad_value_type_names_the_field(tmp_path, capsys):
    assert "gamma" in _refused(["--set", "gamma=lots", "--out", str(tmp_path / "x")], capsys)


def test_unknown_engine_is_rejected(tmp_path, capsys):
    err = _refused(["--set", "engines.explainer.name=magic", "--out", str(tmp_path / "x")], capsys)
    assert "magic" in err and "finite_difference" in err


PRESETS = sorted(f for f in os.listdir(os.path.join(ROOT, "applications", "lease", "configs"))
                 if f.endswith(".yaml") and not f.startswith(("train_", "study_")))
STUDIES = sorted(f for f in os.listdir(os.path.join(ROOT, "applications", "lease", "configs"))
                 if f.startswith("study_") and f.endswith(".yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_search_preset_is_a_valid_config(preset):
    from applications.common import load_config
    from applications.lease.config import SearchConfig
    cfg = load_config(SearchConfig, os.path.join(ROOT, "applications", "lease", "configs", preset),
                      [] if preset == "digits.yaml" else ["data.root=some/folder"])
    assert cfg.name == preset[:-5]
    for edge in ("explainer", "explanation", "audience"):
        assert isinstance(cfg.engines.build(edge), mlo.Engine)


@pytest.mark.parametrize("preset", STUDIES)
def test_every_study_preset_names_valid_search_and_train_presets(preset, tmp_path):
    """Each study preset resolves to a plan: its search preset, train preset and methods check out."""
    from applications.common import load_config
    from applications.lease.study import StudyConfig, build_study
    cfg = load_config(StudyConfig, os.path.join(ROOT, "applications", "lease", "configs", preset),
                      ["data_root=some/folder"])
    study = build_study(cfg, str(tmp_path), "")
    assert os.path.isfile(study.config) and os.path.isfile(study.train_config)
    assert study.methods and len(study.seeds) == cfg.seeds


def test_paper_presets_cover_the_table():
    names = set(p[:-5] for p in PRESETS)
    for ds in ("cifar10", "cifar100"):
        for method in ("darts-1st", "darts-2nd", "pc-darts", "p-darts"):
            for aud in ("resnet18", "resnet50", "baseline"):
                assert f"{ds}-{method}-{aud}" in names
    assert "imagenet-pc-darts-resnet18" in names


@pytest.mark.slow
def test_pdarts_resumes_at_the_start_of_its_second_stage(tmp_path):
    """Killed during stage 2 before any checkpoint of it: the run continues at stage 2's first step
    with stage 2's own graph (it used to load stage 1's graph into stage 2's supernet and stop)."""
    out = str(tmp_path / "pd")
    args = search_args(space__name="pdarts", mode="baseline", checkpoint_every=1000, epochs=1,
                       max_steps_per_epoch=3, **{"pdarts.cells": "[3,4]", "pdarts.ops_kept": "[8,4,1]",
                                                 "pdarts.dropout": "[0.1,0.2]", "pdarts.epochs": 1,
                                                 "pdarts.warmup_epochs": 0})
    proc = subprocess.Popen([sys.executable, "-m", "applications.lease.search", *args, "--out", out], cwd=ROOT,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = os.path.join(out, "checkpoint.pt")
    try:
        while proc.poll() is None:     # the checkpoint that opens stage 2 (stage index 1, its step 0)
            if os.path.exists(ckpt):
                try:
                    c = mlo.read_checkpoint(ckpt)
                except Exception:       # being replaced right now
                    c = None
                if c is not None and c.extra["search"]["stage"] == 1:
                    break
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.communicate()
    c = mlo.read_checkpoint(ckpt)
    assert c.extra["search"]["stage"] == 1 and c.step == 0 and not os.path.exists(os.path.join(out, "result.json"))
    r = _run(["--resume", out, "--no-progress"])
    assert "resuming from step 3 (stage 2/2)" in r.stderr, r.stderr[-3000:]
    result = json.load(open(os.path.join(out, "result.json")))
    assert result["genotype"].startswith("Genotype(")
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == list(range(1, 7))
