"""The LeaSE search configuration: typed dataclasses, one per concern.

Loaded with ``applications.common.load_config`` from a YAML preset plus
``--set key=value`` overrides; unknown keys and ill-typed values fail before
any work starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import mlo
from applications.common import ConfigError
from applications.common.run_folder import LoggingConfig

from .data import DATASETS, FOLDER_DATASETS
from .spaces import SPACES, PDartsSchedule


def _need(ok: bool, key: str, what: str, value) -> None:
    """Raise ``ConfigError("<key>: expected <what>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: expected {what}, got {value!r}", field=key)


def _positive(key: str, value) -> None:
    _need(math.isfinite(value) and value > 0, key, "a finite number > 0", value)


def _nonnegative(key: str, value) -> None:
    _need(math.isfinite(value) and value >= 0, key, "a finite number >= 0", value)


def _at_least(key: str, value: int, low: int) -> None:
    _need(value >= low, key, f"an integer >= {low}", value)


@dataclass
class DataConfig:
    """Which data, shared by the search and ``applications.lease.train`` (see ``data.load_dataset``)."""

    name: str = "digits"                # one of data.DATASETS
    root: Optional[str] = None          # folder with the data (CIFAR/ImageNet)
    download: bool = False              # fetch CIFAR into root when missing
    seed: int = 0                       # fixes the split
    subset_fraction: Optional[float] = None   # per-class fraction of train/val (quick runs)
    augment: bool = True
    num_workers: int = 0

    def validate(self):
        _need(self.name in DATASETS, "data.name", f"one of {', '.join(DATASETS)}", self.name)
        _at_least("data.seed", self.seed, 0)
        _at_least("data.num_workers", self.num_workers, 0)
        if self.subset_fraction is not None:
            _need(0 < self.subset_fraction <= 1, "data.subset_fraction", "a number in (0, 1] or null",
                  self.subset_fraction)
        if self.name in FOLDER_DATASETS and self.root is None:
            raise ConfigError(f"data.root: dataset {self.name!r} needs a data folder (--set data.root=DIR)",
                              field="data.root")


@dataclass
class SearchDataConfig(DataConfig):
    batch_size: int = 32

    def validate(self):
        super().validate()
        _at_least("data.batch_size", self.batch_size, 1)


@dataclass
class SpaceConfig:
    name: str = "darts"                 # a key of applications.lease.spaces.SPACES
    C: int = 8                          # initial channels
    layers: int = 3                     # cells (P-DARTS: overridden by pdarts.cells per stage)
    nodes: int = 4                      # intermediate nodes per cell
    stem_multiplier: int = 3
    pc_k: int = 4                       # PC-DARTS partial-channel factor
    stem: Literal["cifar", "imagenet"] = "cifar"

    def validate(self):
        if self.name not in SPACES:
            raise ConfigError(f"space.name: expected one of {', '.join(repr(k) for k in SPACES)}, got {self.name!r}",
                              field="space.name")
        for f in ("C", "layers", "nodes", "stem_multiplier", "pc_k"):
            if getattr(self, f) < 1:
                raise ConfigError(f"space.{f}: expected an integer >= 1, got {getattr(self, f)}", field=f"space.{f}")
        if self.name == "pcdarts" and self.C % self.pc_k:
            raise ConfigError(f"space.pc_k: PC-DARTS searches C // pc_k channels, so space.C={self.C} must be "
                              f"divisible by space.pc_k={self.pc_k}", field="space.pc_k")


@dataclass
class AudienceConfig:
    name: Literal["resnet18", "resnet50"] = "resnet18"
    width: float = 0.25                 # channel multiplier (1.0 = the paper's network)

    def validate(self):
        _positive("audience.width", self.width)


@dataclass
class OptimConfig:
    """SGD with momentum, cosine-annealed: the search's weights (explainer E, audience W); the
    training program extends it with its epochs and schedules."""

    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: Optional[float] = 5.0

    def check(self, section: str):
        """Called by ``SearchConfig.validate`` with the section's name (weights / audience_optim)."""
        _positive(f"{section}.lr", self.lr)
        _nonnegative(f"{section}.lr_min", self.lr_min)
        _nonnegative(f"{section}.momentum", self.momentum)
        _nonnegative(f"{section}.weight_decay", self.weight_decay)
        if self.grad_clip is not None:
            _positive(f"{section}.grad_clip", self.grad_clip)


@dataclass
class ArchOptimConfig:
    """Adam for the architecture A (DARTS' settings)."""

    lr: float = 3e-4
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 1e-3
    init_seed: Optional[int] = None     # own seed for the alpha initialisation (None: drawn after `seed`)

    def validate(self):
        _positive("arch.lr", self.lr)
        if self.init_seed is not None:
            _at_least("arch.init_seed", self.init_seed, 0)
        for f in ("beta1", "beta2"):
            _need(0 <= getattr(self, f) < 1, f"arch.{f}", "a number in [0, 1)", getattr(self, f))
        _nonnegative("arch.weight_decay", self.weight_decay)


