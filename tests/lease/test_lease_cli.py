"""`python -m applications.lease.search` end to end on a tiny digits config, in subprocesses."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--set", "epochs=2", "--set", "max_steps_per_epoch=5", "--set", "space.C=2", "--set", "space.nodes=2",
        "--set", "audience.width=0.0625", "--set", "data.subset_fraction=0.25", "--set", "log_every=1",
        "--set", "checkpoint_every=2", "--set", "data.batch_size=16", "--device", "cpu"]
ARTIFACTS = ["config.yaml", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "genotype.json", "genotype.txt",
             "cells.png", "alphas.png", "explanations.png", "result.json"]


def _run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "applications.lease.search", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def _params(out):
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    return state["step"], {f"{p}/{k}": v for p, s in state["graph"]["problems"].items() for k, v in s["params"].items()}


@pytest.mark.slow
def test_search_writes_every_artifact_and_resume_equals_uninterrupted(tmp_path):
    full = str(tmp_path / "full")
    r = _run([*TINY, "--out", full])
    assert r.returncode == 0, r.stderr[-3000:]
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
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "applications.lease.search", *TINY, "--out", part], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(part, "checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 130:
        assert "--resume" in err
        step, _ = _params(part)
        assert 2 <= step < 10
    else:  # the run finished before the signal landed; resume must then be a no-op
        assert proc.returncode == 0, err[-3000:]
    r2 = _run(["--resume", part])
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.load(open(os.path.join(part, "genotype.json"))) == json.load(open(os.path.join(full, "genotype.json")))
    step_full, p_full = _params(full)
    step_part, p_part = _params(part)
    assert step_full == step_part
    for k in p_full:
        assert torch.equal(p_full[k], p_part[k]), k
    rows_part = [json.loads(line)["step"] for line in open(os.path.join(part, "metrics.jsonl"))]
    assert rows_part == list(range(1, 11))


def test_unknown_config_key_fails_before_any_work(tmp_path):
    r = _run(["--set", "space.channels=4", "--out", str(tmp_path / "x")])
    assert r.returncode == 2
    assert "space.channels" in r.stderr and "valid" in r.stderr.lower()
    assert not os.path.exists(tmp_path / "x")


def test_bad_value_type_names_the_field(tmp_path):
    r = _run(["--set", "gamma=lots", "--out", str(tmp_path / "x")])
    assert r.returncode == 2 and "gamma" in r.stderr


def test_unknown_engine_is_rejected(tmp_path):
    r = _run(["--set", "engines.explainer.name=magic", "--out", str(tmp_path / "x")])
    assert r.returncode == 2 and "magic" in r.stderr and "finite_difference" in r.stderr


PRESETS = sorted(f for f in os.listdir(os.path.join(ROOT, "applications", "lease", "configs"))
                 if f.endswith(".yaml") and not f.startswith("train_"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_search_preset_is_a_valid_config(preset):
    from applications.common import load_config
    from applications.lease.config import SearchConfig
    cfg = load_config(SearchConfig, os.path.join(ROOT, "applications", "lease", "configs", preset),
                      [] if preset == "digits.yaml" else ["data.root=some/folder"])
    assert cfg.name == preset[:-5]
    for edge in ("explainer", "explanation", "audience"):
        getattr(cfg.engines, edge).build()


def test_paper_presets_cover_the_table():
    names = set(p[:-5] for p in PRESETS)
    for ds in ("cifar10", "cifar100"):
        for method in ("darts-1st", "darts-2nd", "pc-darts", "p-darts"):
            for aud in ("resnet18", "resnet50", "baseline"):
                assert f"{ds}-{method}-{aud}" in names
    assert "imagenet-pc-darts-resnet18" in names
