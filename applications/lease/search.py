"""``python -m applications.lease.search``: LeaSE (or its DARTS-family baseline) architecture search.

    python -m applications.lease.search [--config YAML] [--set key=value ...] [--out DIR] [--resume DIR]

With no config it runs the embedded digits preset on the CPU in a few minutes.
Data parallel on N GPUs (NCCL) or N CPU processes (gloo) when started by ``torchrun``
(``torchrun --nproc_per_node=N -m applications.lease.search ...``; docs/distributed.md);
``data.batch_size`` is then the per-process batch and only rank 0 writes.

Outputs (in ``--out``, default ``runs/<mode>-<name>``): ``config.yaml``,
``metrics.jsonl``/``metrics.csv`` (and TensorBoard logs when installed),
``checkpoint.pt`` (atomic, every ``checkpoint_every`` steps and on Ctrl-C),
``genotype.json``/``genotype.txt``, ``cells.png``, ``alphas.png``,
``explanations.png`` (LeaSE mode) and ``result.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

import mlo
import mlo.distributed
import mlo.precision
import mlo.rng
from applications.common import ConfigError, add_common_args, load_config, pick_device, save_config, tune_cpu

from . import explain, viz
from .config import SearchConfig
from .data import DatasetFormatError, DatasetNotFoundError, load_dataset, make_loader
from .models.resnet import build_audience
from .problems import Loaders, OnDevice, build_problems
from .spaces import build_stage, build_supernet, final_genotype, genotype_to_json, next_stage_ops

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, "digits.yaml")


@dataclass
class SearchState:
    """What survives between stages and across a restart (besides the mlo graph state)."""

    stage: int = 0
    normal_ops: list | None = None
    reduce_ops: list | None = None
    alpha_steps: list = field(default_factory=list)
    alpha_history: dict = field(default_factory=lambda: {"normal": [], "reduce": []})


def resolve_config(args) -> tuple[SearchConfig, str]:
    """Config and output folder from the command line (a resumed run keeps its config)."""
    if args.resume:
        path = os.path.join(args.resume, "config.yaml")
        if not os.path.exists(path):
            raise ConfigError(f"--resume {args.resume}: no config.yaml there; is it a search output folder?")
        if args.config or args.overrides:
            raise ConfigError("--resume continues a run with its saved config; --config and --set are not allowed")
        return load_config(SearchConfig, path), args.resume
    cfg = load_config(SearchConfig, args.config or DEFAULT_CONFIG, args.overrides)
    return cfg, args.out or os.path.join("runs", f"{cfg.mode}-{cfg.name}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_explainer(cfg: SearchConfig, data, state: SearchState, device, dtype) -> torch.nn.Module:
    sp = cfg.space
    common = dict(in_channels=data.in_channels, steps=sp.nodes, multiplier=sp.nodes,
                  stem_multiplier=sp.stem_multiplier, stem=sp.stem)
    if sp.name == "pdarts":
        model = build_stage(cfg.pdarts, state.stage, sp.C, data.num_classes, normal_ops=state.normal_ops,
                            reduce_ops=state.reduce_ops, **common)
    elif sp.name == "pcdarts":
        model = build_supernet("pcdarts", sp.C, data.num_classes, sp.layers, k=sp.pc_k, **common)
    else:
        model = build_supernet("darts", sp.C, data.num_classes, sp.layers, **common)
    return model.to(device=device, dtype=dtype)


def stage_plan(cfg: SearchConfig) -> list[tuple[int, int]]:
    """(epochs, weights-only warm-up epochs) per stage."""
    if cfg.space.name == "pdarts":
        return [(cfg.pdarts.epochs, cfg.pdarts.warmup_epochs)] * cfg.pdarts.num_stages
    return [(cfg.epochs, cfg.arch_start_epoch)]


def _truncate_logs(out: str, max_step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be redone)."""
    for name in ("metrics.jsonl", "alphas.jsonl"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                rows = [line for line in f if line.strip() and json.loads(line)["step"] <= max_step]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(rows)
    path = os.path.join(out, "metrics.csv")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        keep = lines[:1] + [line for line in lines[1:] if int(float(line.split(",", 1)[0])) <= max_step]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(keep)


def run_search(cfg: SearchConfig, out: str, device: torch.device, resume: bool = False,
               env: mlo.distributed.Env | None = None) -> dict:
    """Run every stage of the search; returns the result summary (also in ``result.json``).

    ``env`` describes this process among several (``torchrun``); by default one
    process. Every process runs this function; only rank 0 writes files.
    """
    env = env or mlo.distributed.Env(0, 1, 0, device, None)
    main = env.is_main
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    seed_everything(cfg.seed)
    data = _load_data(cfg)
    bs, nw = cfg.data.batch_size, cfg.data.num_workers

    def loader(split, seed):
        try:
            return OnDevice(make_loader(split, bs, True, seed, num_workers=nw, rank=env.rank,
                                        world_size=env.world_size), device, dtype)
        except mlo.ConfigError as e:
            raise ConfigError(f"data.subset_fraction: {e} (the {cfg.data.name} split is too small for "
                              f"{env.world_size} processes)") from None
    loaders = Loaders(explainer_train=loader(data.train, cfg.seed), audience_train=loader(data.train, cfg.seed + 1),
                      val=loader(data.val, cfg.seed + 2))
    steps_per_epoch = len(loaders.explainer_train)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    lease = cfg.mode == "lease"
    audience = bank = None
    if lease:
        audience = build_audience(cfg.audience.name, data.num_classes, data.in_channels,
                                  cfg.audience.width).to(device=device, dtype=dtype)
        shape = tuple(data.train[0][0].shape)
        gen = torch.Generator().manual_seed(cfg.seed)
        bank = explain.init_bank(len(data.train), shape, cfg.explain.init_scale, gen, dtype).detach().to(device)
        bank.requires_grad_(True)

    ckpt_path = os.path.join(out, "checkpoint.pt")
    state = SearchState()
    saved = _read_checkpoint(ckpt_path, out, main, env) if resume else None
    if saved is not None:
        state = SearchState(**saved["extra"]["search"])
    plan = stage_plan(cfg)
    offsets = np.cumsum([0] + [e * steps_per_epoch for e, _ in plan]).tolist()
    finished = state.stage >= len(plan)           # resumed after the last stage had completed
    model_state = SearchState(**{**state.__dict__, "stage": len(plan) - 1}) if finished else state
    explainer = make_explainer(cfg, data, model_state, device, dtype)
    _preflight(cfg, data, explainer, audience)
    if main:       # only now, when the config has passed every check, create the output folder
        os.makedirs(out, exist_ok=True)
        if not resume:
            save_config(cfg, os.path.join(out, "config.yaml"))
        if lease and cfg.explain.method == "pgd":
            print("explain.method=pgd: signed PGD steps cut the E'->Delta' link, so the audience's validation "
                  "loss gives the architecture no gradient (use method=ascent to keep the chain)", file=sys.stderr)
    t0 = time.time()
    skipped: dict[str, int] = dict(saved["extra"].get("skipped_total", {})) if saved is not None else {}
    writers = _writers(out) if main else []
    try:
        while state.stage < len(plan):
            epochs, warmup = plan[state.stage]
            total = epochs * steps_per_epoch
            if explainer is None:
                explainer = make_explainer(cfg, data, state, device, dtype)
            problems = build_problems(cfg, explainer, audience, bank, loaders, total)
            graph = mlo.Graph(problems)
            offset = offsets[state.stage]
            before = dict(skipped)
            runner_args = dict(callbacks=[_shift(w, offset) for w in writers]
                               + ([_alpha_recorder(explainer, state, offset, out)] if main else []),
                               log_every=cfg.log_every, checkpoint=ckpt_path, checkpoint_every=cfg.checkpoint_every,
                               nan_policy=cfg.nan_policy, before_step=_before_step(cfg, explainer, state,
                                                                                   steps_per_epoch, warmup))
            runner = None

            def extra():
                done = dict(before)
                for k, v in runner.stepper.skipped.items():
                    done[k] = done.get(k, 0) + v
                return {"search": state.__dict__, "world_size": env.world_size, "skipped_total": done}
            runner_args["extra_state"] = extra
            if env.distributed:
                # the bank's loss sums over the batch and each process touches its own rows: exchange the rows
                dp = mlo.distributed.DataParallel(graph, reduce={"explanation": "sum"} if lease else None,
                                                  rows={"explanation": lambda batch: batch[2]} if lease else None)
                runner = mlo.distributed.DistributedRunner(graph, dp, **runner_args)
            else:
                runner = mlo.Runner(graph, **runner_args)
            resumed_at = None
            if saved is not None:
                runner.load_state_dict(saved)
                resumed_at = runner.step
                runner.stepper.skipped.clear()     # counted in "before" already
                if main:
                    _truncate_logs(out, offset + runner.step)
                saved = None
            if runner.step == 0 and main:
                print(f"stage {state.stage + 1}/{len(plan)}: {total} steps"
                      + (f" on {env.world_size} processes" if env.distributed else "") + f"\n{graph}", file=sys.stderr)
            try:
                runner.run(total)
            except mlo.NonFiniteError as e:
                if main:
                    _report_non_finite(e, out, offset, runner, env, resumed_at)
                raise
            skipped = extra()["skipped_total"]
            if runner.interrupted:
                if main:
                    print(f"\ninterrupted at step {offset + runner.step}; checkpoint saved. Resume with:\n"
                          f"  {_resume_command(out, env)}", file=sys.stderr)
                raise KeyboardInterrupt
            if state.stage + 1 < len(plan):       # P-DARTS: keep the strongest ops, deepen
                state.normal_ops, state.reduce_ops = next_stage_ops(explainer, cfg.pdarts.ops_kept[state.stage + 1])
            state.stage += 1
            runner.save()
            if state.stage < len(plan):
                explainer = None
    finally:
        for w in writers:
            w.close()
    if finished:                # nothing left to run: restore the final models and write the results again
        graph = mlo.Graph(build_problems(cfg, explainer, audience, bank, loaders, 1))
        mlo.load_graph_state_dict(graph, saved["graph"])
    return _finish(cfg, out, explainer, audience, bank, data, loaders, state, device, dtype, time.time() - t0,
                   env, skipped)


def _load_data(cfg: SearchConfig):
    """The dataset, with a one-line error naming the setting when it is missing or unreadable."""
    try:
        return load_dataset(cfg.data.name, cfg.data.root, seed=cfg.data.seed, download=cfg.data.download,
                            augment=cfg.data.augment, subset_fraction=cfg.data.subset_fraction)
    except (DatasetNotFoundError, DatasetFormatError, OSError) as e:
        raise ConfigError(f"data.root: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if text else type(e).__name__


def _preflight(cfg: SearchConfig, data, explainer, audience) -> None:
    """Run the models once on two training images (no gradients; RNG states and buffers are put
    back), so a space or audience that cannot process these images fails now with a one-line error."""
    kind = next(explainer.parameters()).device.type
    if cfg.bf16 and not mlo.precision.autocast_available(kind):
        raise ConfigError(f"bf16: bf16 autocast is not supported on {kind!r} with this PyTorch build")
    rng_state = mlo.rng.capture_all()
    try:
        x = torch.stack([data.train[i][0] for i in range(min(2, len(data.train)))])
        for name, model, what in (
                ("space", explainer, f"the {cfg.space.name} supernet (C={cfg.space.C}, layers={cfg.space.layers}, "
                                     f"nodes={cfg.space.nodes}, stem={cfg.space.stem})"),
                ("audience", audience, f"the {cfg.audience.name} audience (width={cfg.audience.width})")):
            if model is None:
                continue
            p = next(model.parameters())
            was = model.training
            try:
                with torch.no_grad(), mlo.preserve_buffers([model]):
                    model.eval()
                    model(x.to(device=p.device, dtype=p.dtype))
            except Exception as e:      # any failure of the dry run is a configuration problem
                raise ConfigError(f"{name}: {what} cannot process {cfg.data.name} images of shape "
                                  f"{tuple(x.shape[1:])}: {_one_line(e)}") from None
            finally:
                model.train(was)
    finally:
        mlo.rng.restore_all(rng_state)


def _read_checkpoint(path: str, out: str, main: bool, env) -> dict | None:
    """The checkpoint to resume from (falling back to ``.prev`` with a message), or ``None`` when the run
    was stopped before its first checkpoint (it then starts over with its saved config)."""
    prev = path + ".prev"
    if not os.path.exists(path) and not os.path.exists(prev):
        if main:
            print(f"{out}: no checkpoint yet; starting the run from the beginning with its saved config",
                  file=sys.stderr)
            _truncate_logs(out, 0)
        return None
    reason = None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:          # missing, truncated or corrupt: try the previous one
        reason = _one_line(e)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = mlo.load_checkpoint(path)        # MLOError naming both files if .prev fails too
    if main:
        if reason is not None:
            stage = saved.get("extra", {}).get("search", {}).get("stage", 0) + 1
            print(f"warning: {path} cannot be read ({reason[:200]}); resuming from the previous checkpoint "
                  f"{prev} (stage {stage}, step {saved['step']})", file=sys.stderr)
            if os.path.exists(path):    # set it aside, so that the next save does not rotate it into .prev
                os.replace(path, path + ".damaged")
        for name in os.listdir(out):           # temp files of a write that a crash interrupted
            if name.startswith(".tmp-"):
                os.unlink(os.path.join(out, name))
        was = saved.get("extra", {}).get("world_size", 1)
        if was != env.world_size:
            print(f"warning: this run was checkpointed with {was} process(es) and resumes with {env.world_size}: "
                  "the global batch changes and the current epoch's data order differs from an uninterrupted run",
                  file=sys.stderr)
    return saved


def _report_non_finite(e: mlo.NonFiniteError, out: str, offset: int, runner, env, resumed_at=None) -> None:
    at = f" (step {offset + e.step} of the whole search)" if offset else ""
    saved_at = getattr(runner, "_saved_at", -1)
    if saved_at < 0 and resumed_at is not None:
        saved_at = resumed_at
    kept = (f"the last complete checkpoint (step {offset + saved_at}) is kept in {out}" if saved_at > 0
            else f"no checkpoint of this stage had been written yet in {out}")
    print(f"\nstopped: {e}{at}\n{kept}. Lower the learning rates, or set nan_policy: skip in "
          f"{os.path.join(out, 'config.yaml')} to skip and count such updates, then resume with\n"
          f"  {_resume_command(out, env)}", file=sys.stderr)


def _resume_command(out: str, env) -> str:
    if env is not None and env.distributed:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        nodes = max(env.world_size // max(local, 1), 1)
        flags = f"--nnodes={nodes} --nproc_per_node={local}" + (" <the same rendezvous flags>" if nodes > 1 else "")
        return f"torchrun {flags} -m applications.lease.search --resume {out}"
    return f"python -m applications.lease.search --resume {out}"


def _writers(out: str) -> list:
    writers = [mlo.JSONLWriter(os.path.join(out, "metrics.jsonl")), mlo.CSVWriter(os.path.join(out, "metrics.csv"))]
    if mlo.TensorBoardWriter.available():
        writers.append(mlo.TensorBoardWriter(os.path.join(out, "tensorboard")))
    return writers


def _shift(writer, offset: int):
    def log(step: int, row: dict) -> None:
        writer(offset + step, row)
    return log


def _alpha_recorder(explainer, state: SearchState, offset: int, out: str):
    """Keep softmax(alpha) of every logged step (for the heatmap) in the search state and a file."""
    def record(step: int, row: dict) -> None:
        w_normal, w_reduce, _, _ = explainer.cell_weights()
        normal = w_normal.detach().float().cpu().numpy().round(5).tolist()
        reduce = w_reduce.detach().float().cpu().numpy().round(5).tolist()
        state.alpha_steps.append(offset + step)
        state.alpha_history["normal"].append(normal)
        state.alpha_history["reduce"].append(reduce)
        with open(os.path.join(out, "alphas.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": offset + step, "stage": state.stage, "normal": normal, "reduce": reduce}) + "\n")
    return record


def _before_step(cfg: SearchConfig, explainer, state: SearchState, steps_per_epoch: int, warmup_epochs: int):
    """Architecture warm-up (weights only) and P-DARTS' skip-dropout schedule."""
    def hook(step: int):
        epoch = step // steps_per_epoch
        if cfg.space.name == "pdarts":
            explainer.set_drop_rate(cfg.pdarts.drop_rate(state.stage, epoch))
        return {"architecture"} if epoch < warmup_epochs else None
    return hook


@torch.no_grad()
def _accuracy(model, loader, env=None, batch_stats: bool = False) -> float:
    """Accuracy over the loader (over every process's shard when data parallel).

    ``batch_stats``: keep BatchNorm in training mode (batch statistics, buffers
    restored afterwards). The supernet needs it: its running statistics also saw
    the perturbed inputs of the explanation step, so they describe no single input
    distribution; the search itself only ever uses batch statistics.
    """
    was = model.training
    model.train(batch_stats)
    correct = total = 0
    with mlo.preserve_buffers([model]):
        for x, y, _ in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    model.train(was)
    if env is not None and env.distributed:
        correct, total = mlo.distributed.all_sum([correct, total])
    return correct / max(total, 1)


def _finish(cfg, out, explainer, audience, bank, data, loaders, state, device, dtype, seconds, env=None,
            skipped=None) -> dict:
    """Genotype, pictures and the summary (every process evaluates its shard; rank 0 writes)."""
    genotype = final_genotype(explainer, cfg.pdarts.max_skip) if cfg.space.name == "pdarts" else explainer.genotype()
    result = {"mode": cfg.mode, "space": cfg.space.name, "dataset": cfg.data.name, "genotype": repr(genotype),
              "explainer_val_acc": _accuracy(explainer, loaders.val, env, batch_stats=True), "search_seconds": round(seconds, 1),
              "device": str(device), "world_size": env.world_size if env is not None else 1}
    if audience is not None:
        result["audience_val_acc"] = _accuracy(audience, loaders.val, env)
    if skipped:
        result["skipped_updates"] = dict(skipped)
    if env is not None and not env.is_main:
        return result
    with open(os.path.join(out, "genotype.json"), "w", encoding="utf-8") as f:
        json.dump(genotype_to_json(genotype), f, indent=2)
    with open(os.path.join(out, "genotype.txt"), "w", encoding="utf-8") as f:
        f.write(repr(genotype) + "\n")
    viz.plot_genotype(genotype, os.path.join(out, "cells.png"))
    if state.alpha_steps:
        ops = {"normal": explainer.normal_ops, "reduce": explainer.reduce_ops}
        hist = {k: [np.asarray(a) for a in v] for k, v in state.alpha_history.items()}
        # P-DARTS stages have different op sets: plot the last stage's history
        shapes = [a.shape for a in hist["normal"]]
        keep = [i for i, s in enumerate(shapes) if s == shapes[-1]]
        viz.plot_alpha_history([state.alpha_steps[i] for i in keep],
                               {k: [v[i] for i in keep] for k, v in hist.items()}, ops, os.path.join(out, "alphas.png"))
    if audience is not None:
        x, _, idx = next(iter(loaders.audience_train))
        delta = bank.detach()[idx]
        viz.plot_explanations(x, delta, explain.reweight(x, delta, cfg.explain.reweight),
                              os.path.join(out, "explanations.png"))
    with open(os.path.join(out, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 invalid configuration or unreadable checkpoint (before any training),
    3 stopped on a non-finite value (the last complete checkpoint is kept), 130 interrupted (resumable)."""
    parser = argparse.ArgumentParser(prog="python -m applications.lease.search",
                                     description="LeaSE architecture search (or its DARTS-family baseline). "
                                                 "Data parallel when started by torchrun (docs/distributed.md).")
    add_common_args(parser)
    args = parser.parse_args(argv)
    rank0 = mlo.distributed.env_rank() == 0     # only rank 0 talks

    def error(e) -> int:
        if rank0:
            print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        cfg, out = resolve_config(args)
        device = pick_device(args.device if args.device != "auto" else cfg.device)
    except (ConfigError, RuntimeError, ValueError, mlo.MLOError) as e:
        return error(e)
    try:
        env = mlo.distributed.init(device.type)
    except (RuntimeError, ValueError, mlo.MLOError) as e:
        return error(e)
    if device.type == "cpu":
        tune_cpu()
    try:
        result = run_search(cfg, out, env.device, resume=bool(args.resume), env=env)
    except KeyboardInterrupt:
        return 130
    except mlo.NonFiniteError:
        return 3
    except (ConfigError, mlo.MLOError) as e:
        return error(e)
    finally:
        mlo.distributed.shutdown()
    if env.is_main:
        print(json.dumps(result, indent=2))
        print(f"outputs in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
