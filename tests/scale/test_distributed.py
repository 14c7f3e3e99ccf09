"""Data parallelism in the mlo core: two gloo processes on the CPU (torchrun --standalone).

Stated tolerance: with first-order engines and no BatchNorm, 2 processes with per-process batch b
match 1 process with batch 2b to 1e-12 (float64; measured ~6e-17, the round-off of summing two
half-batch means instead of one mean). Replicas are bit-identical, with any engine.
"""
import os
import subprocess
import sys

import pytest
import torch

import mlo
import mlo.distributed

from . import toy
from .ddp_worker import BATCH, CUT, STEPS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-12


def torchrun(args, nproc=2, timeout=300, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    r = torchrun([os.path.join(ROOT, "tests", "scale", "ddp_worker.py"), str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [torch.load(out / f"rank{i}.pt", weights_only=False) for i in range(2)], out


def _same(a, b):
    return len(a) > 0 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_match_one_process_with_twice_the_batch(ranks):
    (r0, r1), _ = ranks
    torch.set_num_threads(1)
    graph = toy.build(2 * BATCH, 0, 1, second_order=False)
    init = toy.params(graph)
    mlo.Runner(graph, progress=False).run(STEPS)
    ref = toy.params(graph)
    assert _same(r0["first_order"], r1["first_order"])
    for k in ref:
        assert not torch.equal(ref[k], init[k]), k          # every problem moved
        err = (ref[k] - r0["first_order"][k]).abs().max().item()
        assert err <= TOL, (k, err)


def test_replicas_identical_with_second_order_engines_and_one_reduction_per_update(ranks):
    (r0, r1), _ = ranks
    assert set(r0["second_order"]) == {"explainer/lin.weight", "explainer/lin.bias", "explanation/",
                                       "audience/weight", "audience/bias", "architecture/alpha"}
    assert _same(r0["second_order"], r1["second_order"])
    # dense problems: one all-reduce per update; the bank: one all-gather of counts + one of rows
    assert r0["collectives"] == {"explainer": STEPS, "explanation": 2 * STEPS, "audience": STEPS,
                                 "architecture": STEPS}
    # every edge's VJP ran once per step (hypergradients are reduced with the update, not per path)
    assert r0["vjp_calls"] == {"explainer->architecture": STEPS, "explanation->explainer": STEPS,
                               "audience->explanation": STEPS}


def test_a_stop_request_on_one_process_stops_all_at_the_same_step_and_resumes_exactly(ranks):
    (r0, r1), _ = ranks
    assert r0["stopped_at"] == r1["stopped_at"] == CUT + 1
    assert r0["interrupted"] and r1["interrupted"]
    assert r0["resumed_from"] == r1["resumed_from"] == CUT + 1      # continued; did not start over
    assert _same(r0["resumed"], r0["second_order"]) and _same(r1["resumed"], r1["second_order"])


def test_non_finite_on_one_process_is_seen_by_all(ranks):
    (r0, r1), out = ranks
    assert r0["skipped"] == r1["skipped"] == {"audience": 1}
    assert _same(r0["skip"], r1["skip"])
    for r in (r0, r1):
        assert r["raised"]["problem"] == "architecture" and r["raised"]["step"] == 3
    assert "objective" in r1["raised"]["message"]            # the process that saw it names the cause
    assert "another process" in r0["raised"]["message"]
    # the half-done step was not saved: the checkpoint is the one written after step 3 completed
    assert torch.load(out / "ckpt2.pt", weights_only=True)["step"] == 3


def test_sharded_sampler_splits_one_permutation():
    n, w, b = 23, 3, 2
    shards = [list(mlo.distributed.ShardedSampler(n, r, w, generator=torch.Generator().manual_seed(5)))
              for r in range(w)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist()
    assert all(len(s) == n // w for s in shards)
    assert sorted(sum(shards, [])) == sorted(perm[: n - n % w])
    for k in range(len(shards[0]) // b):     # the k-th batches together = the k-th batch of size w*b
        together = sorted(x for s in shards for x in s[k * b:(k + 1) * b])
        assert together == sorted(perm[k * w * b:(k + 1) * w * b])
    gen = torch.Generator().manual_seed(5)
    sampler = mlo.distributed.ShardedSampler(n, 0, w, generator=gen)
    assert list(sampler) != list(sampler)    # a new permutation each epoch
    with pytest.raises(mlo.ConfigError, match="cannot split 2 example"):
        mlo.distributed.ShardedSampler(2, 0, 3)
    with pytest.raises(mlo.ConfigError, match="rank"):
        mlo.distributed.ShardedSampler(10, 3, 3)


def test_data_parallel_single_process_is_a_no_op_and_checks_names():
    graph = toy.build(4)
    dp = toy.data_parallel(graph)
    tree = {"a": torch.ones(3)}
    assert dp(graph.problems["explainer"], tree) is tree
    assert dp.any(True) and not dp.any(False)
    with pytest.raises(mlo.ConfigError, match="did you mean 'explanation'"):
        mlo.distributed.DataParallel(graph, reduce={"explanatoin": "sum"})
    with pytest.raises(mlo.ConfigError, match="'mean' or 'sum'"):
        mlo.distributed.DataParallel(graph, reduce={"explanation": "max"})


def test_first_occurrence_mask():
    idx = torch.tensor([4, 1, 4, 2, 1, 7])
    assert mlo.distributed.packing.first_occurrence(idx).tolist() == [True, True, False, True, False, True]


def test_a_signal_during_the_stop_vote_is_not_lost():
    """SIGTERM handled while the all-reduce of the stop vote blocks (where replicas spend their waits) used to be
    overwritten by the vote's result, and every replica ran to the end; it now joins the next step's vote."""
    import signal

    graph = toy.build(4)
    runner = mlo.distributed.DistributedRunner(graph, toy.data_parallel(graph), progress=False)
    vote = runner.dp.any
    calls = []

    def any_with_a_signal_arriving(flag):
        calls.append(flag)
        if len(calls) == 2:                                   # the second step's vote: SIGTERM lands mid-call
            signal.raise_signal(signal.SIGTERM)
        return vote(flag)
    runner.dp.any = any_with_a_signal_arriving
    before = signal.getsignal(signal.SIGTERM)
    runner.run(6)
    assert runner.interrupted and runner.step == 2            # stopped before the third step, not at the end
    assert calls == [False, False, True]
    assert signal.getsignal(signal.SIGTERM) is before           # the run's handler is gone again
