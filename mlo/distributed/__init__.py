"""Data parallelism on ``torch.distributed``: one replica of the whole graph per process.

Launch N copies of a program with ``torchrun`` (see docs/distributed.md). Every
process holds all problems' parameters and draws its own shard of every data
stream; each problem's update direction (direct gradient + hypergradient) is
combined across processes once per update by ``DataParallel``, the
``Stepper``'s ``reduce_fn``::

    env = mlo.distributed.init("cuda")                # reads torchrun's environment; "cpu" for gloo
    g = torch.Generator().manual_seed(seed)           # the same seed on every process
    loader = DataLoader(data, batch_size=b, sampler=ShardedSampler(len(data), generator=g), generator=g)
    dp = mlo.distributed.DataParallel(graph, reduce={"bank": "sum"}, rows={"bank": lambda batch: batch[2]})
    mlo.distributed.DistributedRunner(graph, dp, checkpoint="ckpt.pt").run(steps)

Because every process applies the same combined direction with the same
optimizer, the replicas stay identical (bit for bit: an all-reduce hands every
process the same sum). What is combined, and how:

* ``"mean"`` (default): one all-reduce of the flattened direction, divided by the
  number of processes. Right for objectives that *average* over their batch: the
  mean over processes of per-process means is the mean over the global batch.
* ``"sum"``: one all-reduce, not divided. Right for objectives that *sum* over
  their batch (per-example parameters such as LeaSE's explanation bank, whose
  loss is a sum so each example's step does not depend on the batch size).
* ``rows={name: index_fn}``: the problem's parameters are per-example banks (first
  dimension = example) and only the rows of the batch's examples are nonzero.
  Instead of all-reducing the whole bank, the processes all-gather the rows their
  batches touched with their indices (one tiny all-gather of the row counts, one
  of the rows) and add them into a dense direction (then divided by the number of
  processes for ``"mean"``). ``index_fn(batch)`` returns the batch's row indices.

Only the total direction is combined: hypergradients are reduced with it, once per
update, never per path or per engine pass. With second-order engines the result is the
average of per-process hypergradients (each computed on the process's own
batches), which equals the hypergradient of the global batch only for first-order
engines; see docs/distributed.md.

``DistributedRunner`` adds to ``Runner``: every process stops at the same step
after SIGINT/SIGTERM reaches any of them, metrics are averaged over processes
before the callbacks (which run on rank 0 only), BatchNorm-style buffers are
averaged before each checkpoint, and only rank 0 writes the checkpoint (every
process reads it on resume; they check that they loaded the same step).

The package's modules: ``env`` (process group, ranks), ``sampler``
(``ShardedSampler``), ``parallel`` (``DataParallel``), ``packing`` (flattening
and row exchange helpers), ``runner`` (``DistributedRunner``).
"""
from .env import Env, all_sum, env_rank, init, rank, shutdown, world_size
from .parallel import REDUCE_OPS, DataParallel
from .runner import DistributedRunner
from .sampler import ShardedSampler

__all__ = ["Env", "init", "shutdown", "env_rank", "rank", "world_size", "all_sum", "ShardedSampler",
           "DataParallel", "REDUCE_OPS", "DistributedRunner"]
