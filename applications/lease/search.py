"""``python -m applications.lease.search``: LeaSE (or its DARTS-family baseline) architecture search.

    python -m applications.lease.search [--config YAML] [--set key=value ...] [--out DIR] [--resume DIR]

With no config it runs the embedded digits preset on the CPU in a few minutes.
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
from dataclasses import dataclass, field

import numpy as np
import torch

import mlo
from applications.common import ConfigError, add_common_args, load_config, pick_device, save_config, tune_cpu

from . import explain, viz
from .config import SearchConfig
from .data import load_dataset, make_loader
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


def run_search(cfg: SearchConfig, out: str, device: torch.device, resume: bool = False) -> dict:
    """Run every stage of the search; returns the result summary (also in ``result.json``)."""
    os.makedirs(out, exist_ok=True)
    if not resume:
        save_config(cfg, os.path.join(out, "config.yaml"))
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    seed_everything(cfg.seed)
    data = load_dataset(cfg.data.name, cfg.data.root, seed=cfg.data.seed, download=cfg.data.download,
                        augment=cfg.data.augment, subset_fraction=cfg.data.subset_fraction)
    bs, nw = cfg.data.batch_size, cfg.data.num_workers
    loaders = Loaders(
        explainer_train=OnDevice(make_loader(data.train, bs, True, cfg.seed, num_workers=nw), device, dtype),
        audience_train=OnDevice(make_loader(data.train, bs, True, cfg.seed + 1, num_workers=nw), device, dtype),
        val=OnDevice(make_loader(data.val, bs, True, cfg.seed + 2, num_workers=nw), device, dtype))
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
        if cfg.explain.method == "pgd":
            print("explain.method=pgd: signed PGD steps cut the E'->Delta' link, so the audience's validation "
                  "loss gives the architecture no gradient (use method=ascent to keep the chain)", file=sys.stderr)

    ckpt_path = os.path.join(out, "checkpoint.pt")
    state = SearchState()
    saved = mlo.load_checkpoint(ckpt_path) if resume else None
    if saved is not None:
        extra = saved["extra"]
        state = SearchState(**extra["search"])
    plan = stage_plan(cfg)
    offsets = np.cumsum([0] + [e * steps_per_epoch for e, _ in plan]).tolist()
    t0 = time.time()
    explainer = None
    writers = _writers(out)
    try:
        while state.stage < len(plan):
            epochs, warmup = plan[state.stage]
            total = epochs * steps_per_epoch
            explainer = make_explainer(cfg, data, state, device, dtype)
            problems = build_problems(cfg, explainer, audience, bank, loaders, total)
            graph = mlo.Graph(problems)
            offset = offsets[state.stage]
            runner = mlo.Runner(graph, callbacks=[_shift(w, offset) for w in writers]
                                + [_alpha_recorder(explainer, state, offset, out)],
                                log_every=cfg.log_every, checkpoint=ckpt_path, checkpoint_every=cfg.checkpoint_every,
                                extra_state=lambda: {"search": state.__dict__},
                                before_step=_before_step(cfg, explainer, state, steps_per_epoch, warmup))
            if saved is not None:
                runner.load_state_dict(saved)
                _truncate_logs(out, offset + runner.step)
                saved = None
            if runner.step == 0:
                print(f"stage {state.stage + 1}/{len(plan)}: {total} steps\n{graph}", file=sys.stderr)
            runner.run(total)
            if runner.interrupted:
                print(f"\ninterrupted at step {offset + runner.step}; checkpoint saved. Resume with:\n"
                      f"  python -m applications.lease.search --resume {out}", file=sys.stderr)
                raise KeyboardInterrupt
            if state.stage + 1 < len(plan):       # P-DARTS: keep the strongest ops, deepen
                state.normal_ops, state.reduce_ops = next_stage_ops(explainer, cfg.pdarts.ops_kept[state.stage + 1])
            state.stage += 1
            runner.save()
    finally:
        for w in writers:
            w.close()
    return _finish(cfg, out, explainer, audience, bank, data, loaders, state, device, dtype, time.time() - t0)


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
def _accuracy(model, loader) -> float:
    was = model.training
    model.eval()
    correct = total = 0
    for x, y, _ in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    return correct / max(total, 1)


def _finish(cfg, out, explainer, audience, bank, data, loaders, state, device, dtype, seconds) -> dict:
    """Genotype, pictures and the summary."""
    genotype = final_genotype(explainer, cfg.pdarts.max_skip) if cfg.space.name == "pdarts" else explainer.genotype()
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
    result = {"mode": cfg.mode, "space": cfg.space.name, "dataset": cfg.data.name, "genotype": repr(genotype),
              "explainer_val_acc": _accuracy(explainer, loaders.val), "search_seconds": round(seconds, 1),
              "device": str(device)}
    if audience is not None:
        result["audience_val_acc"] = _accuracy(audience, loaders.val)
        x, _, idx = next(iter(loaders.audience_train))
        delta = bank.detach()[idx]
        viz.plot_explanations(x, delta, explain.reweight(x, delta, cfg.explain.reweight),
                              os.path.join(out, "explanations.png"))
    with open(os.path.join(out, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m applications.lease.search",
                                     description="LeaSE architecture search (or its DARTS-family baseline).")
    add_common_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg, out = resolve_config(args)
        device = pick_device(args.device if args.device != "auto" else cfg.device)
    except (ConfigError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if device.type == "cpu":
        tune_cpu()
    try:
        result = run_search(cfg, out, device, resume=bool(args.resume))
    except KeyboardInterrupt:
        return 130
    print(json.dumps(result, indent=2))
    print(f"outputs in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
