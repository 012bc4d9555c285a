"""`kcompile inspect`: per-layer storage, each method's own compression accounting, FLOPs."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .ir import ClusteredWeight, bits_for
from .layers import ClusteredConv2d, ClusteredLinear, clustered_layers


def default_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The zoo's input shape for a zoo model, else None."""
    spec = (getattr(model, "kcompile_arch", None) or {}).get("spec", "")
    if spec.startswith("zoo:"):
        from .zoo import input_shape

        return tuple(input_shape(spec[4:]))
    return None


def output_sizes(model: nn.Module, input_shape) -> dict[str, tuple[int, int]]:
    """(H', W') of every conv-like layer's output for one input of ``input_shape`` (N forced to 1)."""
    sizes, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, ClusteredConv2d)):
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: sizes.__setitem__(n, tuple(o.shape[-2:]))))
        elif isinstance(mod, (nn.Linear, ClusteredLinear)):
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: sizes.__setitem__(n, (1, 1))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *tuple(input_shape)[1:])))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sizes


def _codebook_units(layers) -> dict[str, int]:
    units: dict[str, int] = {}
    for _, mod in layers:
        if mod.codebook_key:
            units[mod.codebook_key] = units.get(mod.codebook_key, 0) + mod.index.numel()
    return units


def method_ratio(method: str, cws: list[ClusteredWeight]) -> dict:
    """The compression ratio under the method's own published accounting (32-bit weights)."""
    num = den = 0.0
    if method == "son":
        groups: dict[str, list[ClusteredWeight]] = {}
        for cw in cws:
            groups.setdefault(cw.codebook_key or str(id(cw)), []).append(cw)
        for g in groups.values():
            N, K, D, T = sum(c.num_units for c in g), g[0].K, g[0].D, g[0].num_transforms
            num += N * 32 * D
            den += N * (bits_for(K * T) + 16) + K * 32 * D
        return {"son": num / den}
    if method == "kse":
        for cw in cws:
            O = cw.shape[0]
            num += O * cw.shape[1] * cw.D * 32
            den += sum(q * cw.D * 32 + (O * math.log2(q) if q > 1 else 0) for q in cw.book_sizes().tolist())
        return {"kse_r_comp": num / den}
    if method == "dkm":
        den_e = 0.0
        for cw in cws:
            N, s, K = cw.num_units, cw.D, cw.K
            num += N * s * 32
            den += N * bits_for(K) + K * s * 32
            den_e += N * cw.entropy_index_bits() + K * s * 32
        return {"dkm_plain": num / den, "dkm_entropy_coded": num / den_e}
    if method == "filter":
        for cw in cws:
            O, n, D = cw.shape[0], cw.K, cw.D
            num += O * D * 32
            den += n * D * 32 + O * bits_for(n)
        return {"filter": num / den}
    return {}


def inspect_model(model: nn.Module, input_shape=None) -> dict:
    """JSON-able report: per layer storage and MACs, model totals, per-method ratios."""
    layers = clustered_layers(model)
    input_shape = input_shape or default_input_shape(model)
    sizes = output_sizes(model, input_shape) if input_shape else {}
    book_units = _codebook_units(layers)
    rows, by_method = [], {}
    clustered_dense = clustered_comp = 0.0
    for name, mod in layers:
        cw = mod.clustered_weight().detached()
        share = mod.index.numel() / book_units[cw.codebook_key] if cw.codebook_key else 1.0
        bits = cw.storage_bits(share)
        dense_bytes = math.prod(cw.shape) * 4
        row = {"name": name, "method": cw.method, "unit": cw.unit, "K": cw.K,
               "index_bits": cw.index_bits(), "dense_bytes": dense_bytes,
               "compressed_bytes": math.ceil(bits["total"] / 8),
               "shape": list(cw.shape), "shared_codebook": cw.codebook_key}
        if name in sizes:
            groups = mod.groups if isinstance(mod, ClusteredConv2d) else 1
            macs = cw.conv_macs(sizes[name], groups)
            row.update({"macs_dense": macs["dense"], "macs_shared": macs["shared"], "macs_form": macs["form"]})
        rows.append(row)
        by_method.setdefault(cw.method, []).append(cw)
        clustered_dense += dense_bytes
        clustered_comp += bits["total"] / 8
    prefixes = tuple(n + "." for n, _ in layers)
    # parameters outside the clustered layers, plus the clustered layers' biases, stay fp32
    dense_rest = sum(p.numel() * 4 for n, p in model.named_parameters() if not n.startswith(prefixes))
    dense_rest += sum(m.bias.numel() * 4 for _, m in layers if m.bias is not None)
    dense_macs = shared_macs = 0
    for name, mod in model.named_modules():
        if name not in sizes:
            continue
        row = next((r for r in rows if r["name"] == name), None)
        if row is not None:
            dense_macs += row["macs_dense"]
            shared_macs += row["macs_shared"]
        elif isinstance(mod, (nn.Conv2d, nn.Linear)):
            m = mod.weight.numel() * sizes[name][0] * sizes[name][1]
            dense_macs += m
            shared_macs += m
    ratios = {}
    for method, cws in by_method.items():
        ratios.update(method_ratio(method, cws))
    return {
        "layers": rows,
        "input_shape": list(input_shape) if input_shape else None,
        "clustered_layers_ratio": clustered_dense / clustered_comp if clustered_comp else 1.0,
        "compression_ratio": (dense_rest + clustered_dense) / (dense_rest + clustered_comp),
        "dense_bytes": int(dense_rest + clustered_dense),
        "compressed_bytes": math.ceil(dense_rest + clustered_comp),
        "method_ratios": ratios,
        "macs_dense": dense_macs if sizes else None,
        "macs_clustered": shared_macs if sizes else None,
    }
