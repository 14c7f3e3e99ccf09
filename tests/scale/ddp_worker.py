"""Run under ``torchrun --nproc_per_node=2`` by test_distributed.py: the toy graph, data parallel on gloo.

Each process writes ``<out>/rank<r>.pt`` with what the test checks.
"""
import os
import sys

import torch

import mlo
import mlo.distributed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.scale import toy  # noqa: E402

torch.set_num_threads(1)
STEPS, BATCH, CUT = 6, 4, 2


def run(second_order, steps=STEPS, runner_kw=None, nan=None, before=None, resume=None):
    env = mlo.distributed.Env(mlo.distributed.rank(), mlo.distributed.world_size(), 0, torch.device("cpu"), "gloo")
    graph = toy.build(BATCH, env.rank, env.world_size, second_order=second_order, nan=nan)
    dp = toy.data_parallel(graph)
    runner = mlo.distributed.DistributedRunner(graph, dp, progress=False, **(runner_kw or {}))
    if before is not None:
        runner.before_step = lambda step: before(runner, step)
    if resume is not None:
        runner.resume(resume)
    runner.run(until=steps)
    return graph, dp, runner


def main(out):
    mlo.distributed.init("cpu")
    r = mlo.distributed.rank()
    res = {}
    # 1. first order: compared with one process at twice the batch
    graph, dp, _ = run(second_order=False)
    res["first_order"] = toy.params(graph)
    res["collectives"] = dict(dp.collectives)
    # 2. second-order engines (unrolled, finite difference): replicas identical, one reduction per update
    graph, dp, runner = run(second_order=True)
    dp.check_in_sync()
    res["second_order"] = toy.params(graph)
    res["vjp_calls"] = dict(runner.stepper.vjp_calls)
    # 3. a stop request reaching one process only: both stop after the same step; rank 0 checkpoints;
    #    resuming on both processes ends where the uninterrupted run ended
    ckpt = os.path.join(out, "ckpt.pt")

    def stop_on_rank1(runner, step):
        if r == 1 and step == CUT:
            runner.interrupted = True
    _, _, runner = run(second_order=True, runner_kw={"checkpoint": ckpt}, before=stop_on_rank1)
    res["stopped_at"] = runner.step
    res["interrupted"] = runner.interrupted
    first = []      # the step the resumed runner starts at (a run that starts over starts at 0)
    graph, _, runner = run(second_order=True, resume=ckpt, before=lambda runner, step: first.append(step))
    res["resumed"] = toy.params(graph)
    res["resumed_from"] = first[0]
    # 4. NaN on process 1 only: with "skip" both processes skip the same update
    graph, _, runner = run(second_order=True, runner_kw={"nan_policy": "skip"}, nan=(1, 3, "audience"))
    res["skip"] = toy.params(graph)
    res["skipped"] = dict(runner.stepper.skipped)
    # ... and with "raise" both stop at the same step, keeping the last complete checkpoint
    ckpt2 = os.path.join(out, "ckpt2.pt")
    try:
        run(second_order=True, runner_kw={"checkpoint": ckpt2, "checkpoint_every": 1}, nan=(1, 3, "architecture"))
        res["raised"] = None
    except mlo.NonFiniteError as e:
        res["raised"] = {"problem": e.problem, "edge": e.edge, "step": e.step, "message": str(e)}
    torch.save(res, os.path.join(out, f"rank{r}.pt"))
    mlo.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
