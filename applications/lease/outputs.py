"""What a search writes besides the checkpoint: log callbacks, the accuracy, genotype, pictures, result.

Only rank 0 writes; every process evaluates its own shard of the validation data.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

import mlo

from . import arch_stats, explain, viz
from .spaces import genotype_to_json

__all__ = ["shift", "alpha_recorder", "accuracy", "finish"]


def shift(writer, offset: int):
    """``writer`` with steps counted over the whole search (stages run their own step counters)."""
    def log(step: int, row: dict) -> None:
        writer(offset + step, row)
    return log


def alpha_recorder(explainer, state, offset: int, out: str):
    """Keep softmax(alpha) of every logged step (for the heatmap) in the search state and ``alphas.jsonl``."""
    def record(step: int, row: dict) -> None:
        w_normal, w_reduce, _, _ = explainer.cell_weights()
        normal = w_normal.detach().float().cpu().numpy().round(5).tolist()
        reduce = w_reduce.detach().float().cpu().numpy().round(5).tolist()
        state.alpha_steps.append(offset + step)
        state.alpha_history["normal"].append(normal)
        state.alpha_history["reduce"].append(reduce)
        ops = {"normal": explainer.normal_ops, "reduce": explainer.reduce_ops}
        row.update(arch_stats.headline(arch_stats.movement({"normal": [normal], "reduce": [reduce]}, ops)))
        with open(os.path.join(out, "alphas.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": offset + step, "stage": state.stage, "normal": normal, "reduce": reduce}) + "\n")
    return record


@torch.no_grad()
def accuracy(model, loader, env=None, batch_stats: bool = False) -> float:
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


def finish(cfg, out, space, explainer, audience, bank, loaders, state, device, seconds, env, skipped) -> dict:
    """Genotype, pictures and the summary ``result.json`` (every process evaluates its shard; rank 0 writes)."""
    genotype = space.genotype(cfg, explainer)
    result = {"mode": cfg.mode, "space": cfg.space.name, "dataset": cfg.data.name, "genotype": repr(genotype),
              "explainer_val_acc": accuracy(explainer, loaders.val, env, batch_stats=True),
              "search_seconds": round(seconds, 1), "device": str(device), "world_size": env.world_size}
    if audience is not None:
        result["audience_val_acc"] = accuracy(audience, loaders.val, env)
    if skipped:
        result["skipped_updates"] = dict(skipped)
    if state.alpha_steps:     # how far the architecture moved (docs/lease.md, "Is the search learning?")
        ops = {"normal": explainer.normal_ops, "reduce": explainer.reduce_ops}
        result["architecture"] = arch_stats.movement(state.alpha_history, ops)
    if not env.is_main:
        return result
    with open(os.path.join(out, "genotype.json"), "w", encoding="utf-8") as f:
        json.dump(genotype_to_json(genotype), f, indent=2)
    with open(os.path.join(out, "genotype.txt"), "w", encoding="utf-8") as f:
        f.write(repr(genotype) + "\n")
    viz.plot_genotype(genotype, os.path.join(out, "cells.png"))
    if state.alpha_steps:
        ops = {"normal": explainer.normal_ops, "reduce": explainer.reduce_ops}
        hist = {k: [np.asarray(a) for a in v] for k, v in state.alpha_history.items()}
        # stages with different op sets (P-DARTS): plot the last stage's history
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
