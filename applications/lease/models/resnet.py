"""CIFAR-style ResNets for the LeaSE audience model.

Unlike the ImageNet ResNets, the stem is a single 3x3 stride-1 conv with no
max-pool, so 32x32 (or 8x8) inputs keep enough resolution. Stages have
``64w, 128w, 256w, 512w`` channels (``w`` = ``width``) with strides 1/2/2/2.
At full width and 10 classes ResNet-18 has 11,173,962 parameters and ResNet-50
23,520,842; ``width=0.25`` (16 base channels) gives a ResNet-18 of about 0.7M
for CPU runs. Activations stay NCHW, also on the CPU (see
:func:`applications.lease.spaces.ops.activation_layout` for why not channels-last).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spaces.ops import activation_layout

__all__ = ["BasicBlock", "Bottleneck", "CifarResNet", "resnet18", "resnet50", "build_audience"]


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(c_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50/101)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet with a 3x3 stride-1 stem and no max-pool."""

    def __init__(self, block: type[nn.Module], num_blocks: list[int], num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        base = max(1, int(round(64 * width)))
        self.conv1 = nn.Conv2d(in_channels, base, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        stages = []
        c_in = base
        for i, n in enumerate(num_blocks):
            planes = base * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(c_in, planes, stride))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = activation_layout(F.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet18(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-18 (BasicBlock, [2, 2, 2, 2])."""
    return CifarResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width)


def resnet50(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-50 (Bottleneck, [3, 4, 6, 3])."""
    return CifarResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, width)


_AUDIENCES = {"resnet18": resnet18, "resnet50": resnet50}


def build_audience(name: str, num_classes: int, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """Audience model by name: ``"resnet18"`` or ``"resnet50"`` (``-``/``_``/case ignored)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _AUDIENCES:
        raise ValueError(f"unknown audience model {name!r}; expected one of {', '.join(_AUDIENCES)}")
    return _AUDIENCES[key](num_classes=num_classes, in_channels=in_channels, width=width)
