"""LeaSE / DARTS fixtures shared by ``overhead`` and ``lease_step``: config, models, fixed batches.

Sizes:

* ``tiny``: digits (8×8), supernet C=2, 3 cells (one normal), 2 nodes, batch 8, ResNet width 1/16;
* ``small``: the digits preset of ``applications/lease/configs/digits.yaml`` (C=4, 3 cells,
  4 nodes, batch 32, ResNet-18 width 1/8): the CPU default;
* ``paper``: CIFAR-shaped random data (3×32×32, 10 classes, a 25,000-example bank), C=16,
  8 cells, 4 nodes, batch 64, full-width ResNets: the paper's search setting (GPU).

Batches are drawn once and cycled, so data loading is not part of any timing.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from applications.common import load_config
from applications.lease import explain
from applications.lease.config import SearchConfig
from applications.lease.data import load_dataset
from applications.lease.models.resnet import build_audience
from applications.lease.problems import Loaders, build_problems
from applications.lease.spaces import build_supernet

PRESET = os.path.join(os.path.dirname(__file__), "..", "applications", "lease", "configs", "digits.yaml")

SIZES = {
    "tiny": {"space.C": 2, "space.layers": 3, "space.nodes": 2, "data.batch_size": 8, "audience.width": 0.0625},
    "small": {},
    "paper": {"space.C": 16, "space.layers": 8, "space.nodes": 4, "data.batch_size": 64, "audience.width": 1.0,
              "weights.lr": 0.025, "audience_optim.lr": 0.025, "arch.lr": 3e-4, "explain.init_scale": 0.03,
              "explain.reweight": "mul"},
}
BATCHES = 4          # distinct batches per data source (cycled)
TOTAL_STEPS = 1000   # cosine schedules' horizon (only sets the learning rates)


def config(size: str, mode: str = "lease", audience: str = "resnet18", dtype: str = "float32",
           **extra) -> SearchConfig:
    # finite differences on every edge (the paper's engines) unless ``extra`` names another engine: the
    # benchmarks' baseline does not follow the digits preset's default engine
    fd = {f"engines.{e}.name": "finite_difference" for e in ("explainer", "explanation", "audience")}
    sets = {**SIZES[size], **fd, "mode": mode, "audience.name": audience, "dtype": dtype, **extra}
    return load_config(SearchConfig, PRESET, [f"{k}={v}" for k, v in sets.items()])


@dataclass
class Fixture:
    """Everything one variant needs; ``copy()`` gives an independent copy with identical values."""

    cfg: SearchConfig
    explainer: torch.nn.Module
    audience: torch.nn.Module | None
    bank: torch.Tensor | None
    batches: Loaders        # lists of (x, y, idx) on the device

    def copy(self) -> Fixture:
        bank = None
        if self.bank is not None:
            bank = self.bank.detach().clone().requires_grad_(True)
        return Fixture(self.cfg, copy.deepcopy(self.explainer), copy.deepcopy(self.audience), bank, self.batches)


def fixture(cfg: SearchConfig, size: str, seed: int, device, dtype=torch.float32) -> Fixture:
    """Models (same initial values for a seed), the bank and fixed batches for ``cfg`` at ``size``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    bs = cfg.data.batch_size
    if size == "paper":
        n_train, shape, classes = 25_000, (3, 32, 32), 10

        def draw(n, with_idx):
            x = torch.rand(n, *shape, generator=gen)
            y = torch.randint(0, classes, (n,), generator=gen)
            idx = torch.randperm(n_train, generator=gen)[:n] if with_idx else torch.arange(n)
            return x, y, idx
        sources = [[draw(bs, w) for _ in range(BATCHES)] for w in (False, True, False)]
    else:
        # the digits, or the known-answer task's images (the same 8x8 shapes)
        data = load_dataset("synthetic" if cfg.data.name == "synthetic" else "digits", seed=cfg.data.seed,
                            augment=False)
        n_train, shape, classes = len(data.train), tuple(data.train[0][0].shape), data.num_classes

        def take(ds, with_idx):
            order = torch.randperm(len(ds), generator=gen)[: bs * BATCHES].tolist()
            out = []
            for b in range(BATCHES):
                items = [ds[i] for i in order[b * bs:(b + 1) * bs]]
                x = torch.stack([it[0] for it in items])
                y = torch.tensor([int(it[1]) for it in items])
                idx = torch.tensor([int(it[2]) for it in items]) if with_idx else torch.arange(len(items))
                out.append((x, y, idx))
            return out
        sources = [take(data.train, False), take(data.train, True), take(data.val, False)]
    sources = [[(x.to(device, dtype), y.to(device), i.to(device)) for x, y, i in src] for src in sources]
    sp = cfg.space
    explainer = build_supernet("darts", sp.C, classes, sp.layers, in_channels=shape[0], steps=sp.nodes,
                               multiplier=sp.nodes, stem_multiplier=sp.stem_multiplier).to(device, dtype)
    audience = bank = None
    if cfg.mode == "lease":
        audience = build_audience(cfg.audience.name, classes, shape[0], cfg.audience.width).to(device, dtype)
        bank = explain.init_bank(n_train, shape, cfg.explain.init_scale, gen, dtype).detach().to(device)
        bank.requires_grad_(True)
    return Fixture(cfg, explainer, audience, bank, Loaders(*sources))


def mlo_step(fx: Fixture, wrap=None):
    """The mlo step (``applications.lease.problems.build_problems``), as ``(step(), graph)``.

    ``wrap(problems)`` may edit the problems before the graph is built (timing hooks).
    """
    import mlo
    problems = build_problems(fx.cfg, fx.explainer, fx.audience, fx.bank, fx.batches, TOTAL_STEPS)
    if wrap is not None:
        wrap(problems)
    graph = mlo.Graph(problems)
    stepper = mlo.Stepper(graph, nan_policy="off")
    return stepper.step, graph


if __name__ == "__main__":
    import sys

    text = (f"benchmarks.nas holds the LeaSE fixtures of the benchmarks; it is not a program.\n"
            f"{__doc__.strip()}\n\nRun one of: python -m benchmarks.overhead, python -m benchmarks.lease_step "
            f"(each takes --help).")
    asked = any(a in ("-h", "--help") for a in sys.argv[1:])
    print(text, file=sys.stdout if asked else sys.stderr)
    sys.exit(0 if asked else 2)
