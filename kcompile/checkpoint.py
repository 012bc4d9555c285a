"""The self-describing clustered checkpoint (`kcompile.save`, and its loader).

The file is a plain dict of tensors, strings and numbers (``torch.load(weights_only=True)``
reads it)::

    format            "kcompile-clustered"      format_version  1
    kcompile_version  str                       arch            {"spec", "kwargs"} or pt2 bytes
    method            {"method", "config"}      report          per-layer clustering report
    state             the dense state_dict minus the clustered layers
    layers            {name: the layer's IR tensors + conv geometry + bias}
    codebooks         {key: (K, D) tensor} for codebooks shared by several layers
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import __version__
from .errors import KcompileError
from .fileio import atomic_path
from .ir import ClusteredWeight
from .layers import ClusteredConv2d, clustered_layers

FORMAT = "kcompile-clustered"
_IR_TENSORS = ("index", "transform", "transform_perms", "offset", "pruned", "full")


def to_checkpoint(model: nn.Module, arch: dict | None = None) -> dict:
    """The checkpoint dict of a (clustered or dense) model."""
    arch = arch or getattr(model, "kcompile_arch", None)
    if arch is None:
        raise KcompileError("model has no architecture record: load it with kcompile.load() or pass arch={'spec': ...}")
    layers, codebooks = {}, {}
    clustered = clustered_layers(model)
    for name, mod in clustered:
        cw = mod.clustered_weight().detached()
        entry = {"kind": "conv" if isinstance(mod, ClusteredConv2d) else "linear", "unit": cw.unit,
                 "shape": tuple(cw.shape), "method": cw.method, "zero_centroid": cw.zero_centroid,
                 "codebook_key": cw.codebook_key, "extra": dict(cw.extra),
                 "scale": None if cw.scale is None else cw.scale.clone(),
                 "bias": None if mod.bias is None else mod.bias.detach().clone()}
        for t in _IR_TENSORS:
            entry[t] = getattr(cw, t)
        if cw.codebook_key:
            codebooks[cw.codebook_key] = cw.codebook.clone()
        else:
            entry["codebook"] = cw.codebook.clone()
        if entry["kind"] == "conv":
            entry.update(mod.conv_params())
        layers[name] = entry
    prefixes = tuple(n + "." for n, _ in clustered)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    return {"format": FORMAT, "format_version": 1, "kcompile_version": __version__, "arch": arch,
            "method": getattr(model, "kcompile_method", None), "report": getattr(model, "kcompile_report", {}),
            "state": state, "layers": layers, "codebooks": codebooks}


def save(model: nn.Module, path, arch: dict | None = None) -> None:
    """Write ``model`` to ``path`` atomically (no partial file on failure)."""
    obj = to_checkpoint(model, arch)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_clustered(obj: dict) -> nn.Module:
    """Rebuild the model stored in a checkpoint dict (outputs bit-identical to the saved one)."""
    from .cluster import make_layer
    from .layers import set_submodule
    from .loading import rebuild_arch

    if obj.get("format_version") != 1:
        raise KcompileError(f"unsupported kcompile checkpoint version {obj.get('format_version')!r}")
    model = rebuild_arch(obj["arch"])
    shared = {k: nn.Parameter(v.float().clone()) for k, v in obj["codebooks"].items()}
    for name, e in obj["layers"].items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise KcompileError(f"checkpoint layer {name} does not exist in architecture {obj['arch'].get('spec')}") from None
        key = e["codebook_key"]
        book = shared[key] if key else e["codebook"]
        cw = ClusteredWeight(unit=e["unit"], shape=tuple(e["shape"]), codebook=book, method=e["method"],
                             scale=e["scale"], zero_centroid=e["zero_centroid"], codebook_key=key,
                             extra=e.get("extra", {}), **{t: e[t] for t in _IR_TENSORS})
        if tuple(mod.weight.shape) != tuple(e["shape"]):
            raise KcompileError(f"checkpoint layer {name} has shape {tuple(e['shape'])}, architecture has {tuple(mod.weight.shape)}")
        new = make_layer(mod, cw, shared[key] if key else None)
        if new.bias is None and e["bias"] is not None or new.bias is not None and e["bias"] is None:
            raise KcompileError(f"checkpoint layer {name}: bias does not match the architecture")
        if e["bias"] is not None:
            new.bias = nn.Parameter(e["bias"].clone())
        set_submodule(model, name, new)
    prefixes = tuple(n + "." for n in obj["layers"])
    result = model.load_state_dict(obj["state"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise KcompileError(f"checkpoint does not match its architecture: {'missing' if missing else 'unexpected'} key {bad}")
    model.kcompile_arch = obj["arch"]
    model.kcompile_method = obj["method"]
    model.kcompile_report = obj.get("report", {})
    model.eval()
    return model
