"""Everything a search builds before its first step: data, loaders, audience, bank, supernet, a dry run.

Each failure that a setting causes (a missing data folder, a space that cannot
process the images, bf16 where autocast is missing) becomes a one-line
``ConfigError`` naming the setting, before any output is written.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

import mlo
from applications.common import ConfigError
from applications.common.run_folder import one_line

from . import arch_stats, explain
from .data import DatasetFormatError, DatasetNotFoundError, load_dataset, make_loader
from .models.resnet import build_audience
from .problems import Loaders, OnDevice

__all__ = ["Setup", "seed_everything", "prepare", "build_explainer", "preflight"]


@dataclass
class Setup:
    """The data and the models that live through every stage (the supernet is rebuilt per stage)."""

    data: object
    loaders: Loaders
    steps_per_epoch: int
    audience: torch.nn.Module | None
    bank: torch.Tensor | None
    dtype: torch.dtype


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(cfg, env) -> Setup:
    """Seed, load the data, build the loaders of this process's shard, the audience and the bank."""
    device = env.device
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    seed_everything(cfg.seed)
    try:
        data = load_dataset(cfg.data.name, cfg.data.root, seed=cfg.data.seed, download=cfg.data.download,
                            augment=cfg.data.augment, subset_fraction=cfg.data.subset_fraction)
    except (DatasetNotFoundError, DatasetFormatError, OSError) as e:
        raise ConfigError(f"data.root: {one_line(e)}") from None
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
    audience = bank = None
    if cfg.mode == "lease":
        audience = build_audience(cfg.audience.name, data.num_classes, data.in_channels,
                                  cfg.audience.width).to(device=device, dtype=dtype)
        shape = tuple(data.train[0][0].shape)
        gen = torch.Generator().manual_seed(cfg.seed)
        bank = explain.init_bank(len(data.train), shape, cfg.explain.init_scale, gen, dtype).detach().to(device)
        bank.requires_grad_(True)
    return Setup(data, loaders, steps_per_epoch, audience, bank, dtype)


def build_explainer(cfg, space, setup: Setup, stage: int, carry: dict, device) -> torch.nn.Module:
    """The supernet of ``stage`` (its alphas re-drawn from ``arch.init_seed`` when that is set)."""
    model = space.build(cfg, stage, carry, setup.data.in_channels, setup.data.num_classes)
    if cfg.arch.init_seed is not None:
        arch_stats.reseed_alphas(model, cfg.arch.init_seed + stage)
    return model.to(device=device, dtype=setup.dtype)


def preflight(cfg, data, explainer, audience) -> None:
    """Run the models once on two training images (no gradients; RNG states and buffers are put
    back), so a space or audience that cannot process these images fails now with a one-line error."""
    kind = next(explainer.parameters()).device.type
    if cfg.bf16 and not mlo.precision.autocast_available(kind):
        raise ConfigError(f"bf16: bf16 autocast is not supported on {kind!r} with this PyTorch build")
    with mlo.rng.preserved():
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
                                  f"{tuple(x.shape[1:])}: {one_line(e)}") from None
            finally:
                model.train(was)
