"""Deep k-Means (Wu et al., ICML 2018): one-shot row clustering per layer.

Each conv's weight (O, C, kh, kw) is cut into N = O*C*kh rows of length kw (1x1 convs: N
scalars); K = round(rate * N) (at least 1) or a fixed ``k`` shared rows per layer. With
``sparsity`` p, the fraction p of rows with the smallest L2 norm forms one cluster pinned
at zero (codebook row 0) and (K-1)-means clusters the rest. The spectral re-training
regulariser is a separate step (kcompile.dkm_retrain), not part of this one-shot plan.
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
class DKMConfig:
    rate: float = 0.1
    k: int | None = None
    sparsity: float = 0.0
    seed: int = 0
    skip: tuple[str, ...] = ()
    iters: int = 50


def row_view(w: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(unit, rows (N, s)) of a conv weight: rows of length kw, or scalars for kw == 1."""
    unit = "row" if w.shape[-1] > 1 else "scalar"
    return unit, w.reshape(-1, w.shape[-1])


def layer_k(n_rows: int, cfg: DKMConfig) -> int:
    """K for a layer of ``n_rows`` rows: ``cfg.k`` or round(rate * N), at least 1."""
    return cfg.k if cfg.k is not None else max(1, round(cfg.rate * n_rows))


def cluster_dkm(model: nn.Module, cfg: DKMConfig) -> ClusterPlan:
    """Plan row clustering of every conv."""
    if cfg.k is None and not 0 < cfg.rate <= 1:
        raise UsageError(f"--rate must be in (0, 1] (got {cfg.rate})")
    if not 0 <= cfg.sparsity < 1:
        raise UsageError(f"--sparsity must be in [0, 1) (got {cfg.sparsity})")
    layers = find_layers(model, (nn.Conv2d,), cfg.skip)
    require_layers(layers, "dkm", "convs")
    plan = ClusterPlan()
    for name, mod in layers:
        w = conv_weight(mod)
        unit, rows = row_view(w)
        N = rows.shape[0]
        k = layer_k(N, cfg)
        require_k(k, N, f"layer {name} ({N} rows)")
        labels, book = _rows_kmeans(rows, k, cfg, name)
        lead = w.shape[:3] if unit == "row" else w.shape
        cw = ClusteredWeight(unit=unit, shape=tuple(w.shape), codebook=book,
                             index=labels.reshape(lead).to(narrowest_uint(k - 1)), method="dkm",
                             zero_centroid=cfg.sparsity > 0)
        plan.layers[name] = cw
        plan.report[name] = {"rows": N, "K": k, "rate": k / N,
                             "relative_error": float((cw.decode() - w).norm() / w.norm().clamp_min(1e-30))}
    return plan


def _rows_kmeans(rows: torch.Tensor, k: int, cfg: DKMConfig, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (N,), codebook (k, s); with sparsity, row 0 of the codebook is zero."""
    if cfg.sparsity <= 0:
        res = kmeans(rows, k, iters=cfg.iters, seed=cfg.seed)
        return res.labels[0], res.centroids[0, :k].contiguous()
    if k < 2:
        raise UsageError(f"layer {name}: --sparsity needs K >= 2 (one zero cluster plus at least one)")
    n_zero = int(round(cfg.sparsity * rows.shape[0]))
    order = rows.norm(dim=1).argsort(stable=True)
    rest = order[n_zero:]
    require_k(k - 1, rest.numel(), f"layer {name} after the sparsity cluster")
    res = kmeans(rows[rest], k - 1, iters=cfg.iters, seed=cfg.seed)
    labels = torch.zeros(rows.shape[0], dtype=torch.int64)
    labels[rest] = res.labels[0] + 1
    book = torch.cat([torch.zeros(1, rows.shape[1]), res.centroids[0, : k - 1]])
    return labels, book.contiguous()
