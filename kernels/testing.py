"""Seeded random clustered weights covering every IR feature (for tests and benchmarks).

``random_weight(kind, shape, seed)`` with kind one of
- ``kernel``: plain kernel unit, shared codebook of K centroids
- ``son``: kernel unit with fp16 scales and TIC transforms (random permutations of D)
- ``kse``: per-input-channel books (offset), some pruned and some full channels
- ``filter``: filter unit with n < O distinct filters
- ``row`` / ``scalar``: Deep k-Means units, with the zero centroid pinned
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kcompile.ir import ClusteredWeight, narrowest_uint

KINDS = ("kernel", "son", "kse", "filter", "row", "scalar")


def _idx(rng: np.random.Generator, hi: int, shape) -> torch.Tensor:
    return torch.from_numpy(rng.integers(0, max(hi, 1), size=shape)).to(narrowest_uint(max(hi - 1, 0)))


def random_weight(kind: str, shape: tuple[int, int, int, int], seed: int = 0, K: int | None = None) -> ClusteredWeight:
    """A random ``ClusteredWeight`` of ``kind`` for a conv weight of ``shape`` (O, Cg, kh, kw)."""
    rng = np.random.default_rng(seed)
    O, C, kh, kw = shape
    D = kh * kw
    f = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32))
    if kind == "kernel":
        K = K or max(1, min(O * C, 5))
        return ClusteredWeight("kernel", shape, f(K, D), _idx(rng, K, (O, C)), method="kernel")
    if kind == "son":
        K = K or max(1, min(O * C, 6))
        T = 4
        perms = torch.from_numpy(np.stack([rng.permutation(D) for _ in range(T)]).astype(np.int64))
        scale = torch.from_numpy(rng.uniform(-2, 2, size=(O, C)).astype(np.float16))
        tr = torch.from_numpy(rng.integers(0, T, size=(O, C)).astype(np.uint8))
        return ClusteredWeight("kernel", shape, f(K, D), _idx(rng, K, (O, C)), method="son", scale=scale,
                               transform=tr, transform_perms=perms, codebook_key="son/test")
    if kind == "kse":
        q = rng.integers(1, max(2, min(O, 4)) + 1, size=C)
        q = np.minimum(q, O)
        pruned = np.zeros(C, bool)
        full = np.zeros(C, bool)
        if C >= 2:
            pruned[rng.integers(0, C)] = True
        if C >= 3:
            c = int(rng.integers(0, C))
            if not pruned[c]:
                full[c] = True
        q = np.where(pruned, 0, np.where(full, O, q))
        books, index = [], np.zeros((O, C), np.int64)
        for c in range(C):
            books.append(rng.standard_normal((int(q[c]), D)).astype(np.float32))
            if full[c]:
                index[:, c] = np.arange(O)
            elif q[c] > 0:
                index[:, c] = rng.integers(0, q[c], size=O)
        sizes = torch.from_numpy(q.astype(np.int64))
        offset = torch.cumsum(sizes, 0) - sizes
        return ClusteredWeight("kernel", shape, torch.from_numpy(np.concatenate(books)).reshape(-1, D),
                               torch.from_numpy(index).to(narrowest_uint(max(int(q.max()) - 1, 0))), method="kse",
                               offset=offset, pruned=torch.from_numpy(pruned) if pruned.any() else None,
                               full=torch.from_numpy(full) if full.any() else None)
    if kind == "filter":
        n = K or max(1, math.ceil(O / 2))
        return ClusteredWeight("filter", shape, f(n, C * D), _idx(rng, n, (O,)), method="filter")
    if kind in ("row", "scalar"):
        lead = (O, C, kh) if kind == "row" else (O, C, kh, kw)
        width = kw if kind == "row" else 1
        K = K or 4
        book = f(K, width)
        book[0] = 7.0  # overwritten by the zero centroid on decode
        return ClusteredWeight(kind, shape, book, _idx(rng, K, lead), method="dkm", zero_centroid=True)
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
