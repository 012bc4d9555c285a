"""Per-layer descriptions (``LayerSpec``) and their sharing-aware operation counts.

A ``LayerSpec`` is everything the cost models need about one conv or linear layer: the
weight shape (O, C/groups, kh, kw) (a linear layer is a 1x1 conv: (O, I, 1, 1)), the input
(N, C, H, W), the output size (H', W'), groups, bias, and, for a clustered layer, its
``ClusteredWeight`` IR. Specs can be built by hand or from a model by ``describe_model``,
which runs one forward pass with hooks and duck-types clustered layers (anything with a
``clustered_weight()`` method; convs also have ``conv_params()``), so this package never
imports ``kcompile.layers``. Every other leaf module that does work is reported as *not
modelled* with an estimate of its MACs; nothing is dropped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from kcompile.errors import KcompileError, UsageError
from kcompile.ir import ClusteredWeight

#: Leaf modules that do no arithmetic worth listing.
_NO_WORK = (nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten)


@dataclass(frozen=True)
class LayerSpec:
    """One conv/linear layer. Shapes: weight (O, Cg, kh, kw); input (N, C, H, W); out (H', W')."""

    name: str
    kind: str                      # conv, linear, clustered-conv, clustered-linear
    weight_shape: tuple[int, int, int, int]
    in_shape: tuple[int, int, int, int]
    out_hw: tuple[int, int]
    groups: int = 1
    bias: bool = False
    cw: ClusteredWeight | None = None
    codebook_share: float = 1.0    # share of a shared codebook charged to this layer

    @property
    def batch(self) -> int:
        return self.in_shape[0]

    @property
    def O(self) -> int:
        return self.weight_shape[0]

    @property
    def Cg(self) -> int:
        return self.weight_shape[1]

    @property
    def P(self) -> int:
        """Output positions per image, H' * W'."""
        return self.out_hw[0] * self.out_hw[1]

    @property
    def D(self) -> int:
        """Length of one dense dot product, Cg * kh * kw."""
        return self.weight_shape[1] * self.weight_shape[2] * self.weight_shape[3]

    @property
    def dense_macs(self) -> int:
        return self.batch * self.O * self.D * self.P

    @property
    def clustered(self) -> bool:
        return self.cw is not None


@dataclass(frozen=True)
class OpCounts:
    """Per-image counts of one layer as deployed (sharing-aware), see ``op_counts``.

    macs       MAC-equivalents: products + accumulations (dense: O*D*P)
    products   scalar multiplications (dense: O*D*P)
    accum      accumulations of shared products into outputs (0 when not factorised)
    o_eff      output channels actually computed (filter unit: distinct filters n)
    kept       fraction of input channels not pruned (KSE)
    form       dense, decode-dense, conv-then-add, add-then-conv or filter-gather
    """

    macs: int
    products: int
    accum: int
    o_eff: int
    kept: float
    form: str


def op_counts(spec: LayerSpec, factorise: bool = True) -> OpCounts:
    """Sharing-aware per-image op counts: the cheaper of the factorised form and decode-then-dense.

    ``factorise=False`` models hardware without a factorised datapath: every clustered layer
    runs decode-then-dense (pruned input channels are still skipped).
    """
    dense = spec.O * spec.D * spec.P
    if spec.cw is None:
        return OpCounts(dense, dense, 0, spec.O, 1.0, "dense")
    cw = spec.cw
    kept = 1.0
    if cw.pruned is not None and len(cw.shape) >= 2:
        kept = float((~cw.pruned).sum()) / cw.shape[1]
    if not factorise:
        return OpCounts(int(dense * kept), int(dense * kept), 0, spec.O, kept, "decode-dense")
    try:
        cm = cw.conv_macs(spec.out_hw, spec.groups)
    except Exception:  # a unit/shape the IR cannot count: deployed as decode-then-dense
        cm = {"dense": dense, "shared": dense, "form": "decode-dense"}
    shared = int(cm["shared"])
    if cm["form"] == "filter-gather":
        # filters shared across groups of a grouped conv see different inputs: count
        # distinct (group, filter) pairs (ClusteredWeight.conv_macs ignores groups here)
        ids = cw.global_index().reshape(-1)
        group = torch.arange(ids.numel()) // max(1, ids.numel() // max(1, spec.groups))
        n = int(torch.unique(group * (int(ids.max()) + 1) + ids).numel())
        shared = n * spec.D * spec.P
        if shared < dense:
            return OpCounts(shared, shared, 0, n, kept, "filter-gather")
        return OpCounts(dense, dense, 0, spec.O, kept, "decode-dense")
    units_per_out = cw.num_units // cw.shape[0]
    if cw.pruned is not None:
        units_per_out = units_per_out * int((~cw.pruned).sum()) // cw.shape[1]
    accum = spec.O * units_per_out * spec.P
    if shared >= dense:
        return OpCounts(int(dense * kept), int(dense * kept), 0, spec.O, kept, "decode-dense")
    return OpCounts(shared, shared - accum, accum, spec.O, kept, cm["form"])


def weight_bits(spec: LayerSpec, bw: int) -> float:
    """Bits the layer stores for its weight at ``bw``-bit values (clustered: ``cw.storage_bits``)."""
    if spec.cw is None:
        return float(spec.O * spec.D * bw)
    return float(spec.cw.storage_bits(codebook_share=spec.codebook_share, value_bits=bw)["total"])


def index_bits(spec: LayerSpec) -> int:
    return 0 if spec.cw is None else int(spec.cw.index_bits())


# ------------------------------------------------------------------------------ from a model
@dataclass(frozen=True)
class NotModelled:
    """A leaf module the energy model does not know, with its MACs per forward (batch included)."""

    name: str
    kind: str
    macs: int


def _is_clustered(mod: nn.Module) -> bool:
    return callable(getattr(mod, "clustered_weight", None))


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _other_macs(mod: nn.Module, inp: torch.Tensor | None, out) -> int:
    """A rough MAC count for a module the model does not cover (documented as such)."""
    if not isinstance(out, torch.Tensor):
        return 0
    w = getattr(mod, "weight", None)
    if isinstance(w, torch.Tensor) and w.ndim >= 2:
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and inp is not None:
            return int(inp.numel() * w[0].numel())
        if isinstance(mod, nn.Embedding):
            return 0
        return int(out.numel() * w[0].numel())  # each output: one dot product with a weight row
    return int(out.numel())  # elementwise / pooling / normalisation: ~one op per output


def describe_model(model: nn.Module, input_shape) -> tuple[list[LayerSpec], list[NotModelled]]:
    """LayerSpecs of every conv/linear layer (dense or clustered) and the not-modelled rest.

    Runs one forward pass on zeros of ``input_shape`` in eval mode (the model is not modified:
    hooks are removed and the training flag restored).
    """
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) < 2 or min(input_shape) < 1:
        raise UsageError(f"invalid input shape {input_shape}: expected positive N,C,H,W")
    records: list = []
    hooks = []
    for name, mod in model.named_modules():
        if _is_clustered(mod) or isinstance(mod, (nn.Conv2d, nn.Linear)):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, n=name: records.append(("layer", n, m, i[0] if i else None, o))))
        elif len(list(mod.children())) == 0 and not isinstance(mod, _NO_WORK):
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, n=name: records.append(("other", n, m, i[0] if i else None, o))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KcompileError(f"cannot run the model on an input of shape {input_shape}: {msg}") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    specs, others, seen = [], [], set()
    for what, name, mod, inp, out in records:
        if name in seen:  # a module called twice: counted once per call under a suffixed name
            k = 2
            while f"{name}#{k}" in seen:
                k += 1
            name = f"{name}#{k}"
        seen.add(name)
        if what == "other":
            others.append(NotModelled(name, type(mod).__name__, _other_macs(mod, inp, out)))
            continue
        spec = _spec_of(name, mod, inp, out)
        if spec is None:
            others.append(NotModelled(name, type(mod).__name__, _other_macs(mod, inp, out)))
        else:
            specs.append(spec)
    return _share_codebooks(specs), others


def _spec_of(name: str, mod: nn.Module, inp, out) -> LayerSpec | None:
    if not isinstance(inp, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    cw = None
    if _is_clustered(mod):
        try:
            cw = mod.clustered_weight().detached()
        except Exception:
            return None
    is_conv = isinstance(mod, nn.Conv2d) or (cw is not None and callable(getattr(mod, "conv_params", None)))
    bias = getattr(mod, "bias", None) is not None
    if is_conv:
        if inp.ndim != 4:
            return None
        if cw is not None:
            shape = tuple(cw.shape)
            groups = int(mod.conv_params().get("groups", 1))
        else:
            shape = tuple(mod.weight.shape)
            groups = int(mod.groups)
        if len(shape) != 4:
            return None
        kind = "clustered-conv" if cw is not None else "conv"
        return LayerSpec(name, kind, shape, tuple(inp.shape), tuple(out.shape[-2:]), groups, bias, cw)
    # linear: leading dims are independent positions
    shape = tuple(cw.shape) if cw is not None else tuple(mod.weight.shape)
    if len(shape) != 2 or inp.ndim < 2:
        return None
    batch = int(inp.shape[0])
    positions = int(math.prod(inp.shape[1:-1]))
    kind = "clustered-linear" if cw is not None else "linear"
    return LayerSpec(name, kind, (shape[0], shape[1], 1, 1), (batch, shape[1], positions, 1),
                     (positions, 1), 1, bias, cw)


def _share_codebooks(specs: list[LayerSpec]) -> list[LayerSpec]:
    """Charge a codebook shared by several layers (Son's network scope) by their unit counts."""
    units: dict[str, int] = {}
    for s in specs:
        if s.cw is not None and s.cw.codebook_key:
            units[s.cw.codebook_key] = units.get(s.cw.codebook_key, 0) + s.cw.num_units
    if not units:
        return specs
    from dataclasses import replace

    return [replace(s, codebook_share=s.cw.num_units / units[s.cw.codebook_key])
            if s.cw is not None and s.cw.codebook_key else s for s in specs]
