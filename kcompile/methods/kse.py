"""KSE (Li et al., CVPR 2019): kernel sparsity and entropy per input channel.

For every input channel c of a conv (groups == 1), over its O kernels W[:, c]:
sparsity s_c = sum ||W[o,c]||_1; entropy e_c over the 5-nearest-neighbour distance sums;
v_c = sqrt(s_c / (1 + e_c)) after min-max normalisation (again normalised). With integers
G >= 1, T >= 0: floor(v G) == 0 -> pruned, ceil(v G) == G -> full (lossless),
else q_c = ceil(O * 2^(floor(v G) + 1 - T - G)) centroids by k-means over the channel's
kernels. ``q`` overrides the indicator: every channel gets min(q, O) centroids.

The indicator is computed over input channels W[:, c] (the reference code reshapes where it
should transpose and measures output filters of square layers instead). The network's
first conv (the image input) stays dense, as pruning an input colour channel is never
meant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import UsageError
from ..ir import ClusteredWeight, narrowest_uint
from ..kmeans import kmeans
from .common import ClusterPlan, conv_weight, find_layers, require_layers


@dataclass(frozen=True)
class KSEConfig:
    G: int = 4
    T: int = 0
    q: int | None = None
    seed: int = 0
    skip: tuple[str, ...] = ()
    iters: int = 50


def _minmax(v: torch.Tensor) -> torch.Tensor:
    """Min-max normalise; a constant vector becomes all ones (nothing to tell apart)."""
    lo, hi = v.min(), v.max()
    if float(hi - lo) <= 0:
        return torch.ones_like(v)
    return (v - lo) / (hi - lo)


def channel_entropy(w: torch.Tensor, neighbours: int = 5) -> torch.Tensor:
    """Kernel entropy e_c per input channel. w: (O, C, kh, kw) -> (C,) float64.

    dm_i = sum of distances from kernel i to its ``neighbours`` nearest kernels of the same
    channel; e_c = -sum_i p_i log2 p_i with p_i = dm_i / sum dm. A channel whose kernels
    are all identical (sum dm == 0) has entropy 0.
    """
    O, C = w.shape[:2]
    x = w.permute(1, 0, 2, 3).reshape(C, O, -1).double()
    nb = min(neighbours, O - 1)
    out = torch.zeros(C, dtype=torch.float64)
    if nb <= 0:
        return out
    step = max(1, (1 << 24) // (O * O))
    for a in range(0, C, step):
        d = torch.cdist(x[a:a + step], x[a:a + step])
        d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        dm = d.topk(nb, dim=2, largest=False).values.sum(dim=2)  # (c, O)
        tot = dm.sum(dim=1, keepdim=True)
        p = torch.where(tot > 0, dm / tot.clamp_min(1e-300), 0.0)
        out[a:a + step] = -(torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), 0.0)).sum(dim=1)
    return out


def indicator(w: torch.Tensor) -> torch.Tensor:
    """KSE indicator v_c in [0, 1] per input channel. w: (O, C, kh, kw) -> (C,) float64."""
    s = w.double().abs().sum(dim=(0, 2, 3))
    e = channel_entropy(w)
    return _minmax(torch.sqrt(_minmax(s) / (1 + _minmax(e))))


def centroid_counts(v: torch.Tensor, O: int, G: int, T: int) -> torch.Tensor:
    """q_c from the indicator: 0 = pruned, O = full, else ceil(O * 2^(g + 1 - T - G))."""
    q = torch.empty(v.shape, dtype=torch.int64)
    for c, vc in enumerate(v.tolist()):
        g = math.floor(vc * G)
        if g == 0:
            q[c] = 0
        elif math.ceil(vc * G) == G:
            q[c] = O
        else:
            q[c] = min(O, max(1, math.ceil(O * 2.0 ** (g + 1 - T - G))))
    return q


def cluster_kse(model: nn.Module, cfg: KSEConfig) -> ClusterPlan:
    """Plan KSE clustering of every groups == 1 conv after the first."""
    if cfg.G < 1 or cfg.T < 0:
        raise UsageError(f"KSE needs G >= 1 and T >= 0 (got G={cfg.G}, T={cfg.T})")
    if cfg.q is not None and cfg.q < 1:
        raise UsageError(f"--q must be at least 1 (got {cfg.q})")
    convs = find_layers(model, (nn.Conv2d,), cfg.skip, where=lambda m: m.groups == 1)
    first = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    layers = [(n, m) for n, m in convs if n != first]
    require_layers(layers, "kse", "convs with groups == 1 after the first conv")
    plan = ClusterPlan()
    for name, mod in layers:
        w = conv_weight(mod)
        O, C, kh, kw = w.shape
        if cfg.q is not None:
            q = torch.full((C,), min(cfg.q, O), dtype=torch.int64)
            v = None
        else:
            v = indicator(w)
            q = centroid_counts(v, O, cfg.G, cfg.T)
        plan.layers[name] = _cluster_layer(w, q, cfg)
        plan.report[name] = {
            "pruned": int((q == 0).sum()), "full": int(((q == O) & (cfg.q is None)).sum()),
            "q": sorted(set(q.tolist())), "centroids": int(q.sum()),
        }
    return plan


def _cluster_layer(w: torch.Tensor, q: torch.Tensor, cfg: KSEConfig) -> ClusteredWeight:
    """k-means of each input channel's O kernels into q_c centroids (batched over channels)."""
    O, C, kh, kw = w.shape
    D = kh * kw
    x = w.permute(1, 0, 2, 3).reshape(C, O, D)
    pruned = q == 0
    full = (q == O) & (cfg.q is None)
    index = torch.zeros(O, C, dtype=torch.int64)
    books: list[torch.Tensor] = [torch.zeros(0, D)] * C
    todo = [c for c in range(C) if not pruned[c] and not full[c]]
    if todo:
        res = kmeans(x[todo], q[todo], iters=cfg.iters, seed=cfg.seed)
        for j, c in enumerate(todo):
            books[c] = res.centroids[j, : int(q[c])]
            index[:, c] = res.labels[j]
    for c in range(C):
        if full[c]:
            books[c] = x[c]
            index[:, c] = torch.arange(O)
    sizes = torch.tensor([b.shape[0] for b in books], dtype=torch.int64)
    offset = torch.cumsum(sizes, 0) - sizes
    return ClusteredWeight(
        unit="kernel", shape=(O, C, kh, kw), codebook=torch.cat(books).contiguous(),
        index=index.to(narrowest_uint(max(int(q.max()) - 1, 0))), method="kse", offset=offset,
        pruned=pruned if bool(pruned.any()) else None, full=full if bool(full.any()) else None,
    )
