"""Small architectures for tests (loaded by path: `tests/tiny_models.py:TinyNet`)."""

import torch
import torch.nn as nn


class TinyNet(nn.Module):
    """stem 3x3, a 3x3 conv, a 1x1 conv, a depthwise 3x3 conv, linear. Input (N, 3, 8, 8)."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.pw = nn.Conv2d(width, 2 * width, 1)
        self.dw = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, groups=2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.conv(x))
        x = torch.relu(self.dw(self.pw(x)))
        return self.fc(x.mean(dim=(2, 3)))


def tiny(seed: int = 0, **kw) -> TinyNet:
    """A seeded TinyNet whose kcompile_arch points back at this file."""
    import os

    torch.manual_seed(seed)
    m = TinyNet(**kw)
    m.kcompile_arch = {"spec": f"{os.path.abspath(__file__)}:TinyNet", "kwargs": kw}
    return m


class NoConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))
