"""The DARTS supernet (Liu et al., 2019): mixed ops, search cells, and the stacked network.

The supernet is one ``nn.Module``. Its architecture parameters (the alphas) are
``nn.Parameter`` s of a child module named ``arch`` so that an optimization
problem can own them separately from the weights: ``arch_parameters()`` and
``weight_parameters()`` split ``parameters()`` in two. ``forward`` reads the
alphas from ``self.arch`` at call time and never detaches them or touches
``.data``, so ``torch.func.functional_call`` with replacement tensors works and
gradients (including second derivatives) reach both alphas and weights.

Speed notes: the ``none`` op is never evaluated (its output is zero, so it adds
nothing to the mixture and its alpha gradient comes through the softmax alone),
ReLUs are shared per state instead of repeated per op (see :mod:`.ops`),
and weighted sums use fused ``addcmul``. Activations stay NCHW, also on the CPU
(:func:`.ops.activation_layout` says why not channels-last).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .genotype import PRIMITIVES, Genotype, derive_cell
from .plugin import SearchSpace
from .ops import FactorizedReduce, ReLUConvBN, activation_layout, make_op

__all__ = [
    "ArchParams",
    "MixedOp",
    "SearchCell",
    "DartsSupernet",
    "num_edges",
    "default_reductions",
]


def num_edges(steps: int) -> int:
    """Edges in a cell with ``steps`` intermediate nodes (node i reads the 2 inputs and i earlier nodes)."""
    return sum(2 + i for i in range(steps))


def default_reductions(layers: int) -> list[int]:
    """Cells that halve the resolution: ``layers // 3`` and ``2 * layers // 3``, as in DARTS."""
    return sorted({layers // 3, 2 * layers // 3})


class ArchParams(nn.Module):
    """Container for architecture parameters, so their names start with ``arch.``."""

    def __init__(self, **tensors: torch.Tensor):
        super().__init__()
        for name, value in tensors.items():
            self.register_parameter(name, nn.Parameter(value))


class MixedOp(nn.Module):
    """One edge: the softmax-weighted sum of its candidate ops.

    ``forward(x, x_relu, weights)`` takes the edge input, its ReLU (shared by the
    cell) and one weight per candidate op. ``drop_rate`` applies dropout to the
    output of a stride-1 ``skip_connect`` in training (P-DARTS); it is 0 by default.
    """

    def __init__(self, C: int, stride: int, op_names: Sequence[str]):
        super().__init__()
        self.op_names = list(op_names)
        self.stride = stride
        self.drop_rate = 0.0
        self.ops = nn.ModuleList(make_op(name, C, stride, affine=False, search=True) for name in self.op_names)
        # (index, op, takes relu input, is a droppable identity) for every op that can be nonzero.
        self._plan = [
            (k, op, bool(getattr(op, "preactivated", False)), name == "skip_connect" and stride == 1)
            for k, (name, op) in enumerate(zip(self.op_names, self.ops))
            if name != "none"
        ]

    def forward(self, x: torch.Tensor, x_relu: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ws = weights.unbind(0)
        out = None
        for k, op, preact, droppable in self._plan:
            y = op(x_relu if preact else x)
            if droppable and self.drop_rate > 0.0 and self.training:
                y = F.dropout(y, p=self.drop_rate, training=True)
            out = y * ws[k] if out is None else torch.addcmul(out, y, ws[k])
        if out is None:  # every candidate is `none`
            out = self.ops[0](x) * ws[0]
        return out


class SearchCell(nn.Module):
    """A search cell: two preprocessed inputs, ``steps`` nodes, output = concat of the last ``multiplier`` nodes.

    ``edge_ops[e]`` lists the candidate ops of edge ``e`` (edges node by node);
    ``mixed_op`` builds one edge, ``mixed_op(C, stride, op_names)``.
    """

    def __init__(
        self,
        steps: int,
        multiplier: int,
        C_prev_prev: int,
        C_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
        edge_ops: Sequence[Sequence[str]],
        mixed_op=MixedOp,
    ):
        super().__init__()
        self.steps = steps
        self.multiplier = multiplier
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        edges = []
        e = 0
        for i in range(steps):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                edges.append(mixed_op(C, stride, edge_ops[e]))
                e += 1
        self.edges = nn.ModuleList(edges)

    def forward(
        self,
        s0: torch.Tensor,
        s1: torch.Tensor,
        weights: torch.Tensor,
        edge_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        relus = [F.relu(states[0]), F.relu(states[1])]
        ws = weights.unbind(0)
        ews = edge_weights.unbind(0) if edge_weights is not None else None
        e = 0
        for i in range(self.steps):
            acc = None
            for j in range(len(states)):
                y = self.edges[e](states[j], relus[j], ws[e])
                if ews is not None:
                    acc = y * ews[e] if acc is None else torch.addcmul(acc, y, ews[e])
                else:
                    acc = y if acc is None else acc + y
                e += 1
            states.append(acc)
            if i + 1 < self.steps:
                relus.append(F.relu(acc))
        return torch.cat(states[-self.multiplier :], dim=1)


def _cifar_stem(in_channels: int, C_stem: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, C_stem, 3, padding=1, bias=False), nn.BatchNorm2d(C_stem))


def _imagenet_stems(in_channels: int, C: int) -> tuple[nn.Module, nn.Module]:
    """Three stride-2 convs (PC-DARTS ImageNet search): 224 -> 28 before the first cell."""
    stem0 = nn.Sequential(
        nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(C // 2),
        nn.ReLU(),
        nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(C),
    )
    stem1 = nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
    return stem0, stem1


class DartsSupernet(nn.Module):
    """The DARTS search network.

    Args:
        C: channels of the first cells (doubled at each reduction cell).
        num_classes: classifier outputs.
        layers: number of cells.
        in_channels: image channels (1 for digits).
        steps: intermediate nodes per cell (4 -> 14 edges).
        multiplier: how many of the last nodes are concatenated into the cell output.
        stem_multiplier: the CIFAR stem outputs ``stem_multiplier * C`` channels.
        stem: ``"cifar"`` (one 3x3 conv, resolution kept) or ``"imagenet"`` (three stride-2 convs).
        reductions: indices of reduction cells (default ``layers // 3`` and ``2 * layers // 3``).
        normal_ops, reduce_ops: candidate ops per edge (default: all of ``PRIMITIVES`` on every edge).
            All edges of a cell type must have the same number of candidates.

    Architecture parameters: ``arch.normal`` and ``arch.reduce``, each of shape
    ``(num_edges(steps), num_ops)``, initialised to ``1e-3 * randn``.
    """

    space = "darts"

    def __init__(
        self,
        C: int,
        num_classes: int,
        layers: int,
        in_channels: int = 3,
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
        stem: str = "cifar",
        reductions: Sequence[int] | None = None,
        normal_ops: Sequence[Sequence[str]] | None = None,
        reduce_ops: Sequence[Sequence[str]] | None = None,
    ):
        super().__init__()
        if not 1 <= multiplier <= steps:
            raise ValueError(f"multiplier must be in 1..steps={steps}, got {multiplier}")
        if layers < 1 or C < 1:
            raise ValueError(f"need layers >= 1 and C >= 1, got layers={layers}, C={C}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.C = C
        self.num_classes = num_classes
        self.layers = layers
        self.steps = steps
        self.multiplier = multiplier
        self.stem_type = stem
        self.reductions = sorted(set(default_reductions(layers) if reductions is None else reductions))
        E = num_edges(steps)
        self.normal_ops = self._check_ops(normal_ops, E, "normal_ops")
        self.reduce_ops = self._check_ops(reduce_ops, E, "reduce_ops")

        if stem == "cifar":
            C_stem = stem_multiplier * C
            self.stem: nn.Module | None = _cifar_stem(in_channels, C_stem)
            self.stem0 = self.stem1 = None
            C_prev_prev, C_prev, C_curr = C_stem, C_stem, C
            reduction_prev = False
        else:
            self.stem = None
            self.stem0, self.stem1 = _imagenet_stems(in_channels, C)
            C_prev_prev, C_prev, C_curr = C, C, C
            reduction_prev = True

        cells = []
        for i in range(layers):
            reduction = i in self.reductions
            if reduction:
                C_curr *= 2
            ops = self.reduce_ops if reduction else self.normal_ops
            cell = SearchCell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, ops, self._mixed_op)
            cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.cells = nn.ModuleList(cells)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self.arch = ArchParams(**self._init_arch(E))

    # ------------------------------------------------------------------ construction hooks

    @staticmethod
    def _check_ops(ops: Sequence[Sequence[str]] | None, E: int, what: str) -> list[list[str]]:
        if ops is None:
            return [list(PRIMITIVES) for _ in range(E)]
        ops = [list(o) for o in ops]
        if len(ops) != E:
            raise ValueError(f"{what}: expected {E} edges, got {len(ops)}")
        sizes = {len(o) for o in ops}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"{what}: every edge needs the same nonzero number of ops, got sizes {sorted(sizes)}")
        for o in ops:
            for name in o:
                if name not in PRIMITIVES:
                    raise ValueError(f"{what}: unknown op {name!r}")
        return ops

    def _mixed_op(self, C: int, stride: int, op_names: Sequence[str]) -> nn.Module:
        return MixedOp(C, stride, op_names)

    def _init_arch(self, E: int) -> dict[str, torch.Tensor]:
        return {
            "normal": 1e-3 * torch.randn(E, len(self.normal_ops[0])),
            "reduce": 1e-3 * torch.randn(E, len(self.reduce_ops[0])),
        }

    # ------------------------------------------------------------------ forward

    def cell_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(normal op weights, reduce op weights, normal edge weights, reduce edge weights)`` from ``self.arch``."""
        return F.softmax(self.arch.normal, dim=-1), F.softmax(self.arch.reduce, dim=-1), None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_normal, w_reduce, e_normal, e_reduce = self.cell_weights()
        if self.stem is not None:
            s0 = s1 = activation_layout(self.stem(x))
        else:
            s0 = activation_layout(self.stem0(x))
            s1 = self.stem1(s0)
        for cell in self.cells:
            if cell.reduction:
                s0, s1 = s1, cell(s0, s1, w_reduce, e_reduce)
            else:
                s0, s1 = s1, cell(s0, s1, w_normal, e_normal)
        out = self.global_pooling(s1).flatten(1)
        return self.classifier(out)

    # ------------------------------------------------------------------ parameter groups

    def named_arch_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Architecture parameters with their full names (``arch.normal``, ...)."""
        for name, p in self.arch.named_parameters():
            yield f"arch.{name}", p

    def arch_parameters(self) -> list[nn.Parameter]:
        """Architecture parameters (alphas, and betas for PC-DARTS)."""
        return [p for _, p in self.named_arch_parameters()]

    def named_weight_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter not under ``arch.``: the supernet weights."""
        for name, p in self.named_parameters():
            if not name.startswith("arch."):
                yield name, p

    def weight_parameters(self) -> list[nn.Parameter]:
        """The supernet weights (everything except the architecture parameters)."""
        return [p for _, p in self.named_weight_parameters()]

    # ------------------------------------------------------------------ discretization

    def concat(self) -> list[int]:
        """Nodes concatenated into a cell's output."""
        return list(range(2 + self.steps - self.multiplier, 2 + self.steps))

    def genotype(self) -> Genotype:
        """Discretize the current alphas: per node the two strongest non-``none`` edges."""
        w_normal, w_reduce, e_normal, e_reduce = self.cell_weights()
        return Genotype(
            normal=derive_cell(w_normal, self.normal_ops, self.steps, e_normal),
            normal_concat=self.concat(),
            reduce=derive_cell(w_reduce, self.reduce_ops, self.steps, e_reduce),
            reduce_concat=self.concat(),
        )


#: DARTS for ``applications.lease.search``: one stage, the full supernet (see ``plugin.SearchSpace``).
SPACE = SearchSpace("darts", DartsSupernet)
