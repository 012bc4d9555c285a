"""`kcompile.onnxruntime_session`: run a kcompile ONNX file in onnxruntime with kcompile's
own implementation of the ``com.kcompile`` ops.

Mechanism (onnxruntime-extensions Python custom ops). Python ops can only live in the domain
``ai.onnx.contrib`` and only take float32/int/uint8..uint64 inputs with int64/float/string
attributes, so the session rewrites the model *in memory* (the file is untouched):

- every ``com.kcompile::ClusteredConv`` / ``ClusteredGemm`` node becomes
  ``ai.onnx.contrib::KcClusteredConv_u8`` (``_u16``/``_u32`` by index type) with the same
  inputs, a ``Cast`` to float32 in front of the fp16 scales (and to uint8 in front of UINT4
  indices), a zero bias when the node has none, and two string attributes: ``kc_key`` (a
  session-unique node id) and ``kc_params`` (JSON of weight_shape, unit, strides, pads,
  dilations, group);
- the model-local functions and the ``com.kcompile`` opset import are dropped.

On its first call a node decodes its inputs into a ``ClusteredWeight`` and prepares a kernel
(``kcompile.kernels.prepare`` / ``prepare_linear``, backend ``numba``; if the kernels cannot
prepare the layer, a NumPy decode + reference conv of this module); the prepared kernel is
cached per ``kc_key`` (the inputs are initializers, constant for the session's lifetime), so
later calls only run it. Cost per call: the extension copies every input into NumPy and the
output through a Python list (see benchmarks/results/ort_overhead.json).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import weakref

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx import helper as h

from . import onnx_functions as F
from .errors import KcompileError

PYOP_DOMAIN = "ai.onnx.contrib"
_INDEX_TYPES = {TensorProto.UINT8: "u8", TensorProto.UINT16: "u16", TensorProto.UINT32: "u32"}

_PREPARED: dict[str, object] = {}
_BACKEND_USED: dict[str, str] = {}
_LOCK = threading.Lock()
_REGISTERED = False
_SESSION_IDS = itertools.count()


# ----------------------------------------------------------------------------- numpy reference
def decode_numpy(codebook, index, scale, perms, transform, offset, keep, shape) -> np.ndarray:
    """The dense weight (float32, ``shape``) from a node's decode inputs (neutrals allowed)."""
    idx = index.astype(np.int64) + (offset.astype(np.int64) if offset is not None else 0)
    vec = codebook[idx]  # L + (D,)
    if perms is not None and transform is not None:
        t = np.broadcast_to(transform, index.shape).astype(np.int64)
        vec = np.take_along_axis(vec, perms[t], axis=-1)
    if scale is not None:
        vec = vec * np.broadcast_to(scale.astype(np.float32), index.shape)[..., None]
    w = vec.reshape(shape)
    if keep is not None:
        w = w * keep.astype(np.float32).reshape(1, -1, *([1] * (len(shape) - 2)))
    return np.ascontiguousarray(w, np.float32)


