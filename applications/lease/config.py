"""The LeaSE search configuration: typed dataclasses, one per concern.

Loaded with ``applications.common.load_config`` from a YAML preset plus
``--set key=value`` overrides; unknown keys and ill-typed values fail before
any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from applications.common import ConfigError

from .spaces import PDartsSchedule

ENGINE_NAMES = ("first_order", "unrolled", "finite_difference", "neumann", "cg")


@dataclass
class DataConfig:
    name: Literal["digits", "cifar10", "cifar100", "imagenet"] = "digits"
    root: Optional[str] = None          # folder with the data (CIFAR/ImageNet)
    download: bool = False              # fetch CIFAR into root when missing
    seed: int = 0                       # fixes the split
    batch_size: int = 32
    subset_fraction: Optional[float] = None   # per-class fraction of train/val (quick runs)
    augment: bool = True
    num_workers: int = 0

    def validate(self):
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size: expected an integer >= 1, got {self.batch_size}")
        if self.name != "digits" and self.root is None:
            raise ConfigError(f"data.root: dataset {self.name!r} needs a data folder (--set data.root=DIR)")


@dataclass
class SpaceConfig:
    name: Literal["darts", "pcdarts", "pdarts"] = "darts"
    C: int = 8                          # initial channels
    layers: int = 3                     # cells (P-DARTS: overridden by pdarts.cells per stage)
    nodes: int = 4                      # intermediate nodes per cell
    stem_multiplier: int = 3
    pc_k: int = 4                       # PC-DARTS partial-channel factor
    stem: Literal["cifar", "imagenet"] = "cifar"

    def validate(self):
        for f in ("C", "layers", "nodes", "stem_multiplier", "pc_k"):
            if getattr(self, f) < 1:
                raise ConfigError(f"space.{f}: expected an integer >= 1, got {getattr(self, f)}")


@dataclass
class AudienceConfig:
    name: Literal["resnet18", "resnet50"] = "resnet18"
    width: float = 0.25                 # channel multiplier (1.0 = the paper's network)

    def validate(self):
        if not self.width > 0:
            raise ConfigError(f"audience.width: expected a positive number, got {self.width}")


@dataclass
class OptimConfig:
    """SGD with momentum for weights (explainer E, audience W), cosine-annealed per step."""

    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: Optional[float] = 5.0

    def validate(self):
        if not self.lr > 0:
            raise ConfigError(f"lr: expected a positive number, got {self.lr}")


@dataclass
class ArchOptimConfig:
    """Adam for the architecture A (DARTS' settings)."""

    lr: float = 3e-4
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 1e-3


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
        if not self.lr > 0:
            raise ConfigError(f"explain.lr: expected a positive number, got {self.lr}")
        if self.pgd_steps < 1:
            raise ConfigError(f"explain.pgd_steps: expected an integer >= 1, got {self.pgd_steps}")


@dataclass
class EngineConfig:
    name: str = "finite_difference"
    eps: float = 0.01                   # finite_difference
    steps: int = 1                      # unrolled
    iterations: int = 5                 # neumann / cg
    alpha: Optional[float] = None       # neumann
    damping: float = 0.0                # cg

    def validate(self):
        if self.name not in ENGINE_NAMES:
            raise ConfigError(f"engine name: unknown engine {self.name!r}; choose one of {', '.join(ENGINE_NAMES)}")

    def build(self):
        import mlo
        fields = {"first_order": {}, "unrolled": {"steps": self.steps},
                  "finite_difference": {"eps": self.eps},
                  "neumann": {"iterations": self.iterations, "alpha": self.alpha},
                  "cg": {"iterations": self.iterations, "damping": self.damping}}[self.name]
        return mlo.make_engine(self.name, **fields)


@dataclass
class EnginesConfig:
    """Engine per edge (the paper: one-step unrolled with finite-difference products)."""

    explainer: EngineConfig = field(default_factory=EngineConfig)     # E' w.r.t. A
    explanation: EngineConfig = field(default_factory=EngineConfig)   # Δ' w.r.t. E'
    audience: EngineConfig = field(default_factory=EngineConfig)      # W' w.r.t. Δ'


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
    bf16: bool = False                  # autocast on CUDA
    dtype: Literal["float32", "float64"] = "float32"
    log_every: int = 5
    checkpoint_every: int = 50
    data: DataConfig = field(default_factory=DataConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    pdarts: PDartsSchedule = field(default_factory=PDartsSchedule)   # P-DARTS stages (its own epochs)
    audience: AudienceConfig = field(default_factory=AudienceConfig)
    weights: OptimConfig = field(default_factory=OptimConfig)
    audience_optim: OptimConfig = field(default_factory=OptimConfig)
    arch: ArchOptimConfig = field(default_factory=ArchOptimConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    engines: EnginesConfig = field(default_factory=EnginesConfig)

    def validate(self):
        if self.epochs < 1:
            raise ConfigError(f"epochs: expected an integer >= 1, got {self.epochs}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"max_steps_per_epoch: expected an integer >= 1 or null, got {self.max_steps_per_epoch}")
        if self.gamma < 0:
            raise ConfigError(f"gamma: expected a number >= 0, got {self.gamma}")
        if self.mode == "baseline" and self.audience_only:
            raise ConfigError("audience_only: the baseline mode has no audience")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise ConfigError("log_every and checkpoint_every: expected integers >= 1")
