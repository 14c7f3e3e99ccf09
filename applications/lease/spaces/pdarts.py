"""P-DARTS (Chen et al., 2019): progressive search that deepens the supernet stage by stage.

A stage is a :class:`PDartsSupernet` whose edges each carry their own candidate
list. Between stages the supernet gets deeper (5 -> 11 -> 17 cells by default)
and each edge keeps only its strongest ops (8 -> 5 -> 3, and 1 at the end), read
off the alphas of the stage just finished. Dropout after ``skip_connect`` (rate
0.1 / 0.4 / 0.7 per stage, decaying within a stage) keeps parameter-free paths
from winning too early, and the final normal cell keeps at most two skip
connections.

Typical use::

    sched = PDartsSchedule()
    normal = reduce = None
    for stage in range(sched.num_stages):
        model = build_stage(sched, stage, C=16, num_classes=10, normal_ops=normal, reduce_ops=reduce)
        for epoch in range(sched.epochs):
            model.set_drop_rate(sched.drop_rate(stage, epoch))
            ...  # train weights; also alphas once epoch >= sched.warmup_epochs
        if stage + 1 < sched.num_stages:
            normal, reduce = next_stage_ops(model, sched.ops_kept[stage + 1])
    genotype = final_genotype(model, sched.max_skip)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .darts import DartsSupernet
from .genotype import Genotype, derive_cell
from .plugin import SearchSpace

__all__ = [
    "SPACE",
    "PDartsSupernet",
    "PDartsSchedule",
    "drop_rate_for_epoch",
    "next_stage_ops",
    "final_genotype",
    "build_stage",
]


class PDartsSupernet(DartsSupernet):
    """DARTS supernet with per-edge candidate lists and a settable dropout after skip connections.

    ``normal_ops`` / ``reduce_ops`` give each edge's candidates (default: all eight);
    ``drop_rate`` is the initial skip dropout. Other arguments are those of
    :class:`~.darts.DartsSupernet`.
    """

    space = "pdarts"

    def __init__(self, C: int, num_classes: int, layers: int, *args, drop_rate: float = 0.0, **kwargs):
        super().__init__(C, num_classes, layers, *args, **kwargs)
        self.drop_rate = 0.0
        self.set_drop_rate(drop_rate)

    def set_drop_rate(self, p: float) -> None:
        """Dropout probability applied after every stride-1 ``skip_connect`` during training."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop rate must be in [0, 1), got {p}")
        self.drop_rate = float(p)
        for cell in self.cells:
            for edge in cell.edges:
                edge.drop_rate = self.drop_rate


def drop_rate_for_epoch(base: float, epoch: int, epochs: int, warmup_epochs: int, decay: float = 0.2) -> float:
    """Skip dropout at ``epoch`` of a stage, as in the P-DARTS code.

    During the weights-only warm-up it falls linearly, ``base * (epochs - epoch - 1) / epochs``;
    afterwards it decays exponentially, ``base * exp(-(epoch - warmup_epochs) * decay)``.
    """
    if epoch < warmup_epochs:
        return base * (epochs - epoch - 1) / epochs
    return base * math.exp(-(epoch - warmup_epochs) * decay)


@dataclass
class PDartsSchedule:
    """The P-DARTS stage plan (paper defaults for CIFAR).

    ``cells[s]``: supernet depth in stage ``s``; ``ops_kept[s]``: candidates per edge
    in stage ``s``, with ``ops_kept[-1]`` the number kept after the last stage;
    ``dropout[s]``: base skip dropout of stage ``s``; ``epochs`` per stage, the first
    ``warmup_epochs`` of which train weights only; ``max_skip``: skip connections
    allowed in the final normal cell.
    """

    cells: list[int] = field(default_factory=lambda: [5, 11, 17])
    ops_kept: list[int] = field(default_factory=lambda: [8, 5, 3, 1])
    dropout: list[float] = field(default_factory=lambda: [0.1, 0.4, 0.7])
    epochs: int = 25
    warmup_epochs: int = 10
    max_skip: int = 2
    decay: float = 0.2

    @property
    def num_stages(self) -> int:
        return len(self.cells)

    def validate(self) -> None:
        """Raise ``ValueError`` on inconsistent lists or out-of-range values."""
        from applications.common.config import ConfigError

        if not self.cells or any(c < 1 for c in self.cells):
            raise ConfigError(f"pdarts.cells must be positive, got {self.cells}")
        if len(self.ops_kept) != len(self.cells) + 1:
            raise ConfigError(f"pdarts.ops_kept needs one entry per stage plus the final count, got {self.ops_kept}")
        if any(b > a for a, b in zip(self.ops_kept, self.ops_kept[1:])) or self.ops_kept[-1] < 1:
            raise ConfigError(f"pdarts.ops_kept must shrink and end at >= 1, got {self.ops_kept}")
        if len(self.dropout) != len(self.cells) or any(not 0.0 <= p < 1.0 for p in self.dropout):
            raise ConfigError(f"pdarts.dropout needs one rate in [0, 1) per stage, got {self.dropout}")
        if self.epochs < 1 or not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f"pdarts.epochs, pdarts.warmup_epochs: need epochs >= 1 and 0 <= warmup_epochs <= epochs, got {self.epochs}, {self.warmup_epochs}")
        if self.max_skip < 0:
            raise ConfigError(f"pdarts.max_skip must be >= 0, got {self.max_skip}")

    def drop_rate(self, stage: int, epoch: int) -> float:
        """Skip dropout for ``epoch`` (0-based, within the stage) of ``stage``."""
        return drop_rate_for_epoch(self.dropout[stage], epoch, self.epochs, self.warmup_epochs, self.decay)


