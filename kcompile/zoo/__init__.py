"""kcompile's model zoo: architectures written in plain torch.nn.

Every model is built from ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d`` /
``nn.ReLU`` (ReLU6 for MobileNetV2) modules, takes a ``num_classes`` keyword
and maps an (N, C, H, W) float tensor to (N, num_classes) logits; its default
input shape is ``input_shape(name)``.

``build(name)`` returns a fresh module (in training mode, like torchvision).
Weights are random but deterministic: each build seeds its own forked RNG
with ``SEED`` and leaves the global RNG untouched.  ``digits-resnet`` ships
trained weights (``weights/digits_resnet.pt``, produced by
``benchmarks/train_digits_resnet.py``) which ``pretrained=True`` loads.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import KcompileError, UsageError
from .alexnet import alexnet
from .digits import digits_resnet
from .googlenet import googlenet
from .mobilenet import mobilenetv2
from .resnet import resnet18
from .resnet_cifar import resnet56
from .vgg import vgg16_cifar
from .wrn import wrn16_4

SEED = 0
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "digits-resnet": digits_resnet,
    "resnet18": resnet18,
    "resnet56": resnet56,
    "vgg16-cifar": vgg16_cifar,
    "wrn16-4": wrn16_4,
    "mobilenetv2": mobilenetv2,
    "alexnet": alexnet,
    "googlenet": googlenet,
}

#: Default (N, C, H, W) input of each model.
INPUT_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "digits-resnet": (1, 1, 8, 8),
    "resnet18": (1, 3, 224, 224),
    "resnet56": (1, 3, 32, 32),
    "vgg16-cifar": (1, 3, 32, 32),
    "wrn16-4": (1, 3, 32, 32),
    "mobilenetv2": (1, 3, 224, 224),
    "alexnet": (1, 3, 224, 224),
    "googlenet": (1, 3, 224, 224),
}

#: Shipped weights: name -> (file in WEIGHTS_DIR, the builder kwargs they fit).
PRETRAINED: dict[str, tuple[str, dict]] = {
    "digits-resnet": ("digits_resnet.pt", {"num_classes": 10, "in_channels": 1}),
}


def names() -> list[str]:
    """Names of the zoo models, in a stable order."""
    return list(_BUILDERS)


def _check_name(name: str) -> str:
    if isinstance(name, str) and name.startswith("zoo:"):
        name = name[4:]
    if name not in _BUILDERS:
        raise UsageError(f"unknown zoo model '{name}'; available: {', '.join(names())}")
    return name


def input_shape(name: str) -> tuple[int, int, int, int]:
    """Default (N, C, H, W) input shape of zoo model ``name``."""
    return INPUT_SHAPES[_check_name(name)]


def build(name: str, pretrained: bool = True, **kwargs) -> nn.Module:
    """Build zoo model ``name`` (``zoo:`` prefix optional) with keyword ``kwargs``.

    ``pretrained=True`` loads shipped weights when the zoo has some for
    ``name`` (otherwise the weights stay random; seeded with ``SEED``).
    Raises UsageError for an unknown name or keyword, KcompileError when
    shipped weights are missing or unreadable.
    """
    name = _check_name(name)
    fn = _BUILDERS[name]
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise UsageError(f"zoo:{name}: bad keyword arguments {kwargs}: {e}") from None
    nc = kwargs.get("num_classes")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 1):
        raise UsageError(f"zoo:{name}: num_classes must be a positive integer, got {nc!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = fn(**kwargs)
    if pretrained and name in PRETRAINED:
        _load_pretrained(model, name, kwargs)
    model.kcompile_arch = {"spec": f"zoo:{name}", "kwargs": dict(kwargs)}  # lets kcompile.save describe it
    return model


def _load_pretrained(model: nn.Module, name: str, kwargs: dict) -> None:
    fname, fits = PRETRAINED[name]
    for k, v in kwargs.items():
        if fits.get(k) != v:
            raise UsageError(
                f"zoo:{name} ships weights only for {fits}; got {k}={v!r} (pass pretrained=False)"
            )
    path = WEIGHTS_DIR / fname
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except FileNotFoundError:
        raise KcompileError(f"zoo:{name}: shipped weights {path} are missing (reinstall kcompile)") from None
    except Exception as e:  # corrupt file or mismatching keys
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KcompileError(f"zoo:{name}: cannot load shipped weights {path}: {msg}") from None


__all__ = ["INPUT_SHAPES", "PRETRAINED", "SEED", "build", "input_shape", "names"]
