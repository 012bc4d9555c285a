"""Son, Nah, Lee (ECCV 2018): normalised 2-D kernels clustered into shared codebooks.

Every kh x kw kernel (kh*kw > 1) is divided by s = sign(centre) * ||kernel||_2 (sign 0 -> +1;
an all-zero kernel gets s = 0 and index 0), the unit kernels are clustered with k-means
(optionally transform-invariant: Son's TIC over a subset of D4), and the layer stores
index + fp16 scale (+ transform id). Scopes: one codebook per kernel size for the whole
network, one per layer, or per range of layers (``"0-0=64,1-16=256"``, 0-based indices over
the eligible convs; layers outside every range stay dense).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import UsageError
from ..ir import ClusteredWeight, narrowest_uint
from ..kmeans import d4_permutations, kmeans
from .common import ClusterPlan, ClusterWarning, conv_weight, find_layers, require_k, require_layers


@dataclass(frozen=True)
class SonConfig:
    k: int = 256
    scope: str = "network"
    transforms: int = 1
    seed: int = 0
    skip: tuple[str, ...] = ()
    iters: int = 50


def parse_scope(scope: str, n_layers: int, k_default: int) -> list[tuple[str, list[int], int]]:
    """Scope string -> [(group name, eligible-layer positions, K)].

    ``network`` -> one group; ``layer`` -> one group per layer; ``"a-b=K,..."`` -> ranges.
    """
    if scope == "network":
        return [("network", list(range(n_layers)), k_default)]
    if scope == "layer":
        return [(f"layer{i}", [i], k_default) for i in range(n_layers)]
    groups, seen = [], set()
    for part in scope.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*=\s*(\d+)\s*", part)
        if not m:
            raise UsageError(f"invalid --scope part {part!r}: expected network, layer or ranges like 0-0=64,1-16=256")
        a, b, k = map(int, m.groups())
        if a > b or b >= n_layers:
            raise UsageError(f"--scope range {a}-{b} is outside the {n_layers} eligible conv layers (0-{n_layers - 1})")
        members = list(range(a, b + 1))
        if seen & set(members):
            raise UsageError(f"--scope ranges overlap at layer {min(seen & set(members))}")
        seen |= set(members)
        groups.append((f"{a}-{b}", members, k))
    return groups


def normalise(kernels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels (N, D) -> (units (N, D), scales (N,)) with units * scale == kernels.

    scale = sign(centre) * ||k||_2, centre = D // 2, sign(0) = +1; zero kernels: scale 0, unit 0.
    """
    norm = kernels.norm(dim=1)
    sign = torch.where(kernels[:, kernels.shape[1] // 2] < 0, -1.0, 1.0)
    scale = sign * norm
    units = kernels / torch.where(scale == 0, 1.0, scale)[:, None]  # zero kernels stay 0
    return units, scale


def cluster_son(model: nn.Module, cfg: SonConfig) -> ClusterPlan:
    """Plan Son's kernel clustering for every eligible conv of ``model`` (not modified)."""
    if cfg.transforms not in (1, 2, 4, 8):
        raise UsageError(f"--transforms must be 1, 2, 4 or 8 (got {cfg.transforms})")
    layers = find_layers(model, (nn.Conv2d,), cfg.skip, where=lambda m: m.kernel_size[0] * m.kernel_size[1] > 1)
    require_layers(layers, "son", "convs with kernels larger than 1x1")
    plan = ClusterPlan()
    for gname, members, k in parse_scope(cfg.scope, len(layers), cfg.k):
        by_size: dict[tuple[int, int], list[tuple[str, nn.Conv2d]]] = {}
        for i in members:
            by_size.setdefault(tuple(layers[i][1].kernel_size), []).append(layers[i])
        for (kh, kw), group in by_size.items():
            key = f"son/{gname}/{kh}x{kw}"
            n = sum(m.weight.shape[0] * m.weight.shape[1] for _, m in group)
            if cfg.scope == "network" and n < k and len(by_size) > 1:
                # a whole-network K is meant for the common kernel size; a rare size (a 7x7
                # stem) with fewer kernels than K stays dense, as in the paper's ranges
                warnings.warn(f"{kh}x{kw} convs ({', '.join(nm for nm, _ in group)}) have only {n} kernels for "
                              f"K={k}: kept dense (give them their own K with --scope ranges)", ClusterWarning)
                continue
            _cluster_group(plan, key, group, k, (kh, kw), cfg)
    require_layers(list(plan.layers), "son", f"kernel-size groups with at least K={cfg.k} kernels")
    return plan


def _cluster_group(plan: ClusterPlan, key: str, group, k: int, ksize, cfg: SonConfig) -> None:
    kh, kw = ksize
    weights = [conv_weight(m) for _, m in group]
    kernels = torch.cat([w.reshape(-1, kh * kw) for w in weights])
    units, scale = normalise(kernels)
    nonzero = scale != 0
    n_nonzero = int(nonzero.sum())
    names = ", ".join(n for n, _ in group) if len(group) <= 3 else f"{len(group)} layers"
    require_k(k, n_nonzero, f"codebook {key} ({n_nonzero} non-zero {kh}x{kw} kernels of {names})")
    if cfg.transforms == 8 and kh != kw:
        raise UsageError(f"--transforms 8 needs square kernels; codebook {key} has {kh}x{kw}")
    perms = d4_permutations(kh, kw, cfg.transforms) if cfg.transforms > 1 else None
    res = kmeans(units[nonzero], k, iters=cfg.iters, seed=cfg.seed, transforms=perms)
    labels = torch.zeros(len(kernels), dtype=torch.int64)
    labels[nonzero] = res.labels[0]
    trans = None
    if perms is not None:
        trans = torch.zeros(len(kernels), dtype=torch.int64)
        trans[nonzero] = res.transform[0]
    codebook = res.centroids[0, :k].contiguous()
    plan.codebooks[key] = codebook
    scale16 = scale.to(torch.float16)
    start = 0
    for (name, mod), w in zip(group, weights):
        n = w.shape[0] * w.shape[1]
        sl = slice(start, start + n)
        start += n
        cw = ClusteredWeight(
            unit="kernel", shape=tuple(w.shape), codebook=codebook,
            index=labels[sl].reshape(w.shape[:2]).to(narrowest_uint(k - 1)), method="son",
            scale=scale16[sl].reshape(w.shape[:2]),
            transform=None if trans is None else trans[sl].reshape(w.shape[:2]).to(torch.uint8),
            transform_perms=perms, codebook_key=key,
        )
        plan.layers[name] = cw
        err = (cw.decode() - w).norm() / w.norm().clamp_min(1e-30)
        plan.report[name] = {"codebook": key, "K": k, "transforms": cfg.transforms,
                             "relative_error": float(err)}