def build_stage(
    schedule: PDartsSchedule,
    stage: int,
    C: int,
    num_classes: int,
    normal_ops: Sequence[Sequence[str]] | None = None,
    reduce_ops: Sequence[Sequence[str]] | None = None,
    **kwargs,
) -> PDartsSupernet:
    """The supernet of ``stage``: ``schedule.cells[stage]`` cells with the given per-edge candidates."""
    model = PDartsSupernet(
        C, num_classes, schedule.cells[stage], normal_ops=normal_ops, reduce_ops=reduce_ops, **kwargs
    )
    expected = schedule.ops_kept[stage]
    if len(model.normal_ops[0]) != expected:
        raise ValueError(f"stage {stage} expects {expected} ops per edge, got {len(model.normal_ops[0])}")
    model.set_drop_rate(schedule.drop_rate(stage, 0))
    return model


def _keep_strongest(probs: torch.Tensor, edge_ops: list[list[str]], keep: int, exclude_none: bool) -> list[list[str]]:
    kept = []
    for e, ops in enumerate(edge_ops):
        order = sorted(range(len(ops)), key=lambda k: -float(probs[e, k]))
        if exclude_none:
            order = [k for k in order if ops[k] != "none"]
        chosen = sorted(order[:keep])  # keep the original (PRIMITIVES) order
        kept.append([ops[k] for k in chosen])
    return kept


def next_stage_ops(model: PDartsSupernet, keep: int, exclude_none: bool | None = None) -> tuple[list[list[str]], list[list[str]]]:
    """Per-edge candidates for the next stage: each edge's ``keep`` strongest ops by current alpha.

    ``exclude_none`` (default: ``keep == 1``) drops ``none`` before ranking, as
    P-DARTS does at its last cut so every edge ends with a real op.
    Returns ``(normal_ops, reduce_ops)``.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if exclude_none is None:
        exclude_none = keep == 1
    with torch.no_grad():
        w_normal, w_reduce, _, _ = model.cell_weights()
    return (
        _keep_strongest(w_normal, model.normal_ops, keep, exclude_none),
        _keep_strongest(w_reduce, model.reduce_ops, keep, exclude_none),
    )


def final_genotype(model: PDartsSupernet, max_skip: int = 2) -> Genotype:
    """The P-DARTS result: each edge's best non-``none`` op, two edges per node, at most ``max_skip`` skips.

    Edges are chosen by their best non-``none`` weight. While the normal cell has
    more than ``max_skip`` skip connections, the weakest chosen skip is replaced by
    that edge's next best op (the edge choice is kept, as in the P-DARTS code).
    """
    with torch.no_grad():
        w_normal, w_reduce, _, _ = model.cell_weights()
    steps = model.steps
    reduce = derive_cell(w_reduce, model.reduce_ops, steps)
    probs = w_normal.detach().float().cpu().clone()
    ops = model.normal_ops
    normal = derive_cell(probs, ops, steps)
    edge_index = {}  # (node, input) -> edge number
    start = 0
    for node in range(steps):
        for j in range(node + 2):
            edge_index[(node, j)] = start + j
        start += node + 2
    banned = probs.clone()
    while sum(op == "skip_connect" for op, _ in normal) > max_skip:
        # the weakest skip among the chosen edges
        candidates = []
        for pos, (op, j) in enumerate(normal):
            if op == "skip_connect":
                e = edge_index[(pos // 2, j)]
                candidates.append((float(banned[e, ops[e].index("skip_connect")]), pos, e))
        _, pos, e = min(candidates)
        banned[e, ops[e].index("skip_connect")] = float("-inf")
        best_op, best_w = None, float("-inf")
        for k, name in enumerate(ops[e]):
            if name != "none" and float(banned[e, k]) > best_w:
                best_op, best_w = name, float(banned[e, k])
        if best_op is None or best_w == float("-inf"):
            raise ValueError(
                f"cannot enforce max_skip={max_skip}: edge {e} has no candidate besides skip_connect; "
                "keep more ops per edge in the last stage"
            )
        normal[pos] = (best_op, normal[pos][1])
    return Genotype(normal=normal, normal_concat=model.concat(), reduce=reduce, reduce_concat=model.concat())


# --------------------------------------------------------------------------- the search's plug-in


def _plan(cfg) -> list[tuple[int, int]]:
    return [(cfg.pdarts.epochs, cfg.pdarts.warmup_epochs)] * cfg.pdarts.num_stages


def _build(cfg, stage: int, carry: dict, C: int, num_classes: int, **common) -> PDartsSupernet:
    return build_stage(cfg.pdarts, stage, C, num_classes, normal_ops=carry.get("normal_ops"),
                       reduce_ops=carry.get("reduce_ops"), **common)


def _step_hook(cfg, model: PDartsSupernet, stage: int, epoch: int) -> None:
    model.set_drop_rate(cfg.pdarts.drop_rate(stage, epoch))


def _next_stage(cfg, model: PDartsSupernet, stage: int) -> dict:
    normal, reduce = next_stage_ops(model, cfg.pdarts.ops_kept[stage + 1])
    return {"normal_ops": normal, "reduce_ops": reduce}


#: P-DARTS for ``applications.lease.search``: ``cfg.pdarts`` stages, deepening, skip dropout.
SPACE = SearchSpace("pdarts", PDartsSupernet, plan=_plan, build_stage=_build, step_hook=_step_hook,
                    next_stage=_next_stage, final=lambda cfg, model: final_genotype(model, cfg.pdarts.max_skip))
