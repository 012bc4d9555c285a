"""`kcompile.cluster`: run a clustering method and swap the planned layers into a copy."""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn

from .errors import UsageError
from .ir import ClusteredWeight
from .layers import ClusteredConv2d, ClusteredLinear, clustered_layers, set_submodule
from .methods.common import ClusterPlan
from .methods.dkm import DKMConfig, cluster_dkm
from .methods.filter import FilterConfig, cluster_filter
from .methods.kse import KSEConfig, cluster_kse
from .methods.son import SonConfig, cluster_son

METHODS = {
    "son": (SonConfig, cluster_son),
    "kse": (KSEConfig, cluster_kse),
    "dkm": (DKMConfig, cluster_dkm),
    "filter": (FilterConfig, cluster_filter),
}


def make_config(method: str, opts: dict):
    """The method's frozen config from keyword options (None values mean 'default')."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    cls = METHODS[method][0]
    names = {f.name for f in dataclasses.fields(cls)}
    opts = {k: v for k, v in opts.items() if v is not None}
    unknown = sorted(set(opts) - names)
    if unknown:
        raise UsageError(f"method {method!r} has no option {', '.join(unknown)} (options: {', '.join(sorted(names))})")
    if "skip" in opts:
        skip = opts["skip"]
        opts["skip"] = tuple(s for s in (skip.split(",") if isinstance(skip, str) else skip) if s)
    if isinstance(opts.get("wcss_range"), str):
        try:
            lo, hi = (float(v) for v in opts["wcss_range"].split("-"))
        except ValueError:
            raise UsageError(f"--wcss-range must look like 0.9-1.0 (got {opts['wcss_range']!r})") from None
        opts["wcss_range"] = (lo, hi)
    return cls(**opts)


def cluster(model: nn.Module, method: str = "son", **opts) -> nn.Module:
    """A clustered copy of ``model`` (which is not modified).

    ``method`` in {son, kse, dkm, filter}; ``opts`` are the method's options (CONTRACT).
    The copy carries ``kcompile_method`` ({"method", "config"}) and ``kcompile_report``.
    """
    if clustered_layers(model):
        raise UsageError("model is already clustered; cluster the dense model instead")
    cfg = make_config(method, opts)
    with torch.no_grad():
        plan = METHODS[method][1](model, cfg)
    cm = copy.deepcopy(model)
    apply_plan(cm, plan)
    cm.kcompile_method = {"method": method, "config": dataclasses.asdict(cfg)}
    cm.kcompile_report = plan.report
    return cm


def apply_plan(model: nn.Module, plan: ClusterPlan) -> None:
    """Replace each planned nn.Conv2d / nn.Linear of ``model`` by its clustered module, in place.

    Layers sharing a codebook key share one nn.Parameter.
    """
    shared = {key: nn.Parameter(t.detach().float().clone()) for key, t in plan.codebooks.items()}
    for name, cw in plan.layers.items():
        mod = model.get_submodule(name)
        book = shared.get(cw.codebook_key) if cw.codebook_key else None
        set_submodule(model, name, make_layer(mod, cw, book))


def make_layer(mod: nn.Module, cw: ClusteredWeight, book: nn.Parameter | None) -> nn.Module:
    """The clustered replacement of a dense nn.Conv2d or nn.Linear."""
    if isinstance(mod, nn.Conv2d):
        return ClusteredConv2d.from_conv(mod, cw, book)
    if isinstance(mod, nn.Linear):
        return ClusteredLinear.from_linear(mod, cw, book)
    raise TypeError(f"cannot cluster a {type(mod).__name__}")
