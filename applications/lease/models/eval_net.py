"""Evaluation networks: a searched genotype stacked into a network trained from scratch.

These follow the DARTS evaluation setup: ops with affine BatchNorm, a reduction
cell at 1/3 and 2/3 of the depth, an optional auxiliary classifier after the
second reduction (its loss is weighted by 0.4 in training), and drop path whose
probability is set from outside through the ``drop_path_prob`` attribute (the
trainer ramps it up linearly). ``forward`` returns ``(logits, logits_aux)``;
``logits_aux`` is ``None`` unless training with the auxiliary head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spaces.genotype import Genotype
from ..spaces.ops import OPS, FactorizedReduce, Identity, ReLUConvBN, activation_layout

__all__ = ["EvalCell", "NetworkCIFAR", "NetworkImageNet", "AuxiliaryHead", "build_eval_net", "drop_path", "count_parameters"]


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole examples of a branch with probability ``drop_prob``, rescaling the survivors."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x * (mask / keep)


class EvalCell(nn.Module):
    """A discrete cell: each node sums two ops applied to two earlier states."""

    def __init__(self, genotype: Genotype, C_prev_prev: int, C_prev: int, C: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        pairs = genotype.reduce if reduction else genotype.normal
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self.steps = len(pairs) // 2
        self.concat = list(concat)
        self.multiplier = len(self.concat)
        self.indices = [idx for _, idx in pairs]
        self.ops = nn.ModuleList(OPS[name](C, 2 if reduction and idx < 2 else 1, True) for name, idx in pairs)
        self._is_identity = [isinstance(op, Identity) for op in self.ops]

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        use_drop = self.training and drop_prob > 0.0
        for i in range(self.steps):
            total = None
            for k in (2 * i, 2 * i + 1):
                h = self.ops[k](states[self.indices[k]])
                if use_drop and not self._is_identity[k]:
                    h = drop_path(h, drop_prob)
                total = h if total is None else total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """Auxiliary classifier on the features after the second reduction.

    Pools 8x8 (CIFAR, stride 3) or 7x7 (ImageNet, stride 2) maps to 2x2 as in
    DARTS; smaller maps (e.g. 2x2 for 8x8 digits) are average-pooled to 2x2
    instead, so the head works at any input size with the same parameters.
    """

    def __init__(self, C: int, num_classes: int, imagenet: bool = False):
        super().__init__()
        self.pool_stride = 2 if imagenet else 3
        self.features = nn.Sequential(
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        if min(x.shape[-2:]) >= 5:
            x = F.avg_pool2d(x, 5, stride=self.pool_stride, padding=0, count_include_pad=False)
        if x.shape[-2:] != (2, 2):
            x = F.adaptive_avg_pool2d(x, 2)
        x = self.features(x)
        return self.classifier(x.flatten(1))


class _EvalNetwork(nn.Module):
    """Cells, auxiliary head, pooling and classifier shared by the CIFAR and ImageNet variants."""

    def _build_cells(self, genotype: Genotype, C: int, num_classes: int, layers: int, auxiliary: bool,
                     C_prev_prev: int, C_prev: int, reduction_prev: bool, imagenet: bool) -> None:
        self.layers = layers
        self.drop_path_prob = 0.0
        self.reductions = sorted({layers // 3, 2 * layers // 3})
        self.aux_position = 2 * layers // 3
        C_curr = C
        cells = []
        C_aux = C_prev
        for i in range(layers):
            reduction = i in self.reductions
            if reduction:
                C_curr *= 2
            cell = EvalCell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == self.aux_position:
                C_aux = C_prev
        self.cells = nn.ModuleList(cells)
        self.auxiliary_head = AuxiliaryHead(C_aux, num_classes, imagenet) if auxiliary else None
        self.classifier = nn.Linear(C_prev, num_classes)

    def _run_cells(self, s0: torch.Tensor, s1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits_aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_position and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        out = F.adaptive_avg_pool2d(s1, 1).flatten(1)
        return self.classifier(out), logits_aux


class NetworkCIFAR(_EvalNetwork):
    """Evaluation network for small images: 3x3 stem to ``3C`` channels, resolution kept."""

    def __init__(self, genotype: Genotype, C: int, num_classes: int, layers: int, auxiliary: bool = True,
                 in_channels: int = 3, stem_multiplier: int = 3):
        super().__init__()
        C_stem = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_stem, 3, padding=1, bias=False), nn.BatchNorm2d(C_stem))
        self._build_cells(genotype, C, num_classes, layers, auxiliary, C_stem, C_stem, False, imagenet=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = activation_layout(self.stem(x))
        return self._run_cells(s, s)


class NetworkImageNet(_EvalNetwork):
    """Evaluation network for 224x224 images: three stride-2 stem convs (224 -> 28) before the cells."""

    def __init__(self, genotype: Genotype, C: int, num_classes: int, layers: int, auxiliary: bool = True,
                 in_channels: int = 3):
        super().__init__()
        self.stem0 = nn.Sequential(
            nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        self.stem1 = nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
        self._build_cells(genotype, C, num_classes, layers, auxiliary, C, C, True, imagenet=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s0 = activation_layout(self.stem0(x))
        s1 = self.stem1(s0)
        return self._run_cells(s0, s1)


def build_eval_net(genotype: Genotype, C: int, num_classes: int, layers: int, auxiliary: bool,
                   in_channels: int = 3, imagenet: bool = False) -> _EvalNetwork:
    """The evaluation network for ``genotype`` (CIFAR-style unless ``imagenet``)."""
    if imagenet:
        return NetworkImageNet(genotype, C, num_classes, layers, auxiliary, in_channels)
    return NetworkCIFAR(genotype, C, num_classes, layers, auxiliary, in_channels)


def count_parameters(model: nn.Module, include_auxiliary: bool = False) -> int:
    """Number of parameters; the auxiliary head is left out by default, as papers report."""
    return sum(p.numel() for name, p in model.named_parameters() if include_auxiliary or not name.startswith("auxiliary_head."))
