"""Run under ``torchrun --nproc_per_node=2`` by test_rows_distributed.py: a row-sparse table, data parallel on gloo.

Each process writes ``<out>/rank<r>.pt``: the parameters after the steps for the row-sparse and the dense
declaration, with first-order and second-order engines, and the collectives issued.
"""
import os
import sys

import torch

import mlo
import mlo.distributed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.mlo.test_rows_distributed import FULL, build, params  # noqa: E402

torch.set_num_threads(1)


def main(out):
    mlo.distributed.init("cpu")
    rank, world = mlo.distributed.rank(), mlo.distributed.world_size()
    half = len(FULL[0]) // world
    shards = [b[rank * half:(rank + 1) * half] for b in FULL]
    res = {}
    for key, second, sparse, momentum in [((False, True), False, True, 0.0), ((False, False), False, False, 0.0),
                                          ((True, True), True, True, 0.0), ((True, False), True, False, 0.0),
                                          ("momentum", False, True, 0.5)]:
        graph = build(shards, sparse, second, momentum)
        dp = mlo.distributed.DataParallel(graph, reduce={"T": "sum"}, rows=None if sparse else {"T": lambda b: b[0]})
        stepper = mlo.Stepper(graph, reduce_fn=dp)
        for _ in range(len(FULL)):
            stepper.step()
        res[key] = params(graph)
        res[("collectives", *key) if isinstance(key, tuple) else key + "_collectives"] = dict(dp.collectives)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    mlo.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
