"""``python -m applications.lease.search``: LeaSE (or its DARTS-family baseline) architecture search.

    python -m applications.lease.search [--config YAML] [--set key=value ...] [--out DIR] [--resume DIR]

With no config it runs the embedded digits preset on the CPU in a few minutes.
Data parallel on N GPUs (NCCL) or N CPU processes (gloo) when started by ``torchrun``
(``torchrun --nproc_per_node=N -m applications.lease.search ...``, or ``--nproc N`` on one
machine with one-line errors; docs/distributed.md);
``data.batch_size`` is then the per-process batch and only rank 0 writes. The flags and
the run-folder rules are every program's (``applications.common.run_folder``); the
search space is looked up in ``spaces.SPACES``.

Outputs (in ``--out``, default ``runs/<mode>-<name>``): ``config.yaml``,
``metrics.jsonl``/``metrics.csv`` (TensorBoard logs with ``--tensorboard``),
``checkpoint.pt`` (atomic, every ``checkpoint_every`` steps and on Ctrl-C),
``alphas.jsonl``, ``genotype.json``/``genotype.txt``, ``cells.png``, ``alphas.png``,
``explanations.png`` (LeaSE mode) and ``result.json``.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import mlo
from applications.common import ConfigError, tune_cpu
from applications.common.run_folder import Interrupted, Program, Run, cli_main, one_line, trim_logs

from . import outputs
from .config import SearchConfig
from .prepare import build_explainer, preflight, prepare
from .problems import build_problems
from .spaces import SPACES

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "digits.yaml")

PROGRAM = Program(
    module="applications.lease.search", config_cls=SearchConfig, default_config=DEFAULT_CONFIG,
    description="LeaSE architecture search (or its DARTS-family baseline). Data parallel when started by "
                "torchrun or with --nproc N (docs/distributed.md). Exit codes: 0 done, 2 bad configuration, "
                "path or checkpoint, "
                "3 stopped on a non-finite value, 130 interrupted (resumable).",
    default_out=lambda cfg: os.path.join("runs", f"{cfg.mode}-{cfg.name}"),
    examples=[[], ["--set", "epochs=2", "--set", "max_steps_per_epoch=4", "--out", "runs/quick"],
              ["--config", "applications/lease/configs/cifar10-darts-2nd-resnet18.yaml", "--set", "data.root=data"],
              ["--set", "space.name=pdarts", "--set", "mode=baseline", "--overwrite"],
              ["--resume", "runs/lease-digits", "--set", "nan_policy=skip"]],
    outputs=("alphas.jsonl", "genotype.json", "genotype.txt", "cells.png", "alphas.png", "explanations.png"),
    data_parallel=True)


@dataclass
class SearchState:
    """What survives between stages and across a restart (besides the mlo graph state)."""

    stage: int = 0
    carry: dict = field(default_factory=dict)      # what the space hands its next stage (P-DARTS: ops kept)
    alpha_steps: list = field(default_factory=list)
    alpha_history: dict = field(default_factory=lambda: {"normal": [], "reduce": []})
    seconds: float = 0.0                           # search time of the checkpointed part (kept across resumes)


def run_search(run: Run, env: mlo.distributed.Env | None = None) -> dict:
    """Run every stage of the search; returns the result summary (also in ``result.json``).

    ``env`` describes this process among several (``torchrun``); by default one
    process. Every process runs this function; only rank 0 writes files.
    """
    cfg, out = run.cfg, run.out
    env = env or mlo.distributed.Env(0, 1, 0, run.device, None)
    main, space = env.is_main, SPACES[cfg.space.name]
    setup = prepare(cfg, env)
    plan = space.plan(cfg)
    offsets = np.cumsum([0] + [e * setup.steps_per_epoch for e, _ in plan]).tolist()
    ckpt = run.resume_checkpoint(main=env.is_main)      # None: a new run (or none written yet)
    state = SearchState(**ckpt.extra["search"]) if ckpt is not None else SearchState()
    if ckpt is not None:
        _resume_message(run, env, ckpt, state, plan, offsets, setup.steps_per_epoch)
    finished = state.stage >= len(plan)           # resumed after the last stage had completed
    explainer = build_explainer(cfg, space, setup, min(state.stage, len(plan) - 1), state.carry, env.device)
    preflight(cfg, setup.data, explainer, setup.audience)
    run.start()    # only now, when the config has passed every check, write into the output folder
    if main and cfg.mode == "lease" and cfg.explain.method == "pgd":
        print("explain.method=pgd: signed PGD steps cut the E'->Delta' link, so the audience's validation "
              "loss gives the architecture no gradient (use method=ascent to keep the chain)", file=sys.stderr)
    t0 = time.time()
    skipped: dict[str, int] = dict(ckpt.extra.get("skipped_total", {})) if ckpt is not None else {}
    writers = run.writers()
    try:
        while state.stage < len(plan):
            epochs, warmup = plan[state.stage]
            total, offset = epochs * setup.steps_per_epoch, offsets[state.stage]
            if explainer is None:
                explainer = build_explainer(cfg, space, setup, state.stage, state.carry, env.device)
            graph = mlo.Graph(build_problems(cfg, explainer, setup.audience, setup.bank, setup.loaders, total))
            before, runner = dict(skipped), None

            def extra():
                done = dict(before)
                for k, v in runner.skip_counts.items():
                    done[k] = done.get(k, 0) + v
                return {"search": {**state.__dict__, "seconds": state.seconds + time.time() - t0},
                        "world_size": env.world_size, "skipped_total": done}
            callbacks = ([outputs.alpha_recorder(explainer, state, offset, out)] if main else []) \
                + [outputs.shift(w, offset) for w in writers]      # the recorder adds arch/* to the row
            runner = _runner(cfg, run, env, graph, explainer, state, space, setup.steps_per_epoch, warmup,
                             callbacks, extra)
            if ckpt is not None:
                runner.restore(ckpt)
                runner.reset_skip_counts()     # counted in "before" already
                if main:
                    trim_logs(out, lambda row, last=offset + runner.step: row["step"] <= last)
                ckpt = None
            elif state.stage > 0:   # a later stage's first checkpoint: its own graph, so a restart resumes it
                runner.save()
            if runner.step == 0 and main:
                print(f"stage {state.stage + 1}/{len(plan)}: {total} steps"
                      + (f" on {env.world_size} processes" if env.distributed else "") + f"\n{graph}", file=sys.stderr)
            try:
                runner.run(until=total)
            except mlo.NonFiniteError as e:
                run.say(_non_finite_message(e, run, offset, runner, env))
                raise
            skipped = extra()["skipped_total"]
            if runner.interrupted:
                stop = Interrupted(f"interrupted at step {offset + runner.step}")
                stop.processes = env.world_size
                raise stop
            if state.stage + 1 < len(plan):       # e.g. P-DARTS: keep the strongest ops, deepen
                state.carry = space.carry_to_next(cfg, explainer, state.stage)
            state.stage += 1
            if state.stage < len(plan):
                explainer = None
            else:
                runner.save()                  # marks the search finished (the stage's own end is saved)
    finally:
        for w in writers:
            w.close()
    if finished:                # nothing left to run: restore the final models and write the results again
        graph = mlo.Graph(build_problems(cfg, explainer, setup.audience, setup.bank, setup.loaders, 1))
        mlo.load_graph_state_dict(graph, ckpt.graph_state)
    return outputs.finish(cfg, out, space, explainer, setup.audience, setup.bank, setup.loaders, state, env.device,
                          state.seconds + time.time() - t0, env, skipped)


def _runner(cfg, run: Run, env, graph, explainer, state, space, steps_per_epoch: int, warmup: int, callbacks, extra):
    """The stage's runner (data parallel under torchrun); its hook runs the space's schedule and the warm-up."""
    def before_step(step: int):
        epoch = step // steps_per_epoch
        space.before_step(cfg, explainer, state.stage, epoch)
        return {"architecture"} if epoch < warmup else None
    kw = dict(callbacks=callbacks, log_every=cfg.log_every, checkpoint=run.checkpoint, progress=run.progress,
              checkpoint_every=cfg.checkpoint_every, nan_policy=cfg.nan_policy, before_step=before_step,
              extra_state=extra)
    if not env.distributed:
        return mlo.Runner(graph, **kw)
    # the bank's loss sums over the batch and each process touches its own rows: exchange the rows
    lease = cfg.mode == "lease"
    dp = mlo.distributed.DataParallel(graph, reduce={"explanation": "sum"} if lease else None,
                                      rows={"explanation": lambda batch: batch[2]} if lease else None)
    return mlo.distributed.DistributedRunner(graph, dp, **kw)


def _resume_message(run: Run, env, ckpt: mlo.RunCheckpoint, state: SearchState, plan, offsets: list[int],
                    steps_per_epoch: int) -> None:
    """Say where a resumed search continues. A finished one-stage search whose ``epochs`` (or steps per
    epoch) were raised on resume is reopened (``state.stage`` set back), so it runs on to the new total."""
    stages, search = len(plan), ckpt.extra.get("search", {})
    last = min(state.stage, stages - 1)
    at = offsets[last] + ckpt.step
    after = f"after {search.get('seconds', 0.0):.0f}s of search"
    if state.stage >= stages:
        total = plan[-1][0] * steps_per_epoch
        if stages == 1 and ckpt.step < total:
            state.stage = stages - 1
            run.say(f"resuming a finished search at step {at} and continuing to step {offsets[-1]} "
                    f"(the learning-rate schedules keep the length they were built with and run past their end) {after}")
        else:
            more = "--set epochs=N with N above the epochs it ran" if stages == 1 else \
                "a finished multi-stage search cannot be extended; start a new one"
            run.say(f"the search finished at step {at} ({after}): nothing left to run; its results are written "
                    f"again. To search longer: {more}")
    else:
        run.say(f"resuming from step {at} (stage {state.stage + 1}/{stages}) {after}")
    was = ckpt.extra.get("world_size", 1)
    if was != env.world_size:
        run.say(f"warning: this run was checkpointed with {was} process(es) and resumes with {env.world_size}: "
                "the global batch changes and the current epoch's data order differs from an uninterrupted run")


def _non_finite_message(e: mlo.NonFiniteError, run: Run, offset: int, runner, env) -> str:
    at = f" (step {offset + e.step} of the whole search)" if offset else ""
    saved = runner.last_saved_step
    kept = (f"the last complete checkpoint (step {offset + saved}) is kept in {run.out}" if saved
            else f"no checkpoint of this stage had been written yet in {run.out}")
    return (f"\nstopped: {e}{at}\n{kept}. Lower the learning rates, or skip and count such updates "
            f"(nan_policy: skip):\n  {run.resume_command(env.world_size)} --set nan_policy=skip")


def _search(run: Run) -> dict:
    try:
        env = mlo.distributed.init(run.device.type)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(one_line(e)) from None
    if run.device.type == "cpu":
        tune_cpu()
    try:
        return run_search(run, env)
    finally:
        mlo.distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 invalid configuration, path or unreadable checkpoint (before any training),
    3 stopped on a non-finite value (the last complete checkpoint is kept), 130 interrupted (resumable)."""
    return cli_main(PROGRAM, _search, argv)


if __name__ == "__main__":
    sys.exit(main())
