"""CIFAR ResNets (He et al. 2016, section 4.2) with option-A shortcuts.

Input (N, 3, 32, 32), output (N, num_classes).  Depth 6n+2: three stages of n
basic blocks with 16, 32, 64 channels; stride 2 at stages 2 and 3.  Option A:
the shortcut subsamples by 2 and zero-pads the new channels (no parameters),
so ResNet-56 has 853,018 parameters for 10 classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._init import kaiming_init, residual_stage


class PadShortcut(nn.Module):
    """Option-A shortcut: (N, C, H, W) -> (N, C + 2*pad, H/2, W/2), zero channels."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CifarBlock(nn.Module):
    """Basic block: (N, inplanes, H, W) -> (N, planes, H/stride, W/stride)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inplanes != planes:
            self.shortcut = PadShortcut((planes - inplanes) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: conv 3->16, stages 16/32/64, GAP, fc."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        inplanes = 16
        for i, planes in enumerate((16, 32, 64)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", residual_stage(CifarBlock, inplanes, planes, n, stride))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (CIFAR, option A): (N, 3, 32, 32) -> (N, num_classes)."""
    return kaiming_init(CifarResNet(56, num_classes))
