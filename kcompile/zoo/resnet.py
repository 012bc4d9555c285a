"""ImageNet-layout ResNet-18, state_dict-compatible with torchvision.

Input (N, 3, H, W) (224x224 by default; any H, W >= 32 works thanks to the
adaptive pool), output (N, num_classes).  11,689,512 parameters for 1000
classes, exactly like ``torchvision.models.resnet18``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._init import kaiming_init, residual_stage


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus identity / 1x1-projection shortcut.

    (N, inplanes, H, W) -> (N, planes, H/stride, W/stride).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-layout ResNet with basic blocks (conv1/bn1/layer1..4/fc keys)."""

    def __init__(self, layers: tuple[int, int, int, int], num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", residual_stage(BasicBlock, inplanes, planes, blocks, stride))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 (ImageNet layout): (N, 3, 224, 224) -> (N, num_classes)."""
    return kaiming_init(ResNet((2, 2, 2, 2), num_classes))
