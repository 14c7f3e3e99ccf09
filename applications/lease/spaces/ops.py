"""The candidate operations of the DARTS search space and the layers they are built from.

Every conv-type op starts with a ReLU. Built with ``preactivated=True`` it leaves
that ReLU out and expects an already rectified input: a search cell computes
``relu(state)`` once per state and hands it to all conv ops on all edges that read
that state, instead of every op repeating it (56 ReLUs per DARTS cell become 6,
and their saved activations with them). Ops built that way carry
``preactivated = True``; all others carry ``False`` and take the raw state.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "OPS",
    "activation_layout",
    "make_op",
    "Zero",
    "Identity",
    "ReLUConvBN",
    "SepConv",
    "DilConv",
    "FactorizedReduce",
]


def activation_layout(x: torch.Tensor) -> torch.Tensor:
    """The memory layout every network here gives its activations (after the stem): plain NCHW.

    Not channels-last on the CPU, for two measured reasons: oneDNN's AVX2 stride-2 1x1
    backward-data kernel writes out of bounds on channels-last inputs with fewer than 8
    channels (``FactorizedReduce`` at C=2, a ResNet shortcut at width 1/16), and at the
    size a CPU runs (the digits preset) its gain is within noise (docs/nas.md); only the
    CIFAR-size step, a GPU job, lost (1.6x CPU time on AVX2).
    One function, so a layout change is made (and tested, tests/lease/test_native_safety.py) in one place.
    """
    return x


class Zero(nn.Module):
    """The ``none`` op: an all-zero output of the right shape (strided when reducing)."""

    preactivated = False

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class Identity(nn.Identity):
    """``skip_connect`` at stride 1 (a named class so cells can recognise it)."""

    preactivated = False


class ReLUConvBN(nn.Sequential):
    """ReLU, k x k conv, BatchNorm: the 1x1 preprocessing of cell inputs."""

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, affine: bool = True, relu: bool = True):
        layers: list[nn.Module] = [nn.ReLU()] if relu else []
        layers += [
            nn.Conv2d(C_in, C_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        ]
        super().__init__(*layers)
        self.preactivated = not relu


class DilConv(nn.Sequential):
    """ReLU, dilated depthwise k x k conv, pointwise conv, BatchNorm."""

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, dilation: int, affine: bool = True, relu: bool = True):
        layers: list[nn.Module] = [nn.ReLU()] if relu else []
        layers += [
            nn.Conv2d(C_in, C_in, kernel, stride=stride, padding=padding, dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        ]
        super().__init__(*layers)
        self.preactivated = not relu


class SepConv(nn.Sequential):
    """Two stacked (ReLU, depthwise k x k, pointwise, BatchNorm) blocks; only the first is strided."""

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, affine: bool = True, relu: bool = True):
        layers: list[nn.Module] = [nn.ReLU()] if relu else []
        layers += [
            nn.Conv2d(C_in, C_in, kernel, stride=stride, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, 1, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(),
            nn.Conv2d(C_in, C_in, kernel, stride=1, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        ]
        super().__init__(*layers)
        self.preactivated = not relu


class FactorizedReduce(nn.Module):
    """Halve the resolution without losing pixels: two 1x1 stride-2 convs on grids offset by one.

    Used for ``skip_connect`` at stride 2 and to preprocess a cell input that is
    one resolution ahead. The offset grid is taken by shifting the input one pixel
    up-left and zero-padding the far border, which equals the usual ``x[:, :, 1:, 1:]``
    on even sizes and also keeps both halves the same size on odd ones.
    """

    def __init__(self, C_in: int, C_out: int, affine: bool = True, relu: bool = True):
        super().__init__()
        self.relu = relu
        self.preactivated = not relu
        half = C_out // 2
        self.conv_1 = nn.Conv2d(C_in, half, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out - half, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu:
            x = F.relu(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


class _Pool(nn.Sequential):
    """A pooling op, optionally followed by a parameter-free BatchNorm (as in search cells)."""

    preactivated = False


def _pool(kind: str, C: int, stride: int, affine: bool, bn: bool) -> nn.Module:
    if kind == "max":
        pool: nn.Module = nn.MaxPool2d(3, stride=stride, padding=1)
    else:
        pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    return _Pool(pool, nn.BatchNorm2d(C, affine=False)) if bn else _Pool(pool)


def _skip(C: int, stride: int, affine: bool, relu: bool) -> nn.Module:
    return Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine, relu=relu)


#: ``OPS[name](C, stride, affine, relu=True) -> nn.Module``; ``relu=False`` builds the preactivated variant.
OPS: dict[str, Callable[..., nn.Module]] = {
    "none": lambda C, stride, affine, relu=True: Zero(stride),
    "max_pool_3x3": lambda C, stride, affine, relu=True: _pool("max", C, stride, affine, bn=False),
    "avg_pool_3x3": lambda C, stride, affine, relu=True: _pool("avg", C, stride, affine, bn=False),
    "skip_connect": lambda C, stride, affine, relu=True: _skip(C, stride, affine, relu),
    "sep_conv_3x3": lambda C, stride, affine, relu=True: SepConv(C, C, 3, stride, 1, affine, relu),
    "sep_conv_5x5": lambda C, stride, affine, relu=True: SepConv(C, C, 5, stride, 2, affine, relu),
    "dil_conv_3x3": lambda C, stride, affine, relu=True: DilConv(C, C, 3, stride, 2, 2, affine, relu),
    "dil_conv_5x5": lambda C, stride, affine, relu=True: DilConv(C, C, 5, stride, 4, 2, affine, relu),
}


def make_op(name: str, C: int, stride: int, affine: bool, search: bool = False) -> nn.Module:
    """Build op ``name`` on ``C`` channels.

    ``search=True`` builds the search-cell variant: conv-type ops are preactivated
    (their leading ReLU is left to the cell) and pools get a parameter-free
    BatchNorm after them, as in the DARTS search code.
    """
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; expected one of {', '.join(OPS)}")
    if search and name in ("max_pool_3x3", "avg_pool_3x3"):
        return _pool(name[:3], C, stride, affine, bn=True)
    return OPS[name](C, stride, affine, relu=not search)
