"""Invalid filters (filter grafting, Meng et al. 2020): filters whose L1 norm is below a threshold.

A conv weight W (O, C/groups, kh, kw) has O filters W[o]; filter o is *invalid* when
||W[o]||_1 = sum |W[o, c, i, j]| < threshold (the paper uses 0.1 and 0.01). Clustered convs
are judged on their decoded weight.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import UsageError


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every dense or clustered conv, in module order."""
    from .layers import ClusteredConv2d

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, ClusteredConv2d))]


def filter_l1(weight: torch.Tensor) -> torch.Tensor:
    """L1 norm of each filter: (O, ...) -> (O,)."""
    return weight.detach().abs().reshape(weight.shape[0], -1).sum(dim=1)


def invalid_filters(model: nn.Module, threshold: float = 0.1) -> dict:
    """Count the invalid filters of every conv of ``model``.

    Returns ``{"threshold", "layers": {name: {"filters", "invalid", "min_l1"}}, "filters",
    "invalid"}`` (totals over all convs).
    """
    if not threshold > 0:
        raise UsageError(f"--invalid-threshold must be > 0 (got {threshold})")
    layers = {}
    with torch.no_grad():
        for name, mod in conv_layers(model):
            l1 = filter_l1(mod.weight)
            layers[name] = {"filters": int(l1.numel()), "invalid": int((l1 < threshold).sum()),
                            "min_l1": float(l1.min()) if l1.numel() else 0.0}
    return {"threshold": float(threshold), "layers": layers,
            "filters": sum(v["filters"] for v in layers.values()),
            "invalid": sum(v["invalid"] for v in layers.values())}
