"""conv2d-kernels-cluster: whole filters W[o] (C*kh*kw vectors) clustered per layer.

Filters of one cluster become identical (the centroid), so identical output channels can be
computed once and gathered. The number of clusters n per layer is chosen by
- ``fixed``:   n = round(O * ratio) (ratio = fraction kept),
- ``inertia``: the smallest n, searching down from O-1 to floor(O/2)+1, whose k-means inertia
               stays <= ``limit`` (a layer where even O-1 exceeds it stays dense),
- ``wcss``:    n over [round(O*lo), round(O*hi)], the elbow: the n farthest from the chord
               between the end points after normalising both axes.
Every conv (stem, 1x1 and depthwise included) or only the first one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import UsageError
from ..ir import ClusteredWeight, narrowest_uint
from ..kmeans import kmeans
from .common import ClusterPlan, conv_weight, find_layers, require_k, require_layers


@dataclass(frozen=True)
class FilterConfig:
    select: str = "fixed"
    ratio: float = 0.9
    limit: float = 1.0
    wcss_range: tuple[float, float] = (0.9, 1.0)
    first_layer_only: bool = False
    seed: int = 0
    skip: tuple[str, ...] = ()
    iters: int = 50
    wcss_points: int = 16


def elbow(ns: list[int], wcss: list[float]) -> int:
    """The n whose (normalised) point lies farthest from the chord of the first and last."""
    if len(ns) < 3:
        return ns[0]
    x = torch.tensor(ns, dtype=torch.float64)
    y = torch.tensor(wcss, dtype=torch.float64)
    x = (x - x[0]) / (x[-1] - x[0])
    span = y.max() - y.min()
    y = (y - y.min()) / span if span > 0 else torch.zeros_like(y)
    dx, dy = x[-1] - x[0], y[-1] - y[0]
    dist = (dy * (x - x[0]) - dx * (y - y[0])).abs() / torch.hypot(dx, dy)
    return ns[int(dist.argmax())]


def _choose_n(name: str, x: torch.Tensor, cfg: FilterConfig) -> tuple[int, dict]:
    O = x.shape[0]
    if cfg.select == "fixed":
        if not 0 < cfg.ratio <= 1:
            raise UsageError(f"--ratio must be in (0, 1] (got {cfg.ratio})")
        n = max(1, round(O * cfg.ratio))
        return n, {}
    if cfg.select == "inertia":
        best, trace = O, []
        for n in range(O - 1, O // 2, -1):
            inertia = float(kmeans(x, n, iters=cfg.iters, seed=cfg.seed).inertia[0])
            trace.append((n, inertia))
            if inertia > cfg.limit:
                break
            best = n
        return best, {"inertia_trace": trace}
    if cfg.select == "wcss":
        lo, hi = cfg.wcss_range
        if not 0 < lo < hi <= 1:
            raise UsageError(f"--wcss-range must be lo-hi with 0 < lo < hi <= 1 (got {lo}-{hi})")
        n_lo, n_hi = max(1, round(O * lo)), min(O, round(O * hi))
        step = max(1, (n_hi - n_lo) // (cfg.wcss_points - 1))
        ns = list(range(n_lo, n_hi + 1, step))
        if ns[-1] != n_hi:
            ns.append(n_hi)
        res = kmeans(x.expand(len(ns), *x.shape), ns, iters=cfg.iters, seed=cfg.seed)
        wcss = res.inertia.tolist()
        return elbow(ns, wcss), {"wcss": list(zip(ns, wcss))}
    raise UsageError(f"unknown --select {cfg.select!r}: expected fixed, inertia or wcss")


def weight_change(old: torch.Tensor, new: torch.Tensor) -> dict:
    """The dW report: fraction of weights changed, mean |dW|, ||dW||_2, max |dW|."""
    d = (new - old).abs()
    return {"fraction_changed": float((d > 0).float().mean()), "mean_abs_dw": float(d.mean()),
            "l2_dw": float(d.norm()), "max_abs_dw": float(d.max())}


def cluster_filter(model: nn.Module, cfg: FilterConfig) -> ClusterPlan:
    """Plan whole-filter clustering of every conv (or only the first)."""
    layers = find_layers(model, (nn.Conv2d,), cfg.skip)
    if cfg.first_layer_only:
        layers = layers[:1]
    require_layers(layers, "filter", "convs")
    plan = ClusterPlan()
    for name, mod in layers:
        w = conv_weight(mod)
        O = w.shape[0]
        x = w.reshape(O, -1)
        n, trace = _choose_n(name, x, cfg)
        require_k(n, O, f"layer {name} ({O} filters)")
        if n == O and cfg.select != "fixed":
            plan.report[name] = {"O": O, "n": O, "kept_dense": True, **trace}
            continue
        res = kmeans(x, n, iters=cfg.iters, seed=cfg.seed)
        cw = ClusteredWeight(unit="filter", shape=tuple(w.shape), codebook=res.centroids[0, :n].contiguous(),
                             index=res.labels[0].to(narrowest_uint(n - 1)), method="filter")
        plan.layers[name] = cw
        plan.report[name] = {"O": O, "n": n, **weight_change(w, cw.decode()), **trace}
    if not plan.layers:
        raise UsageError(f"filter selection {cfg.select!r} kept every layer dense; loosen --limit or --wcss-range")
    return plan
