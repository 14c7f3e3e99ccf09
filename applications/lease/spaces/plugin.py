"""A search space as the search program sees it: one :class:`SearchSpace` per entry of ``SPACES``.

The search never names a space. It asks the space for its stage plan, builds each
stage's supernet, calls the per-step hook, carries what one stage hands the next
and reads the final genotype, all through these five functions. A new space is one
more ``SearchSpace`` in ``applications.lease.spaces.SPACES``.

``cfg`` is the search configuration (``applications.lease.config.SearchConfig``);
``carry`` is a plain dict (saved in the checkpoint) that one stage hands the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .genotype import Genotype

__all__ = ["SearchSpace", "one_stage_plan"]


def one_stage_plan(cfg) -> list[tuple[int, int]]:
    """A single stage of ``cfg.epochs`` epochs, weights only for the first ``cfg.arch_start_epoch``."""
    return [(cfg.epochs, cfg.arch_start_epoch)]


@dataclass(frozen=True)
class SearchSpace:
    """Supernet class plus the hooks the search calls (defaults: one-stage DARTS behaviour)."""

    name: str
    supernet: type                                     # the supernet class (``build_supernet`` makes it)
    options: Callable[[object], dict] = field(default=lambda cfg: {})   # extra constructor arguments from cfg
    plan: Callable[[object], list[tuple[int, int]]] = one_stage_plan     # (epochs, warm-up epochs) per stage
    build_stage: Callable | None = None                # (cfg, stage, carry, **common) -> supernet; None: one shape
    step_hook: Callable[[object, nn.Module, int, int], None] | None = None   # (cfg, model, stage, epoch)
    next_stage: Callable[[object, nn.Module, int], dict] | None = None       # (cfg, model, stage) -> carry
    final: Callable[[object, nn.Module], Genotype] | None = None             # (cfg, model) -> genotype

    def build(self, cfg, stage: int, carry: dict, in_channels: int, num_classes: int) -> nn.Module:
        """The supernet of ``stage`` for images with ``in_channels`` channels and ``num_classes`` classes."""
        sp = cfg.space
        common = dict(in_channels=in_channels, steps=sp.nodes, multiplier=sp.nodes,
                      stem_multiplier=sp.stem_multiplier, stem=sp.stem)
        if self.build_stage is not None:
            return self.build_stage(cfg, stage, carry, C=sp.C, num_classes=num_classes, **common)
        return self.supernet(sp.C, num_classes, sp.layers, **common, **self.options(cfg))

    def before_step(self, cfg, model: nn.Module, stage: int, epoch: int) -> None:
        if self.step_hook is not None:
            self.step_hook(cfg, model, stage, epoch)

    def carry_to_next(self, cfg, model: nn.Module, stage: int) -> dict:
        return self.next_stage(cfg, model, stage) if self.next_stage is not None else {}

    def genotype(self, cfg, model: nn.Module) -> Genotype:
        return self.final(cfg, model) if self.final is not None else model.genotype()
