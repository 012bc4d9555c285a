"""Preprocessing of a ``ClusteredWeight`` into kernel-ready NumPy arrays (done once per layer).

Everything a shared-centroid kernel needs is decoded here, so that a call only touches
activations:

- :class:`Geometry`: stride, padding (top, left, bottom, right), dilation, groups; output size.
- :class:`SharedTables`: the *conv-then-add* form, general over the kernel, row and scalar
  units. Every unit (o, c, u) of an output channel o (c: kept local input channel, u: the
  unit's position inside the kh x kw kernel: 1 for kernel, kh rows, kh*kw taps) is a
  sub-kernel ``mu`` (a kh*kw kernel that is zero outside the unit's taps; Son's TIC transform
  applied, the scale NOT folded in) times a scale ``s[o, c, u]``. Stage 1 computes, per input
  channel, every *distinct* sub-kernel once::

      z[r] = conv(x[zchan[r]], zk[r])                     r = 0..Z-1, rows grouped by channel

  and stage 2 gathers::

      y[o] = sum_j uscale[o, j] * z[uidx[o, j]]           j = k*upc + u over kept channels k

- :class:`AddTables`: the *add-then-conv* form (kernel unit): for each output o and each
  distinct centroid n it uses, ``a[o, n] = sum_{c: id(o,c)=n} s[o,c] x[c]``, then
  ``y[o] = sum_n conv(a[o, n], mu_n)``.
- :class:`DenseTables`: channels computed densely (KSE's lossless ``full`` channels).
- :func:`filter_tables`: filter unit, the distinct filters and the gather map.

Groups: the weight is (O, C/groups, kh, kw); output o belongs to group o // (O/groups) and
sees global input channels g*Cg .. g*Cg+Cg-1. Tables index *global* input channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kcompile.errors import UsageError
from kcompile.ir import ClusteredWeight


# ----------------------------------------------------------------------------- geometry
def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise UsageError(f"{name} must be an int or a pair, got {v}")
    return v


@dataclass(frozen=True)
class Geometry:
    """Conv geometry. padding = (top, left, bottom, right)."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @staticmethod
    def make(stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1) -> "Geometry":
        """Normalise user input: ints, pairs; padding 4-tuple (t, l, b, r) or pair (ph, pw)."""
        st, di = _pair(stride, "stride"), _pair(dilation, "dilation")
        if isinstance(padding, str):
            raise UsageError(f"padding must be numbers, got {padding!r}")
        if isinstance(padding, (int, np.integer)):
            pad = (int(padding),) * 4
        else:
            p = tuple(int(a) for a in padding)
            if len(p) == 2:
                pad = (p[0], p[1], p[0], p[1])
            elif len(p) == 4:
                pad = p
            else:
                raise UsageError(f"padding must be (ph, pw) or (top, left, bottom, right), got {p}")
        if min(st) < 1 or min(di) < 1 or min(pad) < 0 or int(groups) < 1:
            raise UsageError(f"bad conv geometry: stride={st} dilation={di} padding={pad} groups={groups}")
        return Geometry(st, pad, di, int(groups))

    def out_hw(self, H: int, W: int, kh: int, kw: int) -> tuple[int, int]:
        t, l, b, r = self.padding
        Ho = (H + t + b - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        Wo = (W + l + r - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if Ho < 1 or Wo < 1:
            raise UsageError(f"input {H}x{W} is too small for a {kh}x{kw} kernel with {self}")
        return Ho, Wo


def check_input(x: np.ndarray, C: int, name: str = "x") -> np.ndarray:
    """x as C-contiguous float32 (N, C, H, W); one-line UsageError otherwise."""
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1] != C:
        raise UsageError(f"{name} must be (N, {C}, H, W), got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32)


# ----------------------------------------------------------------------------- decoding
def book_array(cw: ClusteredWeight) -> np.ndarray:
    """(K, D) float32 codebook with the zero centroid pinned, as ``decode`` does."""
    book = cw.codebook.detach().cpu().float().numpy().copy()
    if cw.zero_centroid and len(book):
        book[0] = 0.0
    return book


def unit_keys_vectors(cw: ClusteredWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per unit: (key int64 L, effective vector float32 (*L, D), scale float32 L).

    key identifies the effective (transformed) centroid: global_index * T + transform.
    vector = codebook[global_index][transform_perm] (scale not applied).
    """
    gidx = cw.global_index().clamp(max=max(cw.K - 1, 0)).numpy()
    book = book_array(cw)
    vec = book[gidx]  # (*L, D)
    key = gidx.astype(np.int64)
    if cw.transform is not None:
        t = cw.transform.long().numpy()
        perms = cw.transform_perms.long().numpy()
        vec = np.take_along_axis(vec, perms[t], axis=-1)
        key = key * cw.num_transforms + t
    scale = np.ones(gidx.shape, np.float32) if cw.scale is None else cw.scale.detach().float().numpy()
    return key, vec.astype(np.float32), scale.astype(np.float32)


def decoded_weight(cw: ClusteredWeight) -> np.ndarray:
    """The dense weight (``cw.decode()``) as float32 NumPy."""
    with torch.no_grad():
        return cw.detached().decode().float().numpy().astype(np.float32)


def channel_masks(cw: ClusteredWeight) -> tuple[np.ndarray, np.ndarray]:
    """(pruned (Cg,) bool, full (Cg,) bool)."""
    Cg = cw.shape[1]
    pruned = np.zeros(Cg, bool) if cw.pruned is None else cw.pruned.numpy().astype(bool)
    full = np.zeros(Cg, bool) if cw.full is None else cw.full.numpy().astype(bool)
    return pruned, full & ~pruned


def units_per_channel(cw: ClusteredWeight) -> int:
    kh, kw = cw.shape[2:]
    return {"kernel": 1, "row": kh, "scalar": kh * kw}[cw.unit]


def sub_kernels(cw: ClusteredWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Units as full-size sub-kernels: (key (O, Cg, upc), kern (O, Cg, upc, kh*kw), scale).

    A row unit i becomes a kh x kw kernel holding the row at row i and zeros elsewhere; a
    scalar unit (i, j) a kernel with one non-zero tap. Keys are made unique across u.
    """
    O, Cg, kh, kw = cw.shape
    upc = units_per_channel(cw)
    key, vec, scale = unit_keys_vectors(cw)
    key = key.reshape(O, Cg, upc)
    scale = scale.reshape(O, Cg, upc)
    D = vec.shape[-1]
    vec = vec.reshape(O, Cg, upc, D)
    kern = np.zeros((O, Cg, upc, kh * kw), np.float32)
    for u in range(upc):
        taps = np.arange(kh * kw) if upc == 1 else (
            np.arange(u * kw, (u + 1) * kw) if cw.unit == "row" else np.array([u]))
        kern[:, :, u, taps] = vec[:, :, u, :]
    span = int(key.max()) + 1 if key.size else 1
    key = key + np.arange(upc).reshape(1, 1, upc) * span
    return key, kern, scale


# ----------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class DenseTables:
    """Input channels computed by a dense conv: ``channels`` (global ids), weight (O, n, kh, kw).

    With groups > 1 the dense part is a grouped conv: ``weight`` is (O, n/groups, kh, kw)."""

    channels: np.ndarray
    weight: np.ndarray


@dataclass(frozen=True)
class SharedTables:
    """Conv-then-add tables (see module doc). Shapes:

    zk (Z, kh*kw) float32; zchan (Z,) int64 global channel; zstart (G*Ck + 1,) int64 (rows of
    kept channel k of group g are zstart[g*Ck+k] : zstart[g*Ck+k+1]); kept (Ck,) local ids of
    kept channels; uidx (O, Ck*upc) int32; uscale (O, Ck*upc) float32; upc units per channel.
    """

    zk: np.ndarray
    zchan: np.ndarray
    zstart: np.ndarray
    kept: np.ndarray
    uidx: np.ndarray
    uscale: np.ndarray
    upc: int
    groups: int
    kh: int
    kw: int

    @property
    def rows(self) -> int:
        return int(self.zk.shape[0])

    @property
    def Ck(self) -> int:
        return int(self.kept.shape[0])


def shared_tables(cw: ClusteredWeight, groups: int, exclude: np.ndarray | None = None) -> SharedTables:
    """Build conv-then-add tables for a kernel/row/scalar-unit conv weight.

    ``exclude`` (Cg,) bool: local channels left out (pruned, full or computed elsewhere).
    """
    O, Cg, kh, kw = cw.shape
    if O % groups:
        raise UsageError(f"{O} output channels do not split into {groups} groups")
    Og = O // groups
    key, kern, scale = sub_kernels(cw)
    upc = key.shape[2]
    pruned, full = channel_masks(cw)
    skip = pruned | full if exclude is None else (pruned | full | exclude)
    kept = np.flatnonzero(~skip)
    Ck = len(kept)
    zk, zchan, zstart = [], [], [0]
    uidx = np.zeros((O, Ck * upc), np.int32)
    uscale = np.zeros((O, Ck * upc), np.float32)
    for g in range(groups):
        osl = slice(g * Og, (g + 1) * Og)
        for k, c in enumerate(kept):
            keys = key[osl, c, :].reshape(-1)
            uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
            kk = kern[osl, c, :, :].reshape(-1, kh * kw)[first]
            base = zstart[-1]
            zk.append(kk)
            zchan.append(np.full(len(uniq), g * Cg + c, np.int64))
            zstart.append(base + len(uniq))
            uidx[osl, k * upc:(k + 1) * upc] = (base + inv).reshape(Og, upc)
            uscale[osl, k * upc:(k + 1) * upc] = scale[osl, c, :]
    zk = np.concatenate(zk) if zk else np.zeros((0, kh * kw), np.float32)
    zchan = np.concatenate(zchan) if zchan else np.zeros(0, np.int64)
    return SharedTables(np.ascontiguousarray(zk, np.float32), zchan, np.asarray(zstart, np.int64),
                        kept.astype(np.int64), uidx, uscale, upc, groups, kh, kw)


def dense_tables(cw: ClusteredWeight, groups: int, channels_local: np.ndarray) -> DenseTables | None:
    """Dense conv over the given local channels (all groups); None when there are none."""
    if len(channels_local) == 0:
        return None
    Cg = cw.shape[1]
    w = decoded_weight(cw)[:, channels_local]
    glob = np.concatenate([g * Cg + channels_local for g in range(groups)]).astype(np.int64)
    return DenseTables(glob, np.ascontiguousarray(w))


@dataclass(frozen=True)
class AddTables:
    """Add-then-conv tables (kernel unit). For output o, its distinct centroids are the
    entries n in optr[o] : optr[o+1]; entry n has kernel ak[n] (kh*kw) and members
    mptr[n] : mptr[n+1] of (mchan global channel, mscale)."""

    optr: np.ndarray
    ak: np.ndarray
    mptr: np.ndarray
    mchan: np.ndarray
    mscale: np.ndarray
    kh: int
    kw: int


def add_tables(cw: ClusteredWeight, groups: int) -> AddTables:
    if cw.unit != "kernel":
        raise ValueError("add-then-conv needs the kernel unit")
    O, Cg, kh, kw = cw.shape
    Og = O // groups
    key, vec, scale = unit_keys_vectors(cw)
    pruned, full = channel_masks(cw)
    kept = np.flatnonzero(~(pruned | full))
    optr, ak, mptr, mchan, mscale = [0], [], [0], [], []
    for o in range(O):
        g = o // Og
        keys = key[o, kept]
        uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
        order = np.argsort(inv, kind="stable")
        counts = np.bincount(inv, minlength=len(uniq))
        ak.append(vec[o, kept[first]])
        mchan.append(g * Cg + kept[order])
        mscale.append(scale[o, kept[order]])
        mptr.extend((mptr[-1] + np.cumsum(counts)).tolist())
        optr.append(optr[-1] + len(uniq))
    cat = lambda a, shape, dt: np.concatenate(a).astype(dt) if a else np.zeros(shape, dt)
    return AddTables(np.asarray(optr, np.int64), np.ascontiguousarray(cat(ak, (0, kh * kw), np.float32)),
                     np.asarray(mptr, np.int64), cat(mchan, (0,), np.int64),
                     cat(mscale, (0,), np.float32), kh, kw)


@dataclass(frozen=True)
class FilterTables:
    """Filter unit: per group g, ``filters[g]`` (n_g, Cg, kh, kw) distinct filters; output o
    is distinct filter ``gather[o]`` of the concatenation over groups (padded to n_max per
    group, so output o reads channel g*n_max + local id)."""

    weight: np.ndarray  # (groups*n_max, Cg, kh, kw)
    gather: np.ndarray  # (O,) int64
    n_max: int


def filter_tables(cw: ClusteredWeight, groups: int) -> FilterTables:
    O, Cg, kh, kw = cw.shape
    Og = O // groups
    gidx = cw.global_index().clamp(max=max(cw.K - 1, 0)).numpy()
    book = book_array(cw)
    per = []
    for g in range(groups):
        ids = gidx[g * Og:(g + 1) * Og]
        uniq, inv = np.unique(ids, return_inverse=True)
        per.append((uniq, inv))
    n_max = max(len(u) for u, _ in per)
    weight = np.zeros((groups * n_max, Cg * kh * kw), np.float32)
    gather = np.zeros(O, np.int64)
    for g, (uniq, inv) in enumerate(per):
        weight[g * n_max:g * n_max + len(uniq)] = book[uniq]
        gather[g * Og:(g + 1) * Og] = g * n_max + inv
    if cw.scale is not None:  # a per-filter scale (not produced by kcompile's methods)
        raise UsageError("filter-unit weights with scales are not supported by the kernels")
    return FilterTables(weight.reshape(groups * n_max, Cg, kh, kw), gather, n_max)


def chunk_channels(t: SharedTables, budget_rows: int, multiple: int = 8) -> np.ndarray:
    """Channel chunks for the fused kernel: (nchunks, 3) int64 rows (g, k0, k1) such that the
    z rows of kept channels k0..k1-1 of group g number at most ``budget_rows`` (a chunk
    always holds at least one channel). Chunks are cut at multiples of ``multiple`` channels
    when at least that many fit (the kernel's stage 2 takes eight units per pass)."""
    out = []
    for g in range(t.groups):
        base = g * t.Ck
        k0 = 0
        while k0 < t.Ck:
            k1 = k0 + 1
            while k1 < t.Ck and t.zstart[base + k1 + 1] - t.zstart[base + k0] <= budget_rows:
                k1 += 1
            if k1 < t.Ck and k1 - k0 > multiple:
                k1 = k0 + (k1 - k0) // multiple * multiple
            out.append((g, k0, k1))
            k0 = k1
    return np.asarray(out, np.int64).reshape(-1, 3)


def op_counts(cw: ClusteredWeight, out_hw: tuple[int, int], groups: int) -> dict:
    """``cw.conv_macs`` plus the op-count bound dense / shared."""
    m = cw.conv_macs(out_hw, groups)
    m = dict(m)
    m["bound"] = m["dense"] / max(m["shared"], 1)
    return m


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "Geometry", "SharedTables", "AddTables", "DenseTables", "FilterTables", "shared_tables",
    "add_tables", "dense_tables", "filter_tables", "chunk_channels", "decoded_weight",
    "check_input", "op_counts", "ceil_div", "channel_masks",
]
