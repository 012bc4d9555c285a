"""digits-resnet: a small ResNet for scikit-learn's 8x8 digits.

Input (N, 1, 8, 8), normalised as ``kcompile.data.load_dataset("digits")``
does; output (N, num_classes) logits.

Layout: stem conv 1->16 3x3 + BN + ReLU (8x8); stage 1: two basic blocks at
16 channels (8x8); stage 2: one block at 32 channels, stride 2 (4x4); stage 3:
one block at 64 channels, stride 2 (2x2); global average pool; linear 64->10.
Shortcuts that change shape are 1x1 conv + BN projections.  About 85 k
parameters, mostly 3x3 kernels, so kernel clustering has work to do.
"""

from __future__ import annotations

import torch
from torch import nn

from ._init import kaiming_init
from .resnet import BasicBlock


class DigitsResNet(nn.Module):
    """(N, 1, 8, 8) -> (N, num_classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, stride=2))
        self.layer3 = nn.Sequential(BasicBlock(32, 64, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def digits_resnet(num_classes: int = 10, in_channels: int = 1) -> DigitsResNet:
    """Build an untrained digits-resnet (see the module docstring)."""
    return kaiming_init(DigitsResNet(num_classes, in_channels))
