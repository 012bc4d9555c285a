"""Deterministic weight initialisation shared by the zoo architectures."""

from __future__ import annotations

from torch import nn


def kaiming_init(model: nn.Module, linear_std: float | None = None) -> nn.Module:
    """Initialise ``model`` in place the way torchvision does for ResNets.

    Conv2d: Kaiming-normal (fan_out, ReLU), zero bias.  BatchNorm2d: weight 1,
    bias 0.  Linear: PyTorch default, or N(0, linear_std) with zero bias when
    ``linear_std`` is given.  Uses the global RNG: callers seed it inside
    ``torch.random.fork_rng``.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def residual_stage(block, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` residual blocks: the first maps inplanes -> planes at ``stride``, the rest keep planes."""
    return nn.Sequential(block(inplanes, planes, stride), *(block(planes, planes) for _ in range(blocks - 1)))
