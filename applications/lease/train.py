"""Train a searched architecture from scratch: ``python -m applications.lease.train``.

Examples::

    python -m applications.lease.train --genotype DARTS_V2 --config applications/lease/configs/train_digits.yaml
    python -m applications.lease.train --genotype search_out/genotype.json \\
        --config applications/lease/configs/train_cifar10.yaml --set data.root=~/data --out runs/c10
    python -m applications.lease.train --resume runs/c10          # continue after a crash or Ctrl-C

The output folder gets ``config.yaml`` (the resolved settings), ``genotype.json``,
``metrics.jsonl`` (one JSON line per epoch), ``checkpoint.pt`` (saved after every
epoch and on Ctrl-C; ``--resume`` continues from it, mid-epoch if interrupted)
and, at the end, ``result.json`` with the test error and the parameter count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from applications.common import ConfigError, save_checkpoint, save_config, tune_cpu
from applications.common.run_folder import Interrupted, LoggingConfig, Program, Run, cli_main, read_resume, trim_logs

from . import config as search_config
from .data import DatasetFormatError, load_dataset
from .models.eval_net import build_eval_net, count_parameters
from .spaces.genotype import Genotype, genotype_from_json, genotype_to_json, get_genotype

__all__ = ["TrainDataConfig", "ModelConfig", "TrainOptimConfig", "TrainConfig", "lr_at", "train", "main"]

CHECKPOINT = "checkpoint.pt"


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainDataConfig(search_config.DataConfig):
    """The search's data settings plus what training from scratch adds."""

    cutout: int = 0
    full_train: bool = True
    image_size: Optional[int] = None

    def validate(self) -> None:
        super().validate()
        if self.cutout < 0:
            raise ConfigError(f"data.cutout: must be >= 0, got {self.cutout}")


@dataclass
class ModelConfig:
    """The evaluation network built from the genotype."""

    genotype: str = "DARTS_V2"
    C: int = 36
    layers: int = 20
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    drop_path_prob: float = 0.2
    stem: Literal["auto", "cifar", "imagenet"] = "auto"

    def validate(self) -> None:
        if self.C < 1 or self.layers < 1:
            raise ConfigError(f"model: C and layers must be >= 1, got C={self.C}, layers={self.layers}")
        if not 0.0 <= self.drop_path_prob < 1.0:
            raise ConfigError(f"model.drop_path_prob: must be in [0, 1), got {self.drop_path_prob}")
        if self.auxiliary_weight < 0:
            raise ConfigError(f"model.auxiliary_weight: must be >= 0, got {self.auxiliary_weight}")