@dataclass
class ExplainConfig:
    method: Literal["ascent", "pgd"] = "ascent"
    lr: float = 1.0                     # ξ_Δ of the ascent step
    init_scale: float = 0.03            # bank starts uniform in [-init_scale, init_scale]
    pgd_steps: int = 7
    pgd_step_size: float = 2 / 255
    pgd_eps: float = 8 / 255
    reweight: Literal["mul", "mul_abs", "mul_one_plus_abs"] = "mul"

    def validate(self):
        _positive("explain.lr", self.lr)
        _nonnegative("explain.init_scale", self.init_scale)
        _at_least("explain.pgd_steps", self.pgd_steps, 1)
        _positive("explain.pgd_step_size", self.pgd_step_size)
        _positive("explain.pgd_eps", self.pgd_eps)


@dataclass
class EnginesConfig:
    """Engine per edge (the paper: one-step unrolled with finite-difference products).

    Each is an mlo engine, written ``{name: cg, iterations: 20, tol: 1e-6}`` (or just a
    name); every field of the engine can be set and the rest keep mlo's defaults.
    """

    explainer: mlo.Engine = mlo.FiniteDifference()     # E' w.r.t. A
    explanation: mlo.Engine = mlo.FiniteDifference()   # Δ' w.r.t. E'
    audience: mlo.Engine = mlo.FiniteDifference()      # W' w.r.t. Δ'

    def validate(self):
        for edge in ("explainer", "explanation", "audience"):
            engine = getattr(self, edge)
            # every LeaSE problem takes one optimizer step per outer step (PGD's explanation edge is first order)
            if isinstance(engine, mlo.Unrolled) and engine.steps != 1:
                raise ConfigError(f"engines.{edge}.steps: expected 1 (each LeaSE problem takes one step per "
                                  f"iteration, so unrolled differentiates that one step), got {engine.steps}",
                                  field=f"engines.{edge}.steps")

    def build(self, edge: str) -> mlo.Engine:
        """The mlo engine of ``edge`` (explainer, explanation or audience)."""
        return getattr(self, edge)


@dataclass
class SearchConfig:
    mode: Literal["lease", "baseline"] = "lease"   # baseline: plain DARTS / PC-DARTS / P-DARTS
    name: str = "digits"
    epochs: int = 10                    # DARTS / PC-DARTS (P-DARTS: pdarts.epochs per stage)
    arch_start_epoch: int = 0           # weights only before this epoch (PC-DARTS: 15)
    max_steps_per_epoch: Optional[int] = None   # cap (quick runs and tests)
    gamma: float = 1.0                  # weight of the audience's validation loss
    explainer_val_order: Literal["first", "second"] = "second"   # "first": DARTS-1st for the explainer's own term
    audience_only: bool = False         # ablation: drop the explainer's own validation loss
    seed: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False                  # bf16 autocast (CUDA; CPU where supported); engines stay fp32
    dtype: Literal["float32", "float64"] = "float32"
    nan_policy: Literal["raise", "skip", "off"] = "raise"   # NaN/Inf in a loss or hypergradient: stop / skip it
    log_every: int = 5
    checkpoint_every: int = 50
    data: SearchDataConfig = field(default_factory=SearchDataConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    pdarts: PDartsSchedule = field(default_factory=PDartsSchedule)   # P-DARTS stages (its own epochs)
    audience: AudienceConfig = field(default_factory=AudienceConfig)
    weights: OptimConfig = field(default_factory=OptimConfig)
    audience_optim: OptimConfig = field(default_factory=OptimConfig)
    arch: ArchOptimConfig = field(default_factory=ArchOptimConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    engines: EnginesConfig = field(default_factory=EnginesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self):
        _at_least("epochs", self.epochs, 1)
        if self.space.name != "pdarts":
            _need(0 <= self.arch_start_epoch < self.epochs, "arch_start_epoch",
                  f"an integer in [0, epochs={self.epochs}) (the architecture must get some steps)",
                  self.arch_start_epoch)
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"max_steps_per_epoch: expected an integer >= 1 or null, got {self.max_steps_per_epoch}",
                              field="max_steps_per_epoch")
        _nonnegative("gamma", self.gamma)
        _at_least("seed", self.seed, 0)
        if self.mode == "baseline" and self.audience_only:
            raise ConfigError("audience_only: the baseline mode has no audience", field="audience_only")
        _at_least("log_every", self.log_every, 1)
        _at_least("checkpoint_every", self.checkpoint_every, 1)
        if self.bf16 and self.dtype != "float32":
            raise ConfigError(f"bf16: autocast needs float32 parameters (the master values); got dtype={self.dtype}",
                              field="bf16")
        self.weights.check("weights")
        self.audience_optim.check("audience_optim")