def conv2d_numpy(x, w, b, strides, pads, dilations, group) -> np.ndarray:
    """Reference NCHW conv: x (N, C, H, W), w (O, C/group, kh, kw), pads (top, left, bottom, right)."""
    t, l, bo, r = pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, bo), (l, r)))
    O, Cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = strides, dilations
    win = np.lib.stride_tricks.sliding_window_view(xp, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # N, C, H', W', kh, kw
    Og = O // group
    ys = [np.einsum("nchwij,ocij->nohw", win[:, g * Cg:(g + 1) * Cg], w[g * Og:(g + 1) * Og], optimize=True)
          for g in range(group)]
    y = np.concatenate(ys, axis=1)
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return np.ascontiguousarray(y, np.float32)


# ----------------------------------------------------------------------------- preparing a node
def _neutral_free(codebook, index, scale, perms, transform, offset, keep):
    """Replace neutral inputs (see onnx_functions) by None."""
    if scale is not None and scale.shape != index.shape and np.all(scale == 1):
        scale = None
    if perms is not None and perms.shape[0] == 1 and np.array_equal(perms[0], np.arange(perms.shape[1])):
        perms = transform = None
    if offset is not None and not np.any(offset):  # all books start at 0: no per-channel books
        offset = None
    if keep is not None and np.all(keep == 1):
        keep = None
    return scale, perms, transform, offset, keep


def _clustered_weight(p: dict, codebook, index, scale, perms, transform, offset, keep):
    import torch

    from .ir import ClusteredWeight, lead_dims, narrowest_uint

    shape = tuple(p["weight_shape"])
    lead = tuple(shape[:lead_dims(p["unit"], len(shape))])
    idx = torch.from_numpy(index.astype(np.int64))
    kw = {}
    if scale is not None:
        kw["scale"] = torch.from_numpy(np.array(np.broadcast_to(scale, lead), np.float32))
    if perms is not None:
        kw["transform"] = torch.from_numpy(np.array(np.broadcast_to(transform, lead), np.uint8))
        kw["transform_perms"] = torch.from_numpy(perms.astype(np.int64))
    if offset is not None:
        kw["offset"] = torch.from_numpy(np.broadcast_to(offset, (shape[1],)).astype(np.int64).copy())
    if keep is not None:
        kw["pruned"] = torch.from_numpy(np.array(np.broadcast_to(keep, (shape[1],)) == 0))
    return ClusteredWeight(unit=p["unit"], shape=shape, codebook=torch.from_numpy(codebook.astype(np.float32)),
                           index=idx.to(narrowest_uint(int(idx.max()) if idx.numel() else 0)), **kw)


def prepare_node(kind: str, params: dict, codebook, index, scale, perms, transform, offset, keep, bias,
                 backend: str = "auto"):
    """(callable x -> y, backend name) for one com.kcompile node's constant inputs."""
    scale, perms, transform, offset, keep = _neutral_free(codebook, index, scale, perms, transform, offset, keep)
    shape = tuple(params["weight_shape"])
    bias = None if bias is None or not np.any(bias) else np.array(np.broadcast_to(bias, (shape[0],)), np.float32)
    if backend in ("auto", "numba"):
        try:
            import kcompile.kernels as K

            cw = _clustered_weight(params, codebook, index, scale, perms, transform, offset, keep)
            if kind == F.CONV:
                run = K.prepare(cw, bias, tuple(params["strides"]), tuple(params["pads"]), tuple(params["dilations"]),
                                int(params["group"]), backend="numba")
                return run, f"kernels:{run.form}"
            lin = K.prepare_linear(cw, bias, backend="numba")
            return _linear_nd(lin), f"kernels:{lin.form}"
        except Exception:  # kernels missing or unable: the NumPy path below is exact
            if backend == "numba":
                raise
    w = decode_numpy(codebook, index, scale, perms, transform, offset, keep, shape)
    if kind == F.CONV:
        def run(x, w=w):
            return conv2d_numpy(x, w, bias, params["strides"], params["pads"], params["dilations"], params["group"])
    else:
        def lin(x, wt=np.ascontiguousarray(w.T)):
            y = x @ wt
            return y if bias is None else y + bias
        run = _linear_nd(lin)
    return run, "numpy"


def _linear_nd(fn):
    def run(x):
        y = fn(np.ascontiguousarray(x.reshape(-1, x.shape[-1]), np.float32))
        return np.ascontiguousarray(y, np.float32).reshape(*x.shape[:-1], -1)
    return run


# ----------------------------------------------------------------------------- the python ops
def _make_impl(kind: str):
    def impl(x, codebook, index, scale, perms, transform, offset, keep, bias, kc_key, kc_params):
        run = _PREPARED.get(kc_key)
        if run is None:
            with _LOCK:
                run = _PREPARED.get(kc_key)
                if run is None:
                    params = json.loads(kc_params)
                    run, used = prepare_node(kind, params, codebook, index, scale, perms, transform, offset,
                                             keep, bias, params.get("backend", "auto"))
                    _PREPARED[kc_key], _BACKEND_USED[kc_key] = run, used
        return run(x)
    return impl


def _register() -> None:
    """Register the Python ops once per process."""
    global _REGISTERED
    if _REGISTERED:
        return
    from onnxruntime_extensions import PyCustomOpDef as T
    from onnxruntime_extensions import onnx_op

    idx_types = {"u8": T.dt_uint8, "u16": T.dt_uint16, "u32": T.dt_uint32}
    for kind in (F.CONV, F.GEMM):
        for suffix, it in idx_types.items():
            onnx_op(op_type=f"Kc{kind}_{suffix}",
                    inputs=[T.dt_float, T.dt_float, it, T.dt_float, T.dt_int64, T.dt_uint8, T.dt_int64, T.dt_float, T.dt_float],
                    outputs=[T.dt_float], attrs={"kc_key": T.dt_string, "kc_params": T.dt_string})(_make_impl(kind))
    _REGISTERED = True


# ----------------------------------------------------------------------------- the rewrite
def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return h.get_attribute_value(a)
    return default


def rewrite_for_pyops(model: onnx.ModelProto, session_id: str, backend: str = "auto") -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose com.kcompile nodes call kcompile's Python ops; (model, keys)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*m.graph.input, *m.graph.value_info]}
    types.update({n: t.data_type for n, t in inits.items()})
    nodes, keys, extra = [], [], []
    for i, node in enumerate(m.graph.node):
        if node.domain != F.DOMAIN:
            nodes.append(node)
            continue
        if node.op_type not in (F.CONV, F.GEMM):
            raise KcompileError(f"unknown op {F.DOMAIN}::{node.op_type} in node {node.name!r}")
        ins = list(node.input) + [""] * (len(F.INPUTS) - len(node.input))
        tag = f"{node.name or i}"
        it = types.get(ins[2])
        if it == TensorProto.UINT4:
            nodes.append(h.make_node("Cast", [ins[2]], [f"kc/{tag}/index_u8"], to=TensorProto.UINT8, name=f"kc/{tag}/index_u8"))
            ins[2], it = f"kc/{tag}/index_u8", TensorProto.UINT8
        if it not in _INDEX_TYPES:
            raise KcompileError(f"node {node.name!r}: index type {TensorProto.DataType.Name(it or 0)} is not supported")
        if types.get(ins[3]) != TensorProto.FLOAT:
            nodes.append(h.make_node("Cast", [ins[3]], [f"kc/{tag}/scale_f32"], to=TensorProto.FLOAT, name=f"kc/{tag}/scale_f32"))
            ins[3] = f"kc/{tag}/scale_f32"
        if not ins[8]:
            ins[8] = f"kc/{tag}/zero_bias"
            extra.append(numpy_helper.from_array(np.zeros(1, np.float32), ins[8]))
        params = {"weight_shape": list(_attr(node, "weight_shape")), "unit": _attr(node, "unit", b"").decode() or None,
                  "strides": list(_attr(node, "strides", [1, 1])), "dilations": list(_attr(node, "dilations", [1, 1])),
                  "pads": list(_attr(node, "pads", [0, 0, 0, 0])), "group": int(_attr(node, "group", 1)),
                  "backend": backend}
        if params["unit"] is None:
            raise KcompileError(f"node {node.name!r} has no unit attribute")
        key = f"s{session_id}/{tag}"
        keys.append(key)
        nodes.append(h.make_node(f"Kc{node.op_type}_{_INDEX_TYPES[it]}", ins, list(node.output), name=node.name,
                                 domain=PYOP_DOMAIN, kc_key=key, kc_params=json.dumps(params)))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(extra)
    del m.functions[:]
    imports = [o for o in m.opset_import if o.domain not in (F.DOMAIN, PYOP_DOMAIN)]
    del m.opset_import[:]
    m.opset_import.extend([*imports, h.make_opsetid(PYOP_DOMAIN, 1)])
    return m, keys


def _drop(keys: list[str]) -> None:
    for k in keys:
        _PREPARED.pop(k, None)
        _BACKEND_USED.pop(k, None)


def onnxruntime_session(path, threads: int | None = None, custom_ops: bool = True, backend: str = "auto",
                        providers=None):
    """An onnxruntime InferenceSession for the ONNX model ``path`` (file, bytes or ModelProto).

    ``custom_ops=True``: kcompile's implementation of the com.kcompile ops (kernels from
    ``kcompile.kernels``; ``backend`` auto/numba/numpy); ``False``: stock onnxruntime (the
    ops' function bodies). ``threads``: onnxruntime's intra-op threads (default: all).
    The session's ``kcompile_backends()`` gives {node key: kernel used} after a first run.
    """
    import onnxruntime as ort

    if backend not in ("auto", "numba", "numpy"):
        raise KcompileError(f"unknown backend {backend!r}: expected auto, numba or numpy")
    if isinstance(path, onnx.ModelProto):
        model = path
    else:
        try:
            model = onnx.load_model_from_string(path) if isinstance(path, bytes) else onnx.load(os.fspath(path))
        except FileNotFoundError:
            raise KcompileError(f"no such ONNX file: {path}") from None
        except Exception as e:
            raise KcompileError(f"cannot read ONNX model {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    keys: list[str] = []
    if custom_ops and any(n.domain == F.DOMAIN for n in model.graph.node):
        from onnxruntime_extensions import get_library_path

        _register()
        model, keys = rewrite_for_pyops(model, str(next(_SESSION_IDS)), backend)
        so.register_custom_ops_library(get_library_path())
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:
        _drop(keys)
        raise KcompileError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}") from None
    if keys:
        weakref.finalize(sess, _drop, keys)
    sess.kcompile_backends = lambda: {k: _BACKEND_USED.get(k) for k in keys}
    return sess
