"""Differentiable search spaces (explainer supernets) for LeaSE: DARTS, PC-DARTS, P-DARTS.

Use :func:`build_supernet` to make one; every supernet keeps its architecture
parameters under ``arch.`` and offers ``arch_parameters()``,
``weight_parameters()`` and ``genotype()``. ``SPACES`` maps each name to its
:class:`~.plugin.SearchSpace` (supernet, stage plan, per-step hook, hand-over
between stages, final genotype): the search looks spaces up there and nowhere else.
"""

from __future__ import annotations

from . import darts, pcdarts, pdarts
from .darts import DartsSupernet, default_reductions, num_edges
from .genotype import (
    DARTS_V1,
    DARTS_V2,
    P_DARTS,
    PC_DARTS,
    PC_DARTS_IMAGENET,
    PRIMITIVES,
    PUBLISHED,
    Genotype,
    genotype_from_json,
    genotype_to_json,
    get_genotype,
    save_genotype,
)
from .ops import OPS
from .pcdarts import PCDartsSupernet
from .pdarts import PDartsSchedule, PDartsSupernet, build_stage, final_genotype, next_stage_ops
from .plugin import SearchSpace

__all__ = [
    "SPACES",
    "SearchSpace",
    "build_supernet",
    "DartsSupernet",
    "PCDartsSupernet",
    "PDartsSupernet",
    "PDartsSchedule",
    "build_stage",
    "next_stage_ops",
    "final_genotype",
    "num_edges",
    "default_reductions",
    "OPS",
    "PRIMITIVES",
    "Genotype",
    "DARTS_V1",
    "DARTS_V2",
    "PC_DARTS",
    "PC_DARTS_IMAGENET",
    "P_DARTS",
    "PUBLISHED",
    "genotype_to_json",
    "genotype_from_json",
    "get_genotype",
    "save_genotype",
]

SPACES: dict[str, SearchSpace] = {s.name: s for s in (darts.SPACE, pcdarts.SPACE, pdarts.SPACE)}


def build_supernet(
    space: str,
    C: int,
    num_classes: int,
    layers: int,
    in_channels: int = 3,
    steps: int = 4,
    multiplier: int = 4,
    stem_multiplier: int = 3,
    **space_kwargs,
) -> DartsSupernet:
    """Make the supernet of ``space`` (``"darts"``, ``"pcdarts"`` or ``"pdarts"``).

    ``space_kwargs`` go to the space's class: ``stem``, ``reductions``,
    ``normal_ops``/``reduce_ops`` (any space), ``k`` (PC-DARTS partial channels),
    ``drop_rate`` (P-DARTS skip dropout).
    """
    key = space.lower().replace("-", "").replace("_", "")
    if key not in SPACES:
        raise ValueError(f"unknown search space {space!r}; expected one of {', '.join(SPACES)}")
    return SPACES[key].supernet(
        C,
        num_classes,
        layers,
        in_channels=in_channels,
        steps=steps,
        multiplier=multiplier,
        stem_multiplier=stem_multiplier,
        **space_kwargs,
    )
