"""nn.Modules whose forward decodes a clustered weight (indices fixed, centroids trainable).

The codebook is an ``nn.Parameter`` (shared between layers when the IR names one
``codebook_key``), scales are a trainable ``nn.Parameter`` rounded to their stored dtype
(fp16 for Son) in the forward pass, and everything else (index, transform, offsets, masks)
is a buffer. Autograd through the gather sums the gradients of a centroid's members, which
is exactly the fine-tuning rule of Son et al. and KSE.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ir import ClusteredWeight


class _ClusteredBase(nn.Module):
    """Holds the IR's tensors as parameters/buffers and rebuilds the IR on demand."""

    def _init_clustered(self, cw: ClusteredWeight, codebook: nn.Parameter | None) -> None:
        self.unit = cw.unit
        self.method = cw.method
        self.weight_shape = tuple(cw.shape)
        self.codebook_key = cw.codebook_key
        self.zero_centroid = cw.zero_centroid
        self.extra = dict(cw.extra)
        self.codebook = codebook if codebook is not None else nn.Parameter(cw.codebook.detach().float().clone())
        self.register_buffer("index", cw.index.clone())
        self.scale_dtype = None if cw.scale is None else cw.scale.dtype
        self.scale = None if cw.scale is None else nn.Parameter(cw.scale.detach().float().clone())
        for name in ("transform", "transform_perms", "offset", "pruned", "full"):
            t = getattr(cw, name)
            self.register_buffer(name, None if t is None else t.clone())

    def clustered_weight(self) -> ClusteredWeight:
        """The layer's IR, tensors live (decode() is differentiable)."""
        scale = None if self.scale is None else self.scale.to(self.scale_dtype)
        return ClusteredWeight(
            unit=self.unit, shape=self.weight_shape, codebook=self.codebook, index=self.index,
            method=self.method, scale=scale, transform=self.transform,
            transform_perms=self.transform_perms, offset=self.offset, pruned=self.pruned,
            full=self.full, zero_centroid=self.zero_centroid, codebook_key=self.codebook_key,
            extra=dict(self.extra),
        )

    @property
    def weight(self) -> torch.Tensor:
        """The decoded dense weight, shape ``weight_shape``."""
        return self.clustered_weight().decode()


class ClusteredConv2d(_ClusteredBase):
    """Conv2d with a clustered weight. x: (N, C, H, W) -> (N, O, H', W')."""

    def __init__(self, cw: ClusteredWeight, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                 groups: int = 1, bias: torch.Tensor | None = None,
                 codebook: nn.Parameter | None = None) -> None:
        super().__init__()
        if len(cw.shape) != 4:
            raise ValueError(f"ClusteredConv2d needs a 4-D weight, got {cw.shape}")
        self._init_clustered(cw, codebook)
        self.stride, self.padding = tuple(stride), padding if isinstance(padding, str) else tuple(padding)
        self.dilation, self.groups = tuple(dilation), int(groups)
        self.in_channels = cw.shape[1] * self.groups
        self.out_channels = cw.shape[0]
        self.kernel_size = tuple(cw.shape[2:])
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, cw: ClusteredWeight, codebook: nn.Parameter | None = None):
        """Replace ``conv`` (its geometry and bias are kept) by a clustered conv."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported")
        return cls(cw, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                   groups=conv.groups, bias=conv.bias, codebook=codebook)

    def conv_params(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation,
                "groups": self.groups}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, unit={self.unit}, K={self.codebook.shape[0]}, method={self.method}")


class ClusteredLinear(_ClusteredBase):
    """Linear layer with a clustered weight. x: (..., I) -> (..., O)."""

    def __init__(self, cw: ClusteredWeight, *, bias: torch.Tensor | None = None,
                 codebook: nn.Parameter | None = None) -> None:
        super().__init__()
        if len(cw.shape) != 2:
            raise ValueError(f"ClusteredLinear needs a 2-D weight, got {cw.shape}")
        self._init_clustered(cw, codebook)
        self.out_features, self.in_features = cw.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_linear(cls, lin: nn.Linear, cw: ClusteredWeight, codebook: nn.Parameter | None = None):
        return cls(cw, bias=lin.bias, codebook=codebook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"unit={self.unit}, K={self.codebook.shape[0]}, method={self.method}")


CLUSTERED_TYPES = (ClusteredConv2d, ClusteredLinear)


def clustered_layers(model: nn.Module) -> list[tuple[str, _ClusteredBase]]:
    """(name, module) of every clustered layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CLUSTERED_TYPES)]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
