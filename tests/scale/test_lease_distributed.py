"""The LeaSE search data parallel under torchrun: 2 gloo processes on the CPU.

One run is stopped with SIGTERM (sent to torchrun, which forwards it to both workers), each worker
finishes the step, rank 0 checkpoints, and the run is resumed under torchrun; at the end the
parameters of all four problems are identical on both processes.
"""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from tests.lease.tiny import search_args
from tests.subproc import ROOT, child_env

ENTRY = os.path.join(ROOT, "tests", "scale", "lease_entry.py")
TINY = search_args(epochs=1, max_steps_per_epoch=6, space__layers=2, data__batch_size=8, checkpoint_every=1)


def _launch(args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ENTRY, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigterm_checkpoint_resume_under_torchrun_and_identical_replicas(tmp_path):
    out = str(tmp_path / "run")
    proc = _launch([*TINY, "--out", out])
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(out, "checkpoint.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert not os.path.exists(os.path.join(out, "result.json")), "SIGTERM did not stop the run:\n" + err[-3000:]
    assert "checkpoint saved" in err and "torchrun" in err and f"--resume {out}" in err, err[-3000:]
    assert 1 <= ckpt["step"] < 6
    assert ckpt["extra"]["world_size"] == 2
    assert err.count("Graph(order=") == 1            # only rank 0 talks
    resumed = _launch(["--resume", out])
    res_out, res_err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, res_err[-4000:]
    # it continued where it stopped (a run that starts over prints its graph again)
    assert f"resuming from step {ckpt['step']} " in res_err and "Graph(order=" not in res_err, res_err[-3000:]
    p0 = torch.load(os.path.join(out, "params-rank0.pt"), weights_only=True)
    p1 = torch.load(os.path.join(out, "params-rank1.pt"), weights_only=True)
    assert any(k.startswith("audience/") for k in p0) and "explanation/bank" in p0
    assert any(k.startswith("explainer/arch.") for k in p0)          # the architecture
    assert any(k.startswith("explainer/") and ".arch." not in k and "/arch." not in k for k in p0)   # its weights
    assert p0.keys() == p1.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
    result = json.load(open(os.path.join(out, "result.json")))
    assert result["world_size"] == 2 and result["genotype"].startswith("Genotype(")
    # only rank 0 logs: one row per step, no duplicates
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == list(range(1, 7))
