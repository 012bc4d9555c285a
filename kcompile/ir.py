"""The clustered-weight IR: one representation for every clustering method.

A dense weight of shape ``shape`` ((O, C, kh, kw) for a conv, (O, I) for a linear layer) is
cut into *units* along its trailing axes:

======  ==================  =====================  =========================
unit    index shape         codebook row (D)       used by
======  ==================  =====================  =========================
filter  (O,)                C*kh*kw                conv2d-kernels-cluster
kernel  (O, C)              kh*kw                  Son et al., KSE
row     (O, C, kh)          kw                     Deep k-Means
scalar  shape               1                      Deep k-Means on 1x1 / fc
======  ==================  =====================  =========================

Decoding (``ClusteredWeight.decode``)::

    v[u]  = codebook[index[u] + offset[c(u)]]            # (D,)   offset: KSE per-channel books
    v[u]  = v[u][transform_perms[transform[u]]]          # Son's TIC (a permutation of D)
    v[u]  = v[u] * scale[u]                              # Son's per-kernel scale (fp16)
    W     = stack(v).reshape(shape) * keep[c]            # KSE's pruned input channels are 0

The IR is pure data (torch tensors); it never imports the CLI, exporters or methods, so that
``kcompile.kernels`` and ``kcompile.energy`` can depend on it alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

UNITS = ("filter", "kernel", "row", "scalar")


def lead_dims(unit: str, ndim: int) -> int:
    """Number of leading weight axes that index units: filter 1, kernel 2, row 3, scalar ndim."""
    if unit == "scalar":
        return ndim
    try:
        return {"filter": 1, "kernel": 2, "row": 3}[unit]
    except KeyError:
        raise ValueError(f"unknown unit {unit!r}; expected one of {UNITS}") from None


def narrowest_uint(max_value: int) -> torch.dtype:
    """The narrowest unsigned torch dtype holding 0..max_value (uint8, uint16 or uint32)."""
    if max_value < 2**8:
        return torch.uint8
    if max_value < 2**16:
        return torch.uint16
    return torch.uint32


def bits_for(count: int) -> int:
    """Index bits needed to address ``count`` alternatives (0 for a single alternative)."""
    return 0 if count <= 1 else math.ceil(math.log2(count))


@dataclass(frozen=True)
class ClusteredWeight:
    """A clustered weight: codebook + index (+ scale, transform, per-channel books).

    Shapes (``L = shape[:lead_dims(unit, len(shape))]``, ``D`` = prod of the other axes):
      codebook        (K, D) float32 — all centroids (KSE: per-channel books concatenated)
      index           L, narrowest unsigned dtype — centroid id (local to the channel's book
                      when ``offset`` is set)
      scale           L or None — per-unit scale (Son: float16)
      transform       L uint8 or None — id into ``transform_perms`` (Son's TIC)
      transform_perms (T, D) int64 or None — permutation of D applied by each transform
      offset          (C,) int64 or None — start of channel c's book in ``codebook`` (kernel unit)
      pruned          (C,) bool or None — input channels dropped (decode to 0)
      full            (C,) bool or None — input channels kept lossless (book = the O kernels)
      zero_centroid   codebook row 0 is a fixed zero (Deep k-Means' sparsity cluster)
      codebook_key    name of a codebook shared by several layers (Son's network scope)
    """

    unit: str
    shape: tuple[int, ...]
    codebook: torch.Tensor
    index: torch.Tensor
    method: str = ""
    scale: torch.Tensor | None = None
    transform: torch.Tensor | None = None
    transform_perms: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    pruned: torch.Tensor | None = None
    full: torch.Tensor | None = None
    zero_centroid: bool = False
    codebook_key: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        lead = lead_dims(self.unit, len(self.shape))
        unit_shape = tuple(self.shape[:lead])
        D = math.prod(self.shape[lead:])
        if self.codebook.ndim != 2 or self.codebook.shape[1] != D:
            raise ValueError(f"codebook must be (K, {D}), got {tuple(self.codebook.shape)}")
        if tuple(self.index.shape) != unit_shape:
            raise ValueError(f"index must be {unit_shape}, got {tuple(self.index.shape)}")
        for name in ("scale", "transform"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != unit_shape:
                raise ValueError(f"{name} must be {unit_shape}, got {tuple(t.shape)}")
        if (self.transform is None) != (self.transform_perms is None):
            raise ValueError("transform and transform_perms go together")
        if self.offset is not None and self.unit != "kernel":
            raise ValueError("per-channel codebooks (offset) need the kernel unit")

    # ----------------------------------------------------------------- properties
    @property
    def K(self) -> int:
        """Number of centroids stored (all books together)."""
        return int(self.codebook.shape[0])

    @property
    def D(self) -> int:
        """Length of one unit (one codebook row)."""
        return int(self.codebook.shape[1])

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return tuple(self.index.shape)

    @property
    def num_units(self) -> int:
        return self.index.numel()

    @property
    def num_transforms(self) -> int:
        return 1 if self.transform_perms is None else int(self.transform_perms.shape[0])

    def book_sizes(self) -> torch.Tensor:
        """(C,) int64 centroids per input channel (KSE; q_c = 0 for pruned channels).

        Books are stored in channel order, so q_c = offset[c+1] - offset[c]. Without
        per-channel books: a (1,) tensor holding K.
        """
        if self.offset is None:
            return torch.tensor([self.K])
        ends = torch.cat([self.offset[1:], torch.tensor([self.K])])
        return ends - self.offset

    def index_bits(self) -> int:
        """Bits of one index under uniform coding: ceil(log2(K_book * T)), max over books."""
        books = self.book_sizes()
        return max(bits_for(int(q) * self.num_transforms) for q in books) if books.numel() else 0

    def global_index(self) -> torch.Tensor:
        """Index into ``codebook`` (offset added), int64, shape ``unit_shape``."""
        idx = self.index.long()
        if self.offset is not None:
            idx = idx + self.offset.view(1, -1)
        return idx

    def keep_mask(self) -> torch.Tensor | None:
        """(C,) float mask of kept input channels, or None when nothing is pruned."""
        if self.pruned is None or not bool(self.pruned.any()):
            return None
        return (~self.pruned).to(self.codebook.dtype)

    # ----------------------------------------------------------------- decoding
    def decode(self) -> torch.Tensor:
        """The dense weight, shape ``shape``; differentiable w.r.t. codebook and scale."""
        book = self.codebook
        if self.zero_centroid:  # row 0 is pinned at zero: no gradient reaches it
            book = torch.cat([torch.zeros_like(book[:1]), book[1:]])
        vec = book[self.global_index().clamp(max=self.K - 1)]  # (*L, D)
        if self.transform is not None:
            perm = self.transform_perms[self.transform.long()]  # (*L, D)
            vec = torch.gather(vec, -1, perm)
        if self.scale is not None:
            vec = vec * self.scale.to(vec.dtype).unsqueeze(-1)
        w = vec.reshape(self.shape)
        keep = self.keep_mask()
        if keep is not None:
            w = w * keep.view(1, -1, *([1] * (len(self.shape) - 2)))
        return w

    def detached(self) -> "ClusteredWeight":
        """A copy with every tensor detached (for consumers outside autograd)."""
        return replace(
            self,
            codebook=self.codebook.detach(),
            scale=None if self.scale is None else self.scale.detach(),
        )

    # ----------------------------------------------------------------- storage
    def storage_bits(self, codebook_share: float = 1.0, value_bits: int = 32) -> dict:
        """Bits this layer stores, packed: ``{"codebook", "index", "scale", "total"}``.

        ``codebook_share`` is the fraction of a shared codebook charged to this layer
        (its units / all units of the codebook). Index bits are ceil(log2(q_c * T)) per unit,
        with q_c the size of the unit's book (0 bits for a one-centroid book or a pruned
        channel); scales count at their stored width.
        """
        book = self.K * self.D * value_bits * codebook_share
        if self.offset is not None:
            per_unit_rows = self.num_units // self.shape[1]
            index = sum(per_unit_rows * bits_for(int(q) * self.num_transforms) for q in self.book_sizes())
        else:
            index = self.num_units * bits_for(self.K * self.num_transforms)
        scale = 0 if self.scale is None else self.num_units * self.scale.element_size() * 8
        return {"codebook": book, "index": index, "scale": scale, "total": book + index + scale}

    def entropy_index_bits(self) -> float:
        """Mean bits per index under entropy coding: -sum p log2 p of the centroid frequencies."""
        ids = self.global_index().reshape(-1)
        if self.transform is not None:
            ids = ids * self.num_transforms + self.transform.long().reshape(-1)
        p = torch.bincount(ids).double()
        p = p[p > 0] / ids.numel()
        return float(-(p * torch.log2(p)).sum())

    # ----------------------------------------------------------------- op counts
    def distinct_per_group(self, group_axes: tuple[int, ...], groups: int = 1) -> int:
        """Sum over groups of the number of distinct (centroid, transform) ids.

        ``group_axes`` are the unit axes that define a group (e.g. (1,) = per input channel
        for conv-then-add; (0,) = per output channel for add-then-conv). Units of pruned
        input channels are not counted. With ``groups`` > 1 (grouped conv), units of different
        groups never share a product: input channel c of group g is a different channel.
        """
        ids = self.global_index()
        if self.transform is not None:
            ids = ids * self.num_transforms + self.transform.long()
        if groups > 1:
            g = torch.arange(ids.shape[0]) // (ids.shape[0] // groups)
            ids = ids + g.view(-1, *([1] * (ids.ndim - 1))) * (int(ids.max()) + 1)
        if self.pruned is not None and ids.ndim >= 2:
            ids = torch.where(self.pruned.view(1, -1, *([1] * (ids.ndim - 2))), -1, ids)
        other = [a for a in range(ids.ndim) if a not in group_axes]
        rows = math.prod(ids.shape[a] for a in group_axes)
        flat = ids.permute(*group_axes, *other).reshape(rows, -1)
        s, _ = flat.sort(dim=1)
        distinct = 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1) - (s[:, 0] < 0).long()
        return int(distinct.sum())

    def conv_macs(self, out_hw: tuple[int, int], groups: int = 1) -> dict:
        """Multiply-accumulate counts of a conv with this weight at output size ``out_hw``.

        ``groups`` is the conv's group count (the weight is (O, C/groups, kh, kw)).
        Returns ``{"dense", "shared", "form"}``: ``dense`` = O*C*kh*kw*H'W'; ``shared`` = the
        cheapest sharing-aware form, *with* the O*C*H'W' accumulation counted:

        - filter: n distinct filters computed once (n*C*kh*kw*H'W'); outputs gathered.
        - kernel: min(conv-then-add, add-then-conv) (Son §1, KSE §2); full KSE channels
          counted as dense.
        - row: distinct (channel, row, centroid) 1-D products + O*C*kh*H'W' accumulations.
        - scalar: distinct (channel, tap, value) products + O*C*kh*kw*H'W' accumulations.
        Where no shared form beats the dense conv, ``shared`` = ``dense`` and form "dense".
        """
        hw = out_hw[0] * out_hw[1]
        O = self.shape[0]
        dense = O * math.prod(self.shape[1:]) * hw
        if self.unit == "filter":  # distinct (group, filter) pairs: groups read different inputs
            idx = self.global_index()
            if groups > 1:
                idx = idx + (torch.arange(O) // (O // groups)) * self.K
            n = int(torch.unique(idx).numel())
            return {"dense": dense, "shared": n * self.D * hw, "form": "filter-gather"}
        units_per_out = self.num_units // O
        if self.pruned is not None:
            units_per_out = units_per_out * int((~self.pruned).sum()) // self.shape[1]
        accum = O * units_per_out * hw
        cta = self.distinct_per_group(tuple(range(1, self.index.ndim)), groups) * self.D * hw + accum
        best, form = cta, "conv-then-add"
        if self.unit == "kernel":
            atc = self.distinct_per_group((0,)) * self.D * hw + accum
            if atc < cta:
                best, form = atc, "add-then-conv"
        if dense <= best:  # sharing does not pay here: a compiler runs the dense conv
            best, form = dense, "dense"
        return {"dense": dense, "shared": best, "form": form}
