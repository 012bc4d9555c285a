"""What every clustering method shares: finding layers, checking weights, the plan it returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import KcompileError, UsageError
from ..ir import ClusteredWeight, narrowest_uint


class ClusterWarning(UserWarning):
    """A layer kept dense by a clustering method (the CLI prints it as one line)."""


@dataclass
class ClusterPlan:
    """A method's output: the IR per layer name, shared codebooks, and a per-layer report.

    ``layers[name] = ClusteredWeight``; layers whose IR names a ``codebook_key`` share the
    tensor ``codebooks[key]`` (one nn.Parameter in the clustered model).
    """

    layers: dict[str, ClusteredWeight] = field(default_factory=dict)
    codebooks: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict[str, dict] = field(default_factory=dict)


def find_layers(model: nn.Module, kinds: tuple[type, ...], skip=(), where=None) -> list[tuple[str, nn.Module]]:
    """(name, module) of layers of the given types, in module order, minus ``skip``.

    ``where(module) -> bool`` filters further. Raises UsageError if a ``skip`` name does not
    exist, KcompileError if a selected weight holds NaN or Inf.
    """
    names = {n for n, _ in model.named_modules()}
    unknown = [s for s in skip if s not in names]
    if unknown:
        raise UsageError(f"--skip names no layer of this model: {', '.join(unknown)}")
    out = []
    for name, mod in model.named_modules():
        if type(mod) in kinds and name not in skip and (where is None or where(mod)):
            check_finite(name, mod.weight)
            out.append((name, mod))
    return out


def check_finite(name: str, weight: torch.Tensor) -> None:
    """KcompileError naming ``name`` when ``weight`` holds NaN or Inf."""
    w = weight.detach()
    if not bool(torch.isfinite(w).all()):
        bad = "NaN" if bool(torch.isnan(w).any()) else "Inf"
        raise KcompileError(f"layer {name}: weight contains {bad} values; cannot cluster it")


def require_layers(layers: list, method: str, what: str) -> None:
    """KcompileError when a method finds nothing to cluster."""
    if not layers:
        raise KcompileError(f"model has no layer that method {method!r} can cluster ({what})")


def require_k(k: int, n: int, what: str) -> None:
    """UsageError when K is not in [1, number of units]."""
    if k < 1:
        raise UsageError(f"K must be at least 1 (got {k}) for {what}")
    if k > n:
        raise UsageError(f"K={k} is larger than the number of units ({n}) in {what}")


def as_index(labels: torch.Tensor, k: int, shape) -> torch.Tensor:
    """Labels in [0, k) reshaped to ``shape`` in the narrowest unsigned dtype."""
    return labels.reshape(shape).to(narrowest_uint(max(k - 1, 0)))


def conv_weight(mod: nn.Module) -> torch.Tensor:
    """The layer's dense weight, detached float32."""
    return mod.weight.detach().float()
