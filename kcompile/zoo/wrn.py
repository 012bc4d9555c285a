"""Wide ResNet (Zagoruyko & Komodakis 2016) for CIFAR, pre-activation blocks.

WRN-d-k: conv 3->16, three groups of (d-4)/6 blocks with 16k, 32k, 64k
channels (stride 1, 2, 2), BN-ReLU, global average pool, linear.  Blocks are
BN-ReLU-conv3x3-BN-ReLU-conv3x3 with a 1x1 conv shortcut where the shape
changes.  Input (N, 3, 32, 32), output (N, num_classes); WRN-16-4 has
2,748,890 parameters for 10 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from ._init import kaiming_init


class WideBlock(nn.Module):
    """Pre-activation block: (N, cin, H, W) -> (N, cout, H/stride, W/stride)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        y = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        # As in the reference code, the projection shortcut sees the activated input.
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WRN-depth-widen for 32x32 inputs: (N, 3, 32, 32) -> (N, num_classes)."""

    def __init__(self, depth: int = 16, widen: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Wide ResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        cin = 16
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = [WideBlock(cin, w, stride)] + [WideBlock(w, w, 1) for _ in range(n - 1)]
            setattr(self, f"block{i + 1}", nn.Sequential(*blocks))
            cin = w
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.avgpool(self.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


def wrn16_4(num_classes: int = 10) -> WideResNet:
    """WRN-16-4: (N, 3, 32, 32) -> (N, num_classes)."""
    return kaiming_init(WideResNet(16, 4, num_classes))
