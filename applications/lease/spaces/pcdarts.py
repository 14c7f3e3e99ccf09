"""PC-DARTS (Xu et al., 2020): partial channel connections and edge normalization.

Each edge runs its candidate ops on only ``C / K`` of its input channels; the
other channels bypass the ops (max-pooled when the edge reduces) and a channel
shuffle mixes the two parts so that a different slice is searched at the next
edge. Edge-normalization weights beta (one per edge, softmax over each node's
incoming edges) scale every edge's output and also multiply the op weights when
the genotype is derived, which makes edge selection less noisy.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .darts import DartsSupernet, MixedOp
from .plugin import SearchSpace

__all__ = ["SPACE", "PartialMixedOp", "PCDartsSupernet", "channel_shuffle", "edge_normalization"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave ``groups`` equal channel groups (ShuffleNet): ``[a0 a1 | b0 b1] -> [a0 b0 a1 b1]``."""
    n, c, h, w = x.shape
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        # shuffle in NHWC order so the result stays channels-last
        y = x.permute(0, 2, 3, 1).reshape(n, h, w, groups, c // groups).transpose(3, 4).reshape(n, h, w, c)
        return y.permute(0, 3, 1, 2)
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def edge_normalization(beta: torch.Tensor, steps: int) -> torch.Tensor:
    """Softmax of ``beta`` within each node's incoming edges (sizes 2, 3, ..., steps + 1)."""
    sizes = [2 + i for i in range(steps)]
    return torch.cat([F.softmax(part, dim=-1) for part in torch.split(beta, sizes)])


class PartialMixedOp(nn.Module):
    """A mixed op over the first ``C // k`` channels; the rest bypass it, then the channels are shuffled."""

    def __init__(self, C: int, stride: int, op_names: Sequence[str], k: int = 4):
        super().__init__()
        if C % k:
            raise ValueError(f"PC-DARTS needs C divisible by K: C={C}, K={k}")
        self.k = k
        self.part = C // k
        self.inner = MixedOp(self.part, stride, op_names)
        # ceil_mode keeps the bypass the same size as the strided ops on odd resolutions.
        self.bypass_pool = nn.MaxPool2d(2, 2, ceil_mode=True) if stride == 2 else None

    @property
    def drop_rate(self) -> float:
        return self.inner.drop_rate

    @drop_rate.setter
    def drop_rate(self, p: float) -> None:
        self.inner.drop_rate = p

    def forward(self, x: torch.Tensor, x_relu: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        searched = self.inner(x[:, : self.part], x_relu[:, : self.part], weights)
        rest = x[:, self.part :]
        if self.bypass_pool is not None:
            rest = self.bypass_pool(rest)
        return channel_shuffle(torch.cat([searched, rest], dim=1), self.k)


class PCDartsSupernet(DartsSupernet):
    """DARTS supernet with partial channels (``k``, default 4) and edge normalization.

    Architecture parameters: ``arch.normal``, ``arch.reduce`` (op alphas) and
    ``arch.normal_beta``, ``arch.reduce_beta`` (one beta per edge, ``1e-3 * randn``).
    Other arguments are those of :class:`~.darts.DartsSupernet`.
    """

    space = "pcdarts"

    def __init__(self, C: int, num_classes: int, layers: int, *args, k: int = 4, **kwargs):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k  # read by _mixed_op while the parent constructor builds the cells
        super().__init__(C, num_classes, layers, *args, **kwargs)

    def _mixed_op(self, C: int, stride: int, op_names: Sequence[str]) -> nn.Module:
        return PartialMixedOp(C, stride, op_names, k=self.k)

    def _init_arch(self, E: int) -> dict[str, torch.Tensor]:
        arch = super()._init_arch(E)
        arch["normal_beta"] = 1e-3 * torch.randn(E)
        arch["reduce_beta"] = 1e-3 * torch.randn(E)
        return arch

    def cell_weights(self):
        w_normal = F.softmax(self.arch.normal, dim=-1)
        w_reduce = F.softmax(self.arch.reduce, dim=-1)
        e_normal = edge_normalization(self.arch.normal_beta, self.steps)
        e_reduce = edge_normalization(self.arch.reduce_beta, self.steps)
        return w_normal, w_reduce, e_normal, e_reduce


#: PC-DARTS for ``applications.lease.search``: one stage, ``space.pc_k`` partial channels.
SPACE = SearchSpace("pcdarts", PCDartsSupernet, options=lambda cfg: {"k": cfg.space.pc_k})
