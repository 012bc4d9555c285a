"""Build the ONNX graph of a (clustered) model: one ``com.kcompile`` node per clustered layer.

Route: every clustered layer is temporarily swapped for a stub (an autograd Function whose
traced value is zeros of the layer's output shape) that torch's TorchScript exporter writes as
a placeholder node of domain ``com.kcompile`` with the output's type (so no exporter pass can
fold a batch-norm or anything else into the layer's weight, and no conv is computed);
the placeholders are then replaced by ``ClusteredConv`` / ``ClusteredGemm`` nodes whose
codebook, index, scales, ... are written here from the layer's IR (``ClusteredWeight``), and
the function bodies of ``kcompile.onnx_functions`` are attached. Dense layers are exported by
torch as standard ops (torch folds eval-mode batch-norm into *dense* convs only, as
onnxruntime would at load time anyway).

Names: each custom node is named by the torch module path (``layer1.0.conv1``); its
initializers are ``<path>.codebook``, ``<path>.index``, ... (a shared codebook is
``codebooks.<key>``); neutral inputs are shared ``kc.*`` initializers (see onnx_functions).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, numpy_helper
from onnx import helper as h

from . import onnx_functions as F
from .errors import KcompileError
from .ir import UNITS, ClusteredWeight, narrowest_uint
from .layers import ClusteredConv2d, ClusteredLinear, clustered_layers

PLACEHOLDER = "KcPlaceholder"


class ExportWarning(UserWarning):
    """A layer kcompile cannot express as a com.kcompile op (written as a dense fallback)."""


# ----------------------------------------------------------------------------- layer checks
def _pads(mod: ClusteredConv2d) -> list[int]:
    """ONNX pads [top, left, bottom, right] of a clustered conv (torch's 'same' is asymmetric)."""
    kh, kw = mod.weight_shape[2:]
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            return [0, 0, 0, 0]
        if mod.padding != "same":
            raise ValueError(f"padding {mod.padding!r}")
        tot = [d * (k - 1) for d, k in zip(mod.dilation, (kh, kw))]
        return [tot[0] // 2, tot[1] // 2, tot[0] - tot[0] // 2, tot[1] - tot[1] // 2]
    ph, pw = mod.padding
    return [int(ph), int(pw), int(ph), int(pw)]


def unsupported_reason(mod: nn.Module) -> str | None:
    """Why ``mod`` cannot be a com.kcompile node (None when it can)."""
    base = ClusteredConv2d if isinstance(mod, ClusteredConv2d) else ClusteredLinear
    if type(mod).forward is not base.forward:
        return f"{type(mod).__name__} overrides forward"
    if mod.unit not in UNITS:
        return f"unknown unit {mod.unit!r}"
    if isinstance(mod, ClusteredConv2d):
        if len(mod.weight_shape) != 4:
            return f"conv weight shape {mod.weight_shape} is not 4-D"
        try:
            _pads(mod)
        except ValueError:
            return f"padding {mod.padding!r} is not expressible"
    if mod.index.dtype.is_floating_point or mod.index.dtype == torch.bool:
        return f"index dtype {mod.index.dtype} is not an integer type"
    if mod.index.is_signed() and mod.index.numel() and int(mod.index.min()) < 0:
        return "negative indices"
    return None


# ----------------------------------------------------------------------------- tensors
def _np_index(index: torch.Tensor, bits4: bool) -> tuple[np.ndarray, int | None]:
    """Index as numpy in the narrowest unsigned type (+ ONNX UINT4 data type when asked)."""
    idx = index.to(torch.int64)
    top = int(idx.max()) if idx.numel() else 0
    if bits4 and top < 16:
        return idx.numpy().astype(np.uint8), TensorProto.UINT4
    dtype = {torch.uint8: np.uint8, torch.uint16: np.uint16, torch.uint32: np.uint32}[narrowest_uint(top)]
    return idx.numpy().astype(dtype), None


def _tensor(arr: np.ndarray, name: str, onnx_type: int | None = None) -> onnx.TensorProto:
    if onnx_type == TensorProto.UINT4:  # packed two per byte in raw_data
        import ml_dtypes

        return numpy_helper.from_array(np.ascontiguousarray(arr).astype(ml_dtypes.uint4), name)
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def export_codebook(cw: ClusteredWeight) -> np.ndarray:
    """The codebook as stored: float32 (K, D); row 0 zeroed for a zero centroid; never empty."""
    book = cw.codebook.detach().float().clone()
    if cw.zero_centroid and book.shape[0]:
        book[0] = 0
    if book.shape[0] == 0:
        book = torch.zeros(1, cw.D)
    return book.numpy()


def export_offset(cw: ClusteredWeight) -> np.ndarray | None:
    """Per-channel book offsets with pruned channels pointed at row 0 (their weights are masked)."""
    if cw.offset is None:
        return None
    off = cw.offset.detach().to(torch.int64).clone()
    if cw.pruned is not None:
        off[cw.pruned.bool()] = 0
    return off.numpy()


class _Initializers:
    """Initializers of the custom nodes, deduplicated (shared codebooks, neutral inputs)."""

    def __init__(self, shared_keys=()) -> None:
        self.tensors: dict[str, onnx.TensorProto] = {}
        self._books: dict[object, str] = {}
        self.shared_keys = set(shared_keys)  # codebook keys used by several layers

    def add(self, name: str, arr: np.ndarray, onnx_type: int | None = None) -> str:
        if name not in self.tensors:
            self.tensors[name] = _tensor(arr, name, onnx_type)
        return name

    def codebook(self, layer: str, cw: ClusteredWeight, book_id=None) -> str:
        if cw.codebook_key and cw.codebook_key in self.shared_keys:
            key = ("key", cw.codebook_key, cw.zero_centroid)
        else:
            key = ("param", book_id if book_id is not None else layer, cw.zero_centroid)
        if key not in self._books:
            name = f"codebooks.{cw.codebook_key}" if key[0] == "key" else f"{layer}.codebook"
            self._books[key] = self.add(name, export_codebook(cw))
        return self._books[key]

    def neutral(self, what: str, D: int = 0) -> str:
        if what == "scale":
            return self.add("kc.one_f16", np.ones(1, np.float16))
        if what == "perms":
            return self.add(f"kc.identity_perm_{D}", np.arange(D, dtype=np.int64)[None])
        if what == "transform":
            return self.add("kc.zero_u8", np.zeros(1, np.uint8))
        if what == "offset":
            return self.add("kc.zero_i64", np.zeros(1, np.int64))
        if what == "keep":
            return self.add("kc.one_f32", np.ones(1, np.float32))
        if what == "bias":
            return self.add("kc.zero_f32", np.zeros(1, np.float32))
        raise KeyError(what)


def conv_attrs(mod: ClusteredConv2d) -> dict:
    """ONNX Conv attributes of a clustered conv."""
    return {"strides": list(mod.stride), "pads": _pads(mod), "dilations": list(mod.dilation), "group": int(mod.groups)}


def custom_node(layer: str, mod: nn.Module, x: str, y: str, inits: _Initializers,
                index_bits4: bool = False) -> onnx.NodeProto:
    """The ``com.kcompile`` node of clustered layer ``mod`` (named ``layer``): x -> y."""
    with torch.no_grad():
        cw = mod.clustered_weight().detached()
    bias = None if mod.bias is None else mod.bias.detach().float().numpy()
    conv = conv_attrs(mod) if isinstance(mod, ClusteredConv2d) else None
    return make_node(layer, cw, bias, conv, x, y, inits, index_bits4, book_id=id(mod.codebook))


def make_node(layer: str, cw: ClusteredWeight, bias: np.ndarray | None, conv: dict | None, x: str, y: str,
              inits: _Initializers, index_bits4: bool = False, book_id=None) -> onnx.NodeProto:
    """A ``ClusteredConv`` (``conv`` = its Conv attributes) or ``ClusteredGemm`` (``conv`` None)
    node computing y from x with weight ``cw``; its tensors are added to ``inits``."""
    if cw.index.numel() == 0:
        raise ValueError("empty index")
    ins = [x, inits.codebook(layer, cw, book_id)]
    idx, idx_type = _np_index(cw.index, index_bits4)
    off = export_offset(cw)
    K = max(cw.K, 1)
    g = idx.astype(np.int64) + (off.reshape(1, -1) if off is not None else 0)
    if cw.pruned is not None:  # pruned channels decode to zero whatever their index
        g = g[:, ~cw.pruned.bool().numpy()]
    if g.size and int(g.max()) >= K:
        raise ValueError(f"index {int(g.max())} out of range for {K} centroids")
    ins.append(inits.add(f"{layer}.index", idx, idx_type))
    if cw.scale is not None:
        ins.append(inits.add(f"{layer}.scale", cw.scale.detach().numpy()))
    else:
        ins.append(inits.neutral("scale"))
    if cw.transform is not None:
        ins.append(inits.add(f"{layer}.transform_perms", cw.transform_perms.to(torch.int64).numpy()))
        ins.append(inits.add(f"{layer}.transform", cw.transform.to(torch.int64).numpy().astype(np.uint8)))
    else:
        ins.append(inits.neutral("perms", cw.D))
        ins.append(inits.neutral("transform"))
    ins.append(inits.add(f"{layer}.offset", off) if off is not None else inits.neutral("offset"))
    keep = cw.keep_mask()
    ins.append(inits.add(f"{layer}.keep", keep.numpy().astype(np.float32)) if keep is not None else inits.neutral("keep"))
    attrs = {"weight_shape": list(cw.shape), "unit": cw.unit}
    if conv is not None:
        if len(cw.shape) != 4:
            raise ValueError(f"conv weight shape {cw.shape} is not 4-D")
        if bias is not None:
            ins.append(inits.add(f"{layer}.bias", np.asarray(bias, np.float32)))
        attrs.update({k: conv[k] for k in F.CONV_ATTRS})
        op = F.CONV
    else:
        if len(cw.shape) != 2:
            raise ValueError(f"linear weight shape {cw.shape} is not 2-D")
        ins.append(inits.add(f"{layer}.bias", np.asarray(bias, np.float32)) if bias is not None else inits.neutral("bias"))
        op = F.GEMM
    return h.make_node(op, ins, [y], name=layer, domain=F.DOMAIN, **attrs)


def layer_model(cw: ClusteredWeight, bias=None, conv: dict | None = None, input_shape=None,
                index_bits4: bool = False, onnx_ops: str = "custom") -> onnx.ModelProto:
    """A one-node model ``input`` -> ``output`` (a ClusteredConv when ``conv`` gives the Conv
    attributes strides/pads/dilations/group, else a ClusteredGemm); ``input_shape`` may hold
    strings for symbolic dims."""
    inits = _Initializers()
    node = make_node("layer", cw, bias, conv, "input", "output", inits, index_bits4)
    out_rank = len(input_shape)
    g = h.make_graph([node], "kcompile_layer", [h.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
                     [h.make_tensor_value_info("output", TensorProto.FLOAT, [None] * out_rank)],
                     list(inits.tensors.values()))
    m = h.make_model(g)
    _finish(m)
    return inline(m) if onnx_ops == "portable" else m


# ----------------------------------------------------------------------------- stubs
def _out_shape(mod: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """Output shape of clustered layer ``mod`` for input ``x`` (no arithmetic done)."""
    if isinstance(mod, ClusteredLinear):
        if x.shape[-1] != mod.weight_shape[1]:
            raise RuntimeError(f"layer expects {mod.weight_shape[1]} input features, got input of shape {tuple(x.shape)}")
        return (*x.shape[:-1], mod.weight_shape[0])
    if x.ndim != 4 or x.shape[1] != mod.weight_shape[1] * mod.groups:
        raise RuntimeError(f"conv expects {mod.weight_shape[1] * mod.groups} input channels, got input of shape {tuple(x.shape)}")
    t, l, b, r = _pads(mod)
    (kh, kw), (sh, sw), (dh, dw) = mod.weight_shape[2:], mod.stride, mod.dilation
    H = (x.shape[2] + t + b - dh * (kh - 1) - 1) // sh + 1
    W = (x.shape[3] + l + r - dw * (kw - 1) - 1) // sw + 1
    return (x.shape[0], mod.weight_shape[0], H, W)


def _symbolic_out_sizes(mod: nn.Module, sizes: list) -> list:
    """Output sizes of ``mod`` from input sizes that may hold None (unknown): unknown stays None."""
    if isinstance(mod, ClusteredLinear):
        return [*sizes[:-1], mod.weight_shape[0]]
    out = [sizes[0], mod.weight_shape[0], None, None]
    t, l, b, r = _pads(mod)
    for i, (n, k, s, d, p) in enumerate(zip(sizes[2:], mod.weight_shape[2:], mod.stride, mod.dilation, (t + b, l + r))):
        if n is not None:
            out[2 + i] = (n + p - d * (k - 1) - 1) // s + 1
    return out


def _placeholder_fn(mod: nn.Module, tag: str):
    """An autograd Function that the TorchScript exporter writes as a
    ``com.kcompile::KcPlaceholder`` node with attribute ``tag``, typed like ``mod``'s output.
    Its traced value is zeros of the output's shape: only shapes matter to the exporter."""

    class Placeholder(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            state = torch._C._get_tracing_state()  # record nothing inside
            torch._C._set_tracing_state(None)
            try:
                return x.new_zeros(_out_shape(mod, x))
            finally:
                torch._C._set_tracing_state(state)

        @staticmethod
        def symbolic(g, x):
            y = g.op(f"{F.DOMAIN}::{PLACEHOLDER}", x, tag_s=tag)
            sizes = x.type().varyingSizes()  # None for unknown dims (the dynamic batch, ...)
            if sizes is not None:
                y.setType(x.type().with_sizes(_symbolic_out_sizes(mod, list(sizes))))
            return y

    return Placeholder


class _Stub(nn.Module):
    def __init__(self, mod: nn.Module, tag: str) -> None:
        super().__init__()
        self._fn = _placeholder_fn(mod, tag)

    def forward(self, x):
        return self._fn.apply(x)


@contextlib.contextmanager
def _swapped(model: nn.Module, names: list[str]):
    """Swap the named clustered layers for stubs and put the model in eval mode; restore after."""
    modes = {m: m.training for m in model.modules()}
    originals = {}
    try:
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            originals[name] = (parent, child, getattr(parent, child))
            parent._modules[child] = _Stub(originals[name][2], name)
        model.eval()
        yield
    finally:
        for parent, child, mod in originals.values():
            parent._modules[child] = mod
        for m, t in modes.items():
            m.training = t


# ----------------------------------------------------------------------------- the graph
def _output_names(out) -> list[str]:
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return [f"output_{i}" for i in range(len(out))]
    raise KcompileError(f"cannot export a model returning {type(out).__name__}; expected a tensor or a tuple of tensors")


@contextlib.contextmanager
def _quiet_placeholder_warnings():
    """Drop the C++ warning torch prints on stderr for each placeholder node ("shape inference
    of com.kcompile::KcPlaceholder type is missing": its type is set by the symbolic); every
    other line written to stderr meanwhile is passed on."""
    import sys
    import tempfile

    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            rest = [ln for ln in tmp.read().decode(errors="replace").splitlines(keepends=True) if PLACEHOLDER not in ln]
            if rest:
                sys.stderr.write("".join(rest))


def _torch_export(model: nn.Module, x: torch.Tensor, dynamic_batch: bool, custom: bool) -> onnx.ModelProto:
    with torch.no_grad():
        out = model(x)
    outputs = _output_names(out)
    dyn = {n: {0: "batch"} for n in ["input", *outputs]} if dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _quiet_placeholder_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=F.TORCH_OPSET, input_names=["input"],
                          output_names=outputs, dynamic_axes=dyn, do_constant_folding=True,
                          custom_opsets={F.DOMAIN: F.DOMAIN_VERSION} if custom else None)
    return onnx.load_from_string(buf.getvalue())


def build_onnx(model: nn.Module, input_shape, dynamic_batch: bool = True, onnx_ops: str = "custom",
               index_bits4: bool = True) -> onnx.ModelProto:
    """The ONNX model of ``model`` for inputs of ``input_shape`` (N, C, H, W).

    ``dynamic_batch``: the batch dimension is a symbol ``batch`` (else fixed to N).
    ``onnx_ops``: ``custom`` (com.kcompile nodes with function bodies) or ``portable``
    (the same model with the functions inlined: standard ops only).
    ``index_bits4``: store the indices of a layer whose largest index is < 16 as UINT4 (packed
    two per byte; onnxruntime 1.31 casts them), else in the narrowest of uint8/16/32.
    Warns (ExportWarning) for each clustered layer it cannot express and exports that one as a
    dense fallback.
    """
    if onnx_ops not in ("custom", "portable"):
        raise KcompileError(f"unknown onnx_ops {onnx_ops!r}: expected custom or portable")
    layers = {}
    for name, mod in clustered_layers(model):
        reason = unsupported_reason(mod)
        if reason:
            warnings.warn(f"layer {name}: {reason}; exported as a dense fallback", ExportWarning, stacklevel=3)
        else:
            layers[name] = mod
    n = int(input_shape[0]) if not dynamic_batch else max(2, int(input_shape[0]))
    x = torch.randn((n, *[int(v) for v in input_shape[1:]]), generator=torch.Generator().manual_seed(0))
    with _swapped(model, list(layers)):
        m = _torch_export(model, x, dynamic_batch, bool(layers))
    keys = [mod.codebook_key for mod in layers.values() if mod.codebook_key]
    inits = _Initializers({k for k in keys if keys.count(k) > 1})
    nodes = []
    for node in m.graph.node:
        if node.domain == F.DOMAIN and node.op_type == PLACEHOLDER:
            name = node.attribute[0].s.decode()
            try:
                nodes.append(custom_node(name, layers[name], node.input[0], node.output[0], inits, index_bits4))
                continue
            except (ValueError, KeyError, TypeError) as e:  # fallback below keeps the model exact
                warnings.warn(f"layer {name}: {e}; exported as a dense fallback", ExportWarning, stacklevel=3)
                nodes.extend(_dense_fallback(name, layers[name], node, inits))
                continue
        nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(inits.tensors.values())
    _finish(m)
    if onnx_ops == "portable":
        m = inline(m)
    return m


def _dense_fallback(name: str, mod: nn.Module, node: onnx.NodeProto, inits: _Initializers) -> list[onnx.NodeProto]:
    """Standard nodes holding the decoded weight: Conv, or MatMul (+ Add) for a linear layer."""
    with torch.no_grad():
        w = mod.clustered_weight().decode().float().numpy()
    bias = None if mod.bias is None else inits.add(f"{name}.bias", mod.bias.detach().float().numpy())
    x, y = node.input[0], node.output[0]
    if isinstance(mod, ClusteredConv2d):
        ins = [x, inits.add(f"{name}.weight", w)] + ([bias] if bias else [])
        return [h.make_node("Conv", ins, [y], name=name, strides=list(mod.stride),
                            pads=_pads(mod), dilations=list(mod.dilation), group=int(mod.groups))]
    wt = inits.add(f"{name}.weight_t", np.ascontiguousarray(w.T))
    if bias is None:
        return [h.make_node("MatMul", [x, wt], [y], name=name)]
    return [h.make_node("MatMul", [x, wt], [f"{name}.matmul"], name=f"{name}/MatMul"),
            h.make_node("Add", [f"{name}.matmul", bias], [y], name=f"{name}/Add")]


def _finish(m: onnx.ModelProto) -> None:
    """Functions, opset imports, IR version, shapes; drops initializers no node uses."""
    used = {i for n in m.graph.node for i in n.input}
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    has_custom = any(n.domain == F.DOMAIN for n in m.graph.node)
    del m.functions[:]
    imports = [o for o in m.opset_import if o.domain not in ("", "ai.onnx", F.DOMAIN)]
    del m.opset_import[:]
    m.opset_import.extend([h.make_opsetid("", F.OPSET), *imports])
    if has_custom:
        m.opset_import.append(h.make_opsetid(F.DOMAIN, F.DOMAIN_VERSION))
        used_ops = {n.op_type for n in m.graph.node if n.domain == F.DOMAIN}
        m.functions.extend(f for f in F.functions() if f.name in used_ops)
    m.ir_version = F.IR_VERSION
    m.producer_name, m.producer_version = "kcompile", _version()
    del m.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    m.graph.value_info.extend(inferred.graph.value_info)
    for out, inf in zip(m.graph.output, inferred.graph.output):
        out.type.CopyFrom(inf.type)


def inline(m: onnx.ModelProto) -> onnx.ModelProto:
    """``m`` with the com.kcompile functions inlined (standard ops only)."""
    import onnx.inliner

    out = onnx.inliner.inline_local_functions(m)
    del out.functions[:]
    imports = [o for o in out.opset_import if o.domain != F.DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(imports)
    del out.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    out.graph.value_info.extend(inferred.graph.value_info)
    return out


def _version() -> str:
    from . import __version__

    return __version__


def initializer_bytes(m: onnx.ModelProto, names=None) -> int:
    """Raw bytes of the initializers (all, or those whose names are in ``names``)."""
    total = 0
    for t in m.graph.initializer:
        if names is None or t.name in names:
            if t.data_type == TensorProto.UINT4:
                total += (math.prod(t.dims) + 1) // 2
            else:
                total += numpy_helper.to_array(t).nbytes
    return total