@dataclass
class TrainOptimConfig(search_config.OptimConfig):
    """The search's SGD settings plus epochs, batch sizes and a per-epoch schedule."""

    lr_min: float = 0.0
    epochs: int = 600
    batch_size: int = 96
    eval_batch_size: Optional[int] = None
    schedule: Literal["cosine", "linear", "step"] = "cosine"
    step_gamma: float = 0.97
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    eval_every: int = 1
    #: Before the final evaluation, recompute every BatchNorm's running statistics as the plain
    #: average over one pass of the training data with the final weights. Short trainings need it:
    #: the running averages (momentum 0.1) lag behind weights that were still moving, and the test
    #: error then measures that lag, not the network (docs/lease.md, "Study").
    bn_recalibrate: bool = False

    def validate(self) -> None:
        self.check("train")
        if self.epochs < 1:
            raise ConfigError(f"train.epochs: must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or (self.eval_batch_size is not None and self.eval_batch_size < 1):
            raise ConfigError(f"train.batch_size: must be >= 1, got {self.batch_size}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"train.warmup_epochs: must be in [0, epochs), got {self.warmup_epochs}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.eval_every < 1:
            raise ConfigError(f"train.eval_every: must be >= 1, got {self.eval_every}")


@dataclass
class TrainConfig:
    """Everything ``applications.lease.train`` needs."""

    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainOptimConfig = field(default_factory=TrainOptimConfig)
    seed: int = 0
    #: CPU threads for PyTorch (None: PyTorch's default, one per core). On a shared,
    #: busy machine 1 avoids threads stalling each other at every op.
    threads: Optional[int] = None
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads: must be >= 1, got {self.threads}")


# --------------------------------------------------------------------------- pieces


def lr_at(cfg: TrainOptimConfig, epoch: int) -> float:
    """Learning rate for ``epoch`` (0-based): linear warm-up, then cosine, linear or step decay."""
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (epoch + 1) / cfg.warmup_epochs
    e = epoch - cfg.warmup_epochs
    total = max(1, cfg.epochs - cfg.warmup_epochs)
    if cfg.schedule == "cosine":
        return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + math.cos(math.pi * e / total))
    if cfg.schedule == "linear":
        return cfg.lr_min + (cfg.lr - cfg.lr_min) * (1.0 - e / total)
    return max(cfg.lr_min, cfg.lr * cfg.step_gamma**e)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of ``epoch``; a pure function of (seed, epoch), so resuming mid-epoch is exact."""
    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _train_loader(dataset: Dataset, cfg: TrainConfig, epoch: int, skip_batches: int) -> DataLoader:
    bs = cfg.train.batch_size
    order = _epoch_order(len(dataset), cfg.seed, epoch)
    if len(order) >= bs:
        order = order[: len(order) // bs * bs]  # drop the ragged last batch (BatchNorm dislikes tiny ones)
    order = order[skip_batches * bs :]
    return DataLoader(dataset, batch_size=bs, sampler=order, num_workers=cfg.data.num_workers,
                      pin_memory=torch.cuda.is_available())


def _eval_loader(dataset: Dataset, cfg: TrainConfig) -> DataLoader:
    bs = cfg.train.eval_batch_size or cfg.train.batch_size
    return DataLoader(dataset, batch_size=bs, shuffle=False, num_workers=cfg.data.num_workers,
                      pin_memory=torch.cuda.is_available())


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: DataLoader, device: torch.device) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as the plain (cumulative)
    average of the batch statistics over ``loader`` with the current weights (train-mode forwards
    without gradient or drop-path; the weights do not change). Returns how many layers it reset."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    drop, was_training = getattr(model, "drop_path_prob", 0.0), model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None               # cumulative average over the pass
    model.drop_path_prob = 0.0
    model.train()
    try:
        for x, _, _ in loader:
            model(x.to(device, non_blocking=True))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.drop_path_prob = drop
        model.train(was_training)
    return len(bns)


def _recalibration_loader(dataset: Dataset, cfg: TrainConfig) -> DataLoader:
    """The training examples in a fixed order, in training-sized batches (the statistics BatchNorm sees)."""
    return DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=False, num_workers=cfg.data.num_workers,
                      pin_memory=torch.cuda.is_available())


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict:
    """Mean loss and top-1 / top-5 error (%) of ``model`` over ``loader``."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    wrong1 = torch.zeros((), device=device)
    wrong5 = torch.zeros((), device=device)
    n = 0
    for x, y, _ in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        logits, _ = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        wrong1 += (top[:, 0] != y).sum()
        wrong5 += (~(top == y[:, None]).any(dim=1)).sum()
        n += len(y)
    n = max(n, 1)
    return {"loss": float(loss_sum) / n, "error": 100.0 * float(wrong1) / n, "top5_error": 100.0 * float(wrong5) / n}


def _resolve_stem(cfg: TrainConfig) -> bool:
    if cfg.model.stem == "auto":
        return cfg.data.name == "imagenet"
    return cfg.model.stem == "imagenet"


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, out_dir: str, device: torch.device, resume: bool = False,
          genotype: Genotype | None = None) -> dict:
    """Train the evaluation network of ``cfg.model.genotype``; returns the final result dict.

    With ``resume=True`` it continues from ``out_dir/checkpoint.pt`` (the rule every program
    follows: :func:`applications.common.run_folder.read_resume`; no checkpoint yet: it starts over).
    """
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    state = read_resume(out_dir, runner=False, logs=("metrics.jsonl",)) if resume else None
    if state is not None:
        genotype = genotype_from_json(state["genotype"])
    elif genotype is None:
        genotype = get_genotype(cfg.model.genotype)

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    splits = load_dataset(
        cfg.data.name, root=cfg.data.root, seed=cfg.data.seed, download=cfg.data.download, augment=cfg.data.augment,
        cutout=cfg.data.cutout, subset_fraction=cfg.data.subset_fraction, full_train=cfg.data.full_train,
        image_size=cfg.data.image_size,
    )
    model = build_eval_net(genotype, cfg.model.C, splits.num_classes, cfg.model.layers, cfg.model.auxiliary,
                           in_channels=splits.in_channels, imagenet=_resolve_stem(cfg)).to(device)
    params = count_parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)

    start_epoch, skip, partial = 0, 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start_epoch, skip, partial = int(state["epoch"]), int(state["batch"]), state.get("partial")
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    with open(os.path.join(out_dir, "genotype.json"), "w", encoding="utf-8") as fh:
        json.dump(genotype_to_json(genotype), fh, indent=1)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    trim_logs(out_dir, lambda row: row.get("epoch", 0) < start_epoch, names=("metrics.jsonl",))

    print(f"[train] {cfg.data.name}: {len(splits.train)} train / {len(splits.test)} test examples; "
          f"{params:,} parameters (without auxiliary head); device {device}"
          + (f"; resuming from epoch {start_epoch + 1}" + (f", batch {skip}" if skip else "") if state is not None else ""),
          flush=True)

    def checkpoint(epoch: int, batch: int, sums: dict | None) -> None:
        save_checkpoint({
            "epoch": epoch, "batch": batch, "partial": sums,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(), "genotype": genotype_to_json(genotype), "params": params,
        }, ckpt_path)

    test_loader = _eval_loader(splits.test, cfg)
    val_loader = _eval_loader(splits.val, cfg) if len(splits.val) else None
    last_test = None
    epochs = cfg.train.epochs
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        lr = lr_at(cfg.train, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.drop_path_prob = cfg.model.drop_path_prob * epoch / epochs
        sums = _train_epoch(model, optimizer, criterion, cfg, splits.train, epoch, skip, partial, device, checkpoint)
        skip, partial = 0, None
        if cfg.train.bn_recalibrate and epoch + 1 == epochs:     # the final evaluation sees settled statistics
            recalibrate_bn(model, _recalibration_loader(splits.train, cfg), device)
        row = {"epoch": epoch, "lr": lr, "drop_path_prob": model.drop_path_prob,
               "train_loss": sums["loss"] / max(sums["n"], 1), "train_error": 100.0 * sums["wrong"] / max(sums["n"], 1)}
        if val_loader is not None:
            val = evaluate(model, val_loader, device)
            row.update(val_loss=val["loss"], val_error=val["error"])
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs:
            last_test = evaluate(model, test_loader, device)
            row.update(test_loss=last_test["loss"], test_error=last_test["error"], test_top5_error=last_test["top5_error"])
        row["time_s"] = time.time() - t0
        with open(metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        checkpoint(epoch + 1, 0, None)
        shown = f" test_err {row['test_error']:.2f}%" if "test_error" in row else ""
        shown += f" val_err {row['val_error']:.2f}%" if "val_error" in row else ""
        print(f"[train] epoch {epoch + 1}/{epochs} lr {lr:.4g} train_loss {row['train_loss']:.4f} "
              f"train_err {row['train_error']:.2f}%{shown} ({row['time_s']:.1f}s)", flush=True)

    if last_test is None:  # resumed a run that had already finished: evaluate it (again) as configured
        if cfg.train.bn_recalibrate:   # deterministic in the weights: the same as at the end of the training
            recalibrate_bn(model, _recalibration_loader(splits.train, cfg), device)
        last_test = evaluate(model, test_loader, device)
    result = {
        "dataset": cfg.data.name,
        "genotype": genotype_to_json(genotype),
        "test_error": last_test["error"],
        "test_top5_error": last_test["top5_error"],
        "test_loss": last_test["loss"],
        "params": params,
        "params_with_auxiliary": count_parameters(model, include_auxiliary=True),
        "epochs": epochs,
        "bn_recalibrated": cfg.train.bn_recalibrate,
    }
    with open(os.path.join(out_dir, "result.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(f"[train] done: test error {result['test_error']:.2f}% with {params:,} parameters -> {out_dir}", flush=True)
    return result


def _train_epoch(model, optimizer, criterion, cfg: TrainConfig, dataset: Dataset, epoch: int, skip: int,
                 partial: dict | None, device: torch.device, checkpoint) -> dict:
    """One pass over the training data; on Ctrl-C, checkpoint the position and raise :class:`Interrupted`."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    wrong = torch.zeros((), device=device)
    n = 0
    if partial:
        loss_sum += partial["loss"]
        wrong += partial["wrong"]
        n = int(partial["n"])
    batch = skip
    aux_w = cfg.model.auxiliary_weight
    try:
        for x, y, _ in _train_loader(dataset, cfg, epoch, skip):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            logits, logits_aux = model(x)
            loss = criterion(logits, y)
            if logits_aux is not None and aux_w > 0:
                loss = loss + aux_w * criterion(logits_aux, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            wrong += (logits.detach().argmax(1) != y).sum()
            n += len(y)
            batch += 1
    except KeyboardInterrupt:
        checkpoint(epoch, batch, {"loss": float(loss_sum), "wrong": float(wrong), "n": n})
        raise Interrupted(f"interrupted in epoch {epoch + 1} after {batch} batches") from None
    return {"loss": float(loss_sum), "wrong": float(wrong), "n": n}


# --------------------------------------------------------------------------- command line


def _default_out(cfg: TrainConfig) -> str:
    name = os.path.splitext(os.path.basename(cfg.model.genotype))[0]
    return os.path.join("runs", "lease-train", f"{cfg.data.name}-{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _genotype_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--genotype", default=None,
                        help="published genotype (DARTS_V1, DARTS_V2, PC_DARTS, PC_DARTS_IMAGENET, P_DARTS) or a JSON "
                             "file; same as --set model.genotype=...")


def _genotype_override(args: argparse.Namespace) -> list[str]:
    if args.genotype is None:
        return []
    if args.resume:
        raise ConfigError("--resume trains the genotype the run started with; drop --genotype")
    return [f"model.genotype={args.genotype}"]


PROGRAM = Program(
    module="applications.lease.train", config_cls=TrainConfig, default_config=None, default_out=_default_out,
    description="Train the evaluation network of a genotype from scratch and report its test error.",
    examples=[["--genotype", "DARTS_V2", "--config", "applications/lease/configs/train_digits.yaml"],
              ["--genotype", "runs/lease-digits/genotype.json", "--config",
               "applications/lease/configs/train_cifar10.yaml", "--set", "data.root=data", "--out", "runs/c10"],
              ["--resume", "runs/c10"]],
    outputs=("genotype.json",), extra_args=_genotype_flag, overrides_from_args=_genotype_override)


def _train(run: Run) -> dict:
    try:
        genotype = None if run.resume else get_genotype(run.cfg.model.genotype)   # fail fast on a bad name or file
    except ValueError as e:
        raise ConfigError(f"model.genotype: {e}") from None
    run.start()
    tune_cpu()
    try:
        return train(run.cfg, run.out, run.device, resume=run.resume, genotype=genotype)
    except DatasetFormatError as e:
        raise ConfigError(f"data.root: {e}") from None


def main(argv: list[str] | None = None) -> int:
    return cli_main(PROGRAM, _train, argv)


if __name__ == "__main__":
    sys.exit(main())
