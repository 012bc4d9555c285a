"""`kcompile.compile`: a whole model as one callable (numpy in, numpy out), and
`export_library`: the same model as a deployable shared library.

Targets
-------
``llvm`` / ``cuda`` -- the whole model becomes one TVM Relax module:

1. A copy of the model is made (the caller's model is never modified) and every conv
   (clustered or dense) is replaced by a stub calling the custom torch op
   ``kcompile_tvm::conv(x, key)``; clustered linear layers are decoded to ``nn.Linear``.
2. ``torch.export`` traces the copy; TVM's ``from_exported_program`` imports it with a
   ``custom_convert_map`` that turns each ``kcompile_tvm::conv`` into a ``call_tir`` of a
   scheduled PrimFunc from :mod:`kcompile.kernels.tvm_compute` /
   :mod:`kcompile.kernels.tvm_schedule` (shared-centroid kernel for clustered kernel-unit
   convs, filter-gather for filter units, a direct dense conv otherwise), its tables
   (codebook, index, scales) passed as Relax constants. An inference batch-norm right after
   a conv is folded (:mod:`kcompile.bn_fold`): into the weights and bias of dense-form
   convs, as a per-channel scale + shift in a clustered kernel's output stage (the codebook
   is never rescaled). A residual add and / or ReLU right after a conv is fused into its
   kernel's output stage too (:mod:`kcompile.epilogue_fusion`). Everything else (pooling,
   other adds and activations, linear) goes through TVM's own operators (LegalizeOps;
   dlight on CUDA).
3. ``tvm.compile`` builds it -- on ``llvm`` with :func:`kcompile.tvm_pipeline.llvm_pipeline`
   (constant folding, operator fusion, parallel + vectorised schedules for the fused
   elementwise / pooling / matmul functions) -- and on ``llvm`` a Relax VM runs it here. ``cuda`` builds with nvcc
   without a GPU (``CompiledModel.cuda_source()`` shows the kernels) but cannot run here.

``numba`` -- a copy of the model whose clustered layers call :func:`kcompile.kernels.prepare`
kernels (``backend="numba"``); everything else runs in PyTorch under ``no_grad``.

Shapes are static: ``input_shape`` (N, C, H, W) is compiled in.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .bn_fold import BN_TARGET, conv_batch_norms
from .epilogue_fusion import fuse_conv_epilogues
from .errors import KcompileError, UsageError
from .layers import ClusteredConv2d, ClusteredLinear, set_submodule

TARGETS = ("llvm", "cuda", "numba")

# ----------------------------------------------------------------------------- custom torch op
_REGISTRY: dict[int, "_ConvEntry"] = {}
_KEYS = itertools.count(1)
_LOCK = threading.Lock()


@dataclass
class _ConvEntry:
    """What the Relax converter needs for one conv: the clustered weight (or a dense
    weight), bias, geometry; ``form`` is filled in by the converter (for reports)."""

    name: str
    cw: object | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    form: str = ""
    info: dict = field(default_factory=dict)

    def dense_weight(self) -> torch.Tensor:
        return self.weight if self.cw is None else self.cw.decode()


@torch.library.custom_op("kcompile_tvm::conv", mutates_args=())
def _conv_op(x: torch.Tensor, key: int) -> torch.Tensor:
    """Eager semantics of a stubbed conv (used only if the stub model is run in torch)."""
    e = _REGISTRY[key]
    return F.conv2d(x, e.dense_weight().detach(), e.bias, e.stride, e.padding, e.dilation, e.groups)


@_conv_op.register_fake
def _conv_fake(x: torch.Tensor, key: int) -> torch.Tensor:
    e = _REGISTRY[key]
    O, _, kh, kw = (e.cw.shape if e.cw is not None else tuple(e.weight.shape))
    N, C, H, W = x.shape
    Ho = (H + 2 * e.padding[0] - e.dilation[0] * (kh - 1) - 1) // e.stride[0] + 1
    Wo = (W + 2 * e.padding[1] - e.dilation[1] * (kw - 1) - 1) // e.stride[1] + 1
    return x.new_empty((N, O, Ho, Wo))


class _ConvStub(nn.Module):
    """Stands for one conv in the traced copy: calls ``kcompile_tvm::conv(x, key)``."""

    def __init__(self, key: int) -> None:
        super().__init__()
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.kcompile_tvm.conv(x, self.key)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


def _stub_model(model: nn.Module) -> tuple[nn.Module, list[int]]:
    """A copy of ``model`` with convs stubbed and clustered linears decoded (see module doc)."""
    m = copy.deepcopy(model).eval()
    keys = []
    for name, mod in list(m.named_modules()):
        if isinstance(mod, (ClusteredConv2d, nn.Conv2d)):
            if isinstance(mod.padding, str):
                raise UsageError(f"layer {name}: padding={mod.padding!r} is not supported by the compiler; use numbers")
            if isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
                raise UsageError(f"layer {name}: padding_mode {mod.padding_mode!r} is not supported")
            clustered = isinstance(mod, ClusteredConv2d)
            entry = _ConvEntry(
                name=name,
                cw=mod.clustered_weight().detached() if clustered else None,
                weight=None if clustered else mod.weight.detach().clone(),
                bias=None if mod.bias is None else mod.bias.detach().clone(),
                stride=_pair(mod.stride), padding=_pair(mod.padding), dilation=_pair(mod.dilation),
                groups=int(mod.groups))
            with _LOCK:
                key = next(_KEYS)
                _REGISTRY[key] = entry
            keys.append(key)
            set_submodule(m, name, _ConvStub(key))
        elif isinstance(mod, ClusteredLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.detach())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias.detach())
            set_submodule(m, name, lin)
    return m, keys


# ----------------------------------------------------------------------------- relax import
def _layer_arrays(e: "_ConvEntry", spec, forms: dict | None, bn):
    """ConvArrays of one conv: its tables in the chosen form with the batch-norm ``bn`` (a
    :class:`kcompile.bn_fold.ChannelAffine` or None) folded into dense weights, or applied
    by a clustered kernel's ``out`` stage (scale per output channel; the codebook is never
    touched)."""
    from .kernels.plan import decoded_weight
    from .kernels.tvm_compute import choose_form, dense_arrays, make_arrays, with_epilogue

    groups = spec.geom.groups
    bias = None if e.bias is None else e.bias.detach().cpu().float().numpy()
    if e.cw is None:
        weight = e.weight.numpy().astype(np.float32)
        if bn is None:
            return dense_arrays(weight, groups, bias)
        return dense_arrays(bn.fold_weight(weight), groups, bn.fold_bias(bias))
    form = (forms or {}).get(e.name) or choose_form(e.cw, spec)
    if form == "dense" and bn is not None:
        return dense_arrays(bn.fold_weight(decoded_weight(e.cw)), groups, bn.fold_bias(bias))
    arrays = make_arrays(e.cw, spec, e.bias, form)
    return arrays if bn is None else with_epilogue(arrays, bn.scale, bn.shift)


def _tiles(spec, arrays, target_kind: str, threads: int, tuned: dict | None):
    """Tiles of one kernel: None (the schedule's heuristic) unless ``tuned`` (a cache dict,
    keyed by shape) asks for measured ones: :func:`kcompile.kernels.tvm_tune.search_tiles`
    on llvm, shared form."""
    if tuned is None or target_kind != "llvm" or arrays.form != "shared":
        return None
    from .kernels.tvm_tune import search_tiles

    m = arrays.meta
    key = (spec, m["q"], m["Ck"], m["F"], m.get("epilogue"))
    if key not in tuned:
        tuned[key] = search_tiles(spec, arrays, threads)[0]
    return tuned[key]


def _conv_converter(target_kind: str, threads: int, forms: dict | None, folds: dict | None = None,
                    kernels: dict | None = None, tuned: dict | None = None):
    """The ``custom_convert_map`` entry: kcompile_tvm::conv -> call_tir(scheduled PrimFunc);
    ``folds`` ({conv node name: ChannelAffine}) are the batch-norms folded into the convs;
    ``kernels`` (filled in) maps each kernel's function name to (ConvSpec, ConvArrays,
    registry entry, tiles), for :mod:`kcompile.epilogue_fusion`; ``tuned``: a dict to
    measure tiles (and cache them by shape) instead of using the heuristic (:func:`_tiles`)."""
    from tvm import relax

    from .kernels.plan import Geometry
    from .kernels.tvm_compute import ConvSpec
    from .kernels.tvm_schedule import layer_module

    def convert(node, importer):
        x = importer.env[node.args[0]]
        key = int(node.args[1])
        e = _REGISTRY[key]
        N, C, H, W = (int(v) for v in x.ty.shape)
        geom = Geometry.make(e.stride, e.padding, e.dilation, e.groups)
        if e.cw is not None:
            O, _, kh, kw = e.cw.shape
        else:
            O, _, kh, kw = e.weight.shape
        spec = ConvSpec(N, C, H, W, int(O), int(kh), int(kw), geom)
        bn = (folds or {}).get(node.name)
        arrays = _layer_arrays(e, spec, forms, bn)
        e.form = arrays.form
        fname = "kc_" + (e.name.replace(".", "_") or "conv") + f"_{arrays.form}"
        tiles = _tiles(spec, arrays, target_kind, threads, tuned)
        lm = layer_module(spec, arrays, target_kind, threads, name=fname, tiles=tiles)
        func = lm.mod[fname].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
        e.info = {"form": arrays.form, "function": fname, "input_shape": (N, C, H, W),
                  "output_shape": spec.out_shape, "tiles": repr(lm.tiles)}
        if tiles is not None:
            e.info["tiles_measured"] = True
        if bn is not None:
            e.info["batch_norm"] = "epilogue" if "oscale" in arrays.arrays else "folded"
        bb = importer.block_builder
        gv = bb.add_func(func, fname)
        if kernels is not None:
            kernels[fname] = (spec, arrays, e, lm.tiles)
        consts = [relax.const(a) for a in arrays.arrays.values()]
        return bb.emit(relax.call_tir(gv, [x, *consts], relax.TensorType(spec.out_shape, "float32")))

    return convert


def _batch_norm_converter(folds: dict):
    """The ``custom_convert_map`` entry for inference batch-norm: a batch-norm already
    applied by its conv (``folds``) passes the conv's output through; others are imported
    as usual."""

    def convert(node, importer):
        if node.args and getattr(node.args[0], "name", None) in folds:
            return importer.env[node.args[0]]
        return importer._batch_norm_legit_no_training(node)

    return convert


def _out_channels(e: "_ConvEntry") -> int:
    return int(e.cw.shape[0] if e.cw is not None else e.weight.shape[0])


def relax_module(model: nn.Module, input_shape, target_kind: str = "llvm", threads: int = 2,
                 forms: dict | None = None, tune: bool = False):
    """(IRModule, layer report) of ``model`` for ``target_kind`` (see module doc); ``tune``:
    measured tiles for the shared-centroid kernels (llvm)."""
    from tvm.relax.frontend.torch import from_exported_program

    stub, keys = _stub_model(model)
    try:
        x = torch.zeros(tuple(input_shape), dtype=torch.float32)
        try:
            with torch.no_grad():
                ep = torch.export.export(stub, (x,))
        except Exception as ex:  # noqa: BLE001 - tracing failures become one line
            raise KcompileError(f"cannot trace the model for compilation: {str(ex).splitlines()[0]}") from None
        try:
            ep = ep.run_decompositions()  # core ATen (what the importer expects); done here so
        except Exception as ex:  # noqa: BLE001 - that the batch-norms found below are its nodes
            raise KcompileError(f"cannot trace the model for compilation: {str(ex).splitlines()[0]}") from None
        folds = conv_batch_norms(ep, "conv.default", lambda n: _out_channels(_REGISTRY[int(n.args[1])]))
        kernels: dict = {}
        convert_map = {"conv.default": _conv_converter(target_kind, threads, forms, folds, kernels,
                                                       {} if tune else None),
                       BN_TARGET: _batch_norm_converter(folds)}
        try:
            mod = from_exported_program(ep, custom_convert_map=convert_map, unwrap_unit_return_tuple=True,
                                        run_ep_decomposition=False)
        except KcompileError:
            raise
        except Exception as ex:  # noqa: BLE001 - unsupported operators etc. become one line
            msg = (str(ex).strip().splitlines() or [type(ex).__name__])[0]
            raise KcompileError(f"TVM cannot import the model: {msg}") from None
        mod = fuse_conv_epilogues(mod, kernels, target_kind, threads)
        report = [{"layer": _REGISTRY[k].name, "clustered": _REGISTRY[k].cw is not None, **_REGISTRY[k].info}
                  for k in keys]
    finally:
        with _LOCK:
            for k in keys:
                _REGISTRY.pop(k, None)
    return mod, report


# ----------------------------------------------------------------------------- compiled models
def _check_shape(input_shape) -> tuple[int, int, int, int]:
    if input_shape is None:
        raise UsageError("input_shape (N, C, H, W) is required to compile a model")
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise UsageError(f"input_shape must be 4 integers (N, C, H, W), got {input_shape!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise UsageError(f"input_shape must be 4 positive integers (N, C, H, W), got {input_shape!r}")
    return shape


class CompiledModel:
    """``y = run(x)``: x numpy (N, C, H, W) float32 -> y numpy. Attributes: ``target``,
    ``input_shape``, ``output_shape``, ``layers`` (per conv: form, function, shapes)."""

    def __init__(self, target: str, input_shape, output_shape, layers, executable=None, mod=None,
                 runner=None) -> None:
        self.target, self.input_shape, self.output_shape = target, tuple(input_shape), tuple(output_shape)
        self.layers, self.executable, self.mod = layers, executable, mod
        self._runner = runner
        self._vm = None

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x)
        if tuple(x.shape) != self.input_shape:
            raise UsageError(f"input must have shape {self.input_shape} (compiled in), got {tuple(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self._runner is not None:
            return self._runner(x)
        if self.target != "llvm":
            raise KcompileError(f"a {self.target} module cannot run here (no device); export it instead")
        import tvm
        from tvm import relax

        if self._vm is None:
            self._dev = tvm.cpu()
            self._vm = relax.VirtualMachine(self.executable, self._dev)
        out = self._vm["main"](tvm.runtime.tensor(x, self._dev))
        if not hasattr(out, "numpy"):
            out = out[0]
        return out.numpy()

    def cuda_source(self) -> str:
        """The generated CUDA C source (``cuda`` target only)."""
        if self.target != "cuda":
            raise UsageError("cuda_source() needs a module compiled for the cuda target")
        return _device_source(self.executable.mod)


def _device_source(lib) -> str:
    """Concatenated source of the device modules imported by ``lib`` (CUDA C)."""
    srcs = []
    stack = list(getattr(lib, "imports", None) or [])
    while stack:
        m = stack.pop()
        for fmt in ("cuda", "cu", ""):
            try:
                src = m.inspect_source(fmt)
            except Exception:  # noqa: BLE001 - format not available
                src = ""
            if src:
                srcs.append(src)
                break
        stack.extend(getattr(m, "imports", None) or [])
    return "\n".join(srcs)


def _output_shape(model: nn.Module, shape) -> tuple:
    with torch.no_grad():
        y = copy.deepcopy(model).eval()(torch.zeros(shape))
    if not isinstance(y, torch.Tensor):
        raise UsageError("the model must return a single tensor to be compiled")
    return tuple(y.shape)


def compile_model(model: nn.Module, target: str = "llvm", input_shape=None, threads: int = 2,
                  forms: dict | None = None, tune: bool = False) -> CompiledModel:
    """Compile ``model`` (clustered or dense; not modified) for ``target``.

    target: ``llvm`` (TVM, this CPU), ``cuda`` (TVM + nvcc; builds without a GPU, cannot run
    here), ``numba`` (clustered layers through :mod:`kcompile.kernels`, the rest in torch).
    input_shape: (N, C, H, W). forms: optional {layer name: "shared"|"filter"|"dense"}
    overriding the per-layer choice (llvm/cuda). tune (llvm): time the cost model's best
    few tile choices of every shared-centroid kernel on this machine and keep the fastest
    (:func:`kcompile.kernels.tvm_tune.search_tiles`; a few seconds per distinct layer
    shape) instead of taking the cost model's first. Returns a :class:`CompiledModel`.
    """
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be an nn.Module, got {type(model).__name__}")
    shape = _check_shape(input_shape)
    out_shape = _output_shape(model, shape)
    if target == "numba":
        run, layers = _numba_runner(model)
        return CompiledModel("numba", shape, out_shape, layers, runner=run)
    import tvm

    from .kernels.tvm_schedule import make_target

    mod, layers = relax_module(model, shape, target, threads, forms, tune=tune)
    tgt = make_target(target, threads)
    try:
        if target == "llvm":
            from .tvm_pipeline import llvm_pipeline

            ex = tvm.compile(mod, target=tgt, relax_pipeline=llvm_pipeline(tgt))
        else:
            ex = tvm.compile(mod, target=tgt)
    except Exception as ex_:  # noqa: BLE001 - build failures become one line
        raise KcompileError(f"TVM build for {target} failed: {str(ex_).splitlines()[0]}") from None
    return CompiledModel(target, shape, out_shape, layers, executable=ex, mod=mod)


# ----------------------------------------------------------------------------- numba
class _NumbaConv(nn.Module):
    def __init__(self, prepared) -> None:
        super().__init__()
        self.prepared = prepared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.prepared(x.detach().cpu().numpy()))


class _NumbaLinear(_NumbaConv):
    pass


def _numba_runner(model: nn.Module):
    from . import kernels

    m = copy.deepcopy(model).eval()
    layers = []
    for name, mod in list(m.named_modules()):
        if isinstance(mod, ClusteredConv2d):
            if isinstance(mod.padding, str):
                raise UsageError(f"layer {name}: padding={mod.padding!r} is not supported by the kernels")
            p = kernels.prepare(mod.clustered_weight().detached(), mod.bias, mod.stride, tuple(mod.padding),
                                mod.dilation, mod.groups, backend="numba")
            set_submodule(m, name, _NumbaConv(p))
            layers.append({"layer": name, "clustered": True, "form": p.form})
        elif isinstance(mod, ClusteredLinear):
            p = kernels.prepare_linear(mod.clustered_weight().detached(), mod.bias, backend="numba")
            set_submodule(m, name, _NumbaLinear(p))
            layers.append({"layer": name, "clustered": True, "form": getattr(p, "form", "")})

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            y = m(torch.from_numpy(x))
        return y.detach().cpu().numpy()

    return run, layers


# ----------------------------------------------------------------------------- export
def export_library(model: nn.Module, path, target: str = "llvm", input_shape=None, threads: int = 2,
                   tune: bool = False) -> dict:
    """Write ``path`` (a shared library from ``export_library``; load it with
    ``tvm.runtime.load_module`` and run it with ``tvm.relax.VirtualMachine``, function
    ``main``) and ``<path stem>.json`` next to it ({"target", "input_shape", "output_shape",
    "entry", "layers"}). Both are written atomically; ``tune`` as in :func:`compile_model`.
    Returns the JSON record."""
    if target not in ("llvm", "cuda"):
        raise UsageError(f"export_library needs target llvm or cuda, got {target!r}")
    path = Path(path)
    from .fileio import atomic_path

    json_path = path.with_name(path.stem + ".json") if path.suffix != ".json" else path.with_name(path.name + ".meta.json")
    # atomic_path checks the folder before the (slow) build; nothing is left on failure
    with atomic_path(path, suffix=path.suffix or ".so") as tmp, atomic_path(json_path, suffix=".json") as jtmp:
        cm = compile_model(model, target, input_shape, threads, tune=tune)
        meta = {"target": target, "input_shape": list(cm.input_shape), "output_shape": list(cm.output_shape),
                "dtype": "float32", "entry": "main", "runtime": "tvm.relax.VirtualMachine",
                "layers": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in cm.layers]}
        try:
            cm.executable.export_library(tmp)
        except Exception as ex:  # noqa: BLE001 - compiler / linker failures become one line
            raise KcompileError(f"export_library to {path} failed: {str(ex).splitlines()[0]}") from None
        Path(jtmp).write_text(json.dumps(meta, indent=2))
    return meta
