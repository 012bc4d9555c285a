"""VGG-16 with batch norm for CIFAR (32x32 input).

Thirteen 3x3 conv-BN-ReLU layers (64,64,M,128,128,M,256x3,M,512x3,M,512x3,M),
after five 2x2 max-pools the map is (N, 512, 1, 1); flatten and one linear
512 -> num_classes.  Input (N, 3, 32, 32), output (N, num_classes);
14,728,266 parameters for 10 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from ._init import kaiming_init

CFG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGGCifar(nn.Module):
    """(N, 3, 32, 32) -> (N, num_classes)."""

    def __init__(self, cfg=CFG16, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16_cifar(num_classes: int = 10) -> VGGCifar:
    """VGG-16-BN for CIFAR: (N, 3, 32, 32) -> (N, num_classes)."""
    return kaiming_init(VGGCifar(CFG16, num_classes), linear_std=0.01)
