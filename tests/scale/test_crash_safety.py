"""Crash safety: SIGKILL at random moments, damaged checkpoints, NaN/Inf policies, determinism.

The LeaSE runs use a tiny digits config (4 steps, checkpoint every step), each in a child
process with one thread, so they are bit-for-bit comparable and a native crash fails one test.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import mlo
from tests.lease.tiny import search_args
from tests.subproc import ROOT, child_env, describe

from . import toy

TINY = search_args(epochs=1, max_steps_per_epoch=4, space__layers=2, data__batch_size=8, checkpoint_every=1)


def _main(args):
    """``python -m applications.lease.search *args`` in a child process (one thread, as every run here);
    returns (exit code, stderr). A native crash is a failed test, not the end of the suite."""
    proc = subprocess.run([sys.executable, "-m", "applications.lease.search", *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode >= 0, f"search {describe(proc.returncode)}:\n{proc.stderr[-3000:]}"
    return proc.returncode, proc.stderr


def _params(path):
    state = torch.load(path, weights_only=True)
    return state["step"], {f"{p}/{k}": v for p, s in state["graph"]["problems"].items() for k, v in s["params"].items()}


# --------------------------------------------------------------------------- atomic checkpoints


@pytest.mark.parametrize("trial", range(3))
def test_sigkill_at_a_random_moment_leaves_a_complete_checkpoint(tmp_path, trial):
    ckpt = tmp_path / "c.pt"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "scale", "ckpt_writer.py"), str(ckpt)],
                            cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not os.path.exists(str(ckpt) + ".prev") and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(random.Random(trial).uniform(0.05, 0.6))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # (a damaged newest file would fall back to .prev)
        state = mlo.load_checkpoint(ckpt)
    step = state["step"]
    w = state["graph"]["problems"]["p"]["params"][""]
    assert step >= 1 and torch.equal(w, torch.full_like(w, 1 - step / 1024)), step
    names = sorted(os.listdir(tmp_path))
    # a kill mid-write may leave a temporary file (".tmp"), never a partial file under a real name
    assert {"c.pt", "c.pt.prev"} == {n for n in names if not n.endswith(".tmp")}
    # ... and any temporary left is one the next save of c.pt recognises and removes
    assert {n for n in names if n.endswith(".tmp")} <= {os.path.basename(t) for t in mlo.checkpoint.temporary_files(ckpt)}
    # .prev is the one before (or, killed between staging .prev and the rename, the same one)
    assert torch.load(str(ckpt) + ".prev", weights_only=True)["step"] in (step - 1, step)


# --------------------------------------------------------------------------- non-finite values


def test_nan_stops_with_a_diagnostic_and_keeps_the_last_complete_checkpoint(tmp_path):
    graph = toy.build(4, nan=(0, 3, "architecture"))
    seen = {}
    ckpt = tmp_path / "c.pt"
    runner = mlo.Runner(graph, progress=False, checkpoint=ckpt, checkpoint_every=1,
                        callbacks=[lambda step, row: seen.__setitem__(step, toy.params(graph))])
    with pytest.raises(mlo.NonFiniteError) as e:
        runner.run(10)
    assert (e.value.problem, e.value.edge, e.value.step) == ("architecture", None, 3)
    assert "'architecture'" in str(e.value) and "step 3" in str(e.value)
    step, saved = _params(ckpt)
    assert step == 3                         # the step that failed half-way was not saved
    for k, v in seen[3].items():
        name, key = k.split("/", 1)
        assert torch.equal(saved[f"{name}/{key}"], v), k


def test_nan_skip_policy_counts_and_keeps_going():
    graph = toy.build(4, nan=(0, 2, "audience"))
    runner = mlo.Runner(graph, progress=False, nan_policy="skip")
    runner.run(5)
    assert runner.skip_counts == {"audience": 1}
    assert all(torch.isfinite(v).all() for v in toy.params(graph).values())


def test_search_stops_on_nan_with_exit_code_3_and_keeps_the_checkpoint(tmp_path):
    out = str(tmp_path / "nan")
    rc, err = _main([*TINY, "--set", "max_steps_per_epoch=6", "--set", "arch.lr=1e38", "--out", out])
    assert rc == 3, err[-2000:]
    assert "non-finite" in err and "problem '" in err and "outer step" in err
    assert "last complete checkpoint" in err and "nan_policy: skip" in err and f"--resume {out}" in err
    step, _ = _params(os.path.join(out, "checkpoint.pt"))
    assert f"(step {step})" in err


def test_search_skip_policy_is_a_config_option(tmp_path):
    from applications.common import load_config
    from applications.lease.config import SearchConfig
    assert load_config(SearchConfig, None, ["nan_policy=skip"]).nan_policy == "skip"
    rc, err = _main(["--set", "nan_policy=sometimes", "--out", str(tmp_path / "x")])
    assert rc == 2 and "nan_policy" in err


# --------------------------------------------------------------------------- the search: determinism, kill, damage


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    outs = []
    for name in ("ref1", "ref2"):
        out = str(tmp_path_factory.mktemp(name))
        rc, err = _main([*TINY, "--out", out])
        assert rc == 0, err[-3000:]
        outs.append(out)
    return outs


def test_same_seed_on_cpu_gives_the_same_genotype_twice(reference):
    a, b = reference
    assert json.load(open(os.path.join(a, "genotype.json"))) == json.load(open(os.path.join(b, "genotype.json")))
    (sa, pa), (sb, pb) = _params(os.path.join(a, "checkpoint.pt")), _params(os.path.join(b, "checkpoint.pt"))
    assert sa == sb == 4
    assert pa and pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


def test_sigkill_then_damaged_checkpoint_resumes_from_the_previous_one(reference, tmp_path):
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "applications.lease.search", *TINY, "--out", out], cwd=ROOT,
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    prev = os.path.join(out, "checkpoint.pt.prev")
    deadline = time.time() + 240
    while not os.path.exists(prev) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    ckpt = os.path.join(out, "checkpoint.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert mlo.load_checkpoint(ckpt)["step"] >= 1      # whatever the moment, a complete checkpoint is there
    prev_step = torch.load(prev, weights_only=True)["step"]
    if os.path.exists(ckpt):                                # damage the newest one
        data = open(ckpt, "rb").read()
        open(ckpt, "wb").write(data[: len(data) // 2])
    # both damaged (in a copy): a one-line error before any training
    broken = str(tmp_path / "broken")
    shutil.copytree(out, broken)
    open(os.path.join(broken, "checkpoint.pt.prev"), "wb").write(b"not a checkpoint")
    open(os.path.join(broken, "checkpoint.pt"), "wb").write(b"")
    rc, err = _main(["--resume", broken])
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "no readable checkpoint" in err, err
    # resume the damaged run: a clear message, then the same result as the uninterrupted runs
    r = subprocess.run([sys.executable, "-m", "applications.lease.search", "--resume", out], cwd=ROOT, env=child_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cannot be read" in r.stderr and "previous checkpoint" in r.stderr
    # it continued from the backup's step (a resume that restored nothing would start over at step 0,
    # print the stage banner with the graph, and still end with the same numbers)
    assert f"resuming from step {prev_step} " in r.stderr and "Graph(order=" not in r.stderr, r.stderr[-3000:]
    # the killed writer's temporary file (if the kill hit a write) is gone once the resumed run saves
    assert mlo.checkpoint.temporary_files(ckpt) == []
    ref = reference[0]
    assert json.load(open(os.path.join(out, "genotype.json"))) == json.load(open(os.path.join(ref, "genotype.json")))
    (s1, p1), (s2, p2) = _params(ckpt), _params(os.path.join(ref, "checkpoint.pt"))
    assert s1 == s2
    assert p1 and p1.keys() == p2.keys()
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]
