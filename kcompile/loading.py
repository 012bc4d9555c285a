"""Turn a MODEL argument (see CONTRACT.md) into an ``nn.Module``.

``load_model(source, arch=None, arch_kwargs=None, trust_pickle=False)`` accepts

* ``zoo:NAME`` -- ``kcompile.zoo.build(NAME, **arch_kwargs)`` (shipped weights
  if the zoo has some);
* a kcompile clustered ``.pth`` (top-level ``"format": "kcompile-clustered"``)
  -- handed to ``kcompile.checkpoint.load_clustered``;
* a ``.pth``/``.pt`` state_dict plus ``arch`` = ``zoo:NAME``,
  ``torchvision:NAME``, ``package.module:callable`` or
  ``path/to/file.py:callable`` (called with ``arch_kwargs``).  Common wrappers
  are unwrapped: ``{"state_dict": sd}``, ``{"model_state_dict": sd}``,
  ``{"model": sd}``, and a ``module.`` prefix on every key (DataParallel);
* a ``.pt2`` program written by ``torch.export.save``: its ``.module()`` with
  every ``aten.conv2d``/``aten.convolution``/``aten.linear`` call whose weight
  is a get_attr lifted into a real ``nn.Conv2d``/``nn.Linear`` submodule (see
  ``lift_exported``), so code that finds layers by type can cluster it;
* a pickled whole ``nn.Module``, only with ``trust_pickle=True``.

Files are always read with ``torch.load(weights_only=True)`` first and are
never written.  Every failure is a one-line ``KcompileError`` (exit 1) or
``UsageError`` (exit 2) naming the file and the problem.

The returned module is in eval mode and carries ``model.kcompile_arch``, a
record from which ``rebuild_arch`` re-creates the architecture:
``{"spec": "zoo:resnet18", "kwargs": {...}}`` (file specs use an absolute
path), ``{"spec": "pt2", "kwargs": {}, "program": uint8 tensor of the .pt2
bytes}``, or ``{"spec": "pickle", "class": "pkg.mod.Cls"}`` (not rebuildable).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import json
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import fx, nn

from .errors import KcompileError, UsageError

CLUSTERED_FORMAT = "kcompile-clustered"
_PRESERVED_KEY = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"^{_IDENT}(\.{_IDENT})*$")
# Globals from these packages mean "pickled data", anything else "pickled module".
_DATA_GLOBALS = ("numpy.", "builtins.", "collections.", "_codecs.", "copyreg.", "datetime.", "pathlib.")


# --------------------------------------------------------------------------- helpers

def _first_line(e: BaseException) -> str:
    """A one-line, ANSI-free, bounded description of an exception."""
    s = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    line = next((ln.strip() for ln in s.splitlines() if ln.strip()), "")
    return (line[:200] + "...") if len(line) > 200 else (line or type(e).__name__)


def _kwargs(arch_kwargs: Any) -> dict:
    """Normalise arch_kwargs: None -> {}, a JSON object string -> dict."""
    if arch_kwargs is None:
        return {}
    if isinstance(arch_kwargs, str):
        try:
            arch_kwargs = json.loads(arch_kwargs)
        except json.JSONDecodeError as e:
            raise UsageError(f"--arch-kwargs is not valid JSON: {e}") from None
    if not isinstance(arch_kwargs, dict) or not all(isinstance(k, str) for k in arch_kwargs):
        raise UsageError(f"--arch-kwargs must be a JSON object, got {arch_kwargs!r}")
    return dict(arch_kwargs)


# --------------------------------------------------------------------------- --arch SPEC

def _import_file(path: Path) -> Any:
    """Import a .py file as a module (cached per absolute path)."""
    name = "kcompile_arch_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise KcompileError(f"--arch {path}: cannot import this file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))  # let the file import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise KcompileError(f"--arch {path}: importing the file failed: {type(e).__name__}: {_first_line(e)}") from None
    finally:
        sys.path.remove(str(path.parent))
    return module


def _resolve(spec: str) -> tuple[Callable[..., nn.Module], str]:
    """Map an --arch SPEC to (callable(**kwargs) -> nn.Module, canonical spec)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise UsageError(
            f"bad --arch '{spec}': expected zoo:NAME, torchvision:NAME, "
            "package.module:callable or path/to/file.py:callable"
        )
    head, name = spec.rsplit(":", 1) if not spec.startswith(("zoo:", "torchvision:")) else spec.split(":", 1)
    if head == "zoo":
        from . import zoo

        zoo.input_shape(name)  # UsageError for an unknown name

        def build_zoo(**kw):
            kw.setdefault("pretrained", False)
            return zoo.build(name, **kw)

        return build_zoo, f"zoo:{name}"
    if head == "torchvision":
        try:
            import torchvision  # noqa: F401
            from torchvision import models
        except ImportError:
            raise KcompileError(
                f"--arch {spec} needs torchvision, which is not installed "
                f"(pip install torchvision, or use a zoo: architecture)"
            ) from None
        if name not in models.list_models():
            raise UsageError(f"--arch {spec}: torchvision has no model '{name}'")
        return (lambda **kw: models.get_model(name, weights=None, **kw)), f"torchvision:{name}"
    if not _DOTTED.match(name):
        raise UsageError(f"bad --arch '{spec}': '{name}' is not a Python name")
    if head.endswith(".py"):
        path = Path(head).expanduser().resolve()
        if not path.is_file():
            raise KcompileError(f"--arch {spec}: no such file {path}")
        obj: Any = _import_file(path)
        canonical = f"{path}:{name}"
    else:
        if not _DOTTED.match(head):
            raise UsageError(f"bad --arch '{spec}': '{head}' is neither a module name nor a .py file")
        try:
            obj = importlib.import_module(head)
        except Exception as e:
            raise KcompileError(f"--arch {spec}: cannot import module '{head}': {_first_line(e)}") from None
        canonical = f"{head}:{name}"
    for part in name.split("."):
        if not hasattr(obj, part):
            raise KcompileError(f"--arch {spec}: '{head}' has no attribute '{name}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise KcompileError(f"--arch {spec}: '{name}' is not callable")
    return obj, canonical


def build_arch(spec: str, kwargs: dict | None = None) -> nn.Module:
    """Build the architecture named by an --arch SPEC (zoo models without shipped weights).

    Returns an nn.Module with ``kcompile_arch = {"spec": canonical, "kwargs": kwargs}``.
    """
    fn, canonical = _resolve(spec)
    kwargs = _kwargs(kwargs)
    try:
        model = fn(**kwargs)
    except KcompileError:
        raise
    except Exception as e:
        raise KcompileError(f"--arch {canonical}: building the model with {kwargs} failed: "
                            f"{type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise KcompileError(f"--arch {canonical} returned a {type(model).__name__}, not an nn.Module")
    model.kcompile_arch = {"spec": canonical, "kwargs": kwargs}
    return model


# --------------------------------------------------------------------------- state_dicts

def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _unwrap_state_dict(obj: Any) -> dict | None:
    """Return the state_dict inside ``obj`` (see module docstring) or None."""
    if not _is_state_dict(obj):
        inner = [obj[k] for k in _WRAPPER_KEYS if isinstance(obj, dict) and _is_state_dict(obj.get(k))]
        if not inner:
            return None
        obj = inner[0]
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _load_state(model: nn.Module, state: dict, source: str, spec: str) -> None:
    """load_state_dict with a one-line error naming the first offending key."""
    expected = model.state_dict()
    where = f"{source}: state_dict does not fit --arch {spec}"
    for k, v in state.items():
        if k not in expected:
            raise KcompileError(f"{where}: unexpected key '{k}'")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise KcompileError(f"{where}: key '{k}' has shape {tuple(v.shape)} in the file "
                                f"but {tuple(expected[k].shape)} in the architecture")
    for k in expected:
        if k not in state:
            raise KcompileError(f"{where}: missing key '{k}'")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise KcompileError(f"{where}: {_first_line(e)}") from None


# --------------------------------------------------------------------------- .pt2 programs

def _is_export_archive(path: Path) -> bool:
    """True for a torch.export.save zip (has archive_format, no torch.save data.pkl)."""
    try:
        with zipfile.ZipFile(path) as z:
            files = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(f.endswith("archive_format") for f in files) and not any(f.endswith("data.pkl") for f in files)


def _bind(node: fx.Node) -> dict:
    """Arguments of an OpOverload call by schema name (defaults filled in)."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _pair(v: Any) -> Any:
    if isinstance(v, str):
        return v
    v = [v] if isinstance(v, int) else list(v)
    return tuple(v * 2 if len(v) == 1 else v)


def _is_static(v: Any) -> bool:
    """Plain ints/strings (no fx Nodes / SymInts) only."""
    if isinstance(v, (list, tuple)):
        return all(_is_static(x) for x in v)
    return isinstance(v, (int, str, bool)) and not isinstance(v, fx.Node)


def _layer_for(gm: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, fx.Node, fx.Node | None] | None:
    """An nn.Conv2d / nn.Linear equivalent to ``node`` (sharing its tensors), or None."""
    t = node.target
    conv_ops = (torch.ops.aten.conv2d.default, torch.ops.aten.conv2d.padding, torch.ops.aten.convolution.default)
    if t not in conv_ops and t != torch.ops.aten.linear.default:
        return None
    a = _bind(node)
    w, b = a["weight"], a["bias"]
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    weight = _fetch(gm, w.target)
    bias = None if b is None else _fetch(gm, b.target)
    if not isinstance(weight, torch.Tensor) or (b is not None and not isinstance(bias, torch.Tensor)):
        return None
    params = [_as_param(weight)] + ([] if bias is None else [_as_param(bias)])
    if t == torch.ops.aten.linear.default:
        if weight.dim() != 2:
            return None
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    else:
        if t == torch.ops.aten.convolution.default and (a["transposed"] or any(a["output_padding"])):
            return None
        rest = [a["stride"], a["padding"], a["dilation"], a["groups"]]
        if weight.dim() != 4 or not _is_static(rest):
            return None
        stride, padding, dilation, groups = _pair(rest[0]), _pair(rest[1]), _pair(rest[2]), int(rest[3])
        layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride, padding,
                          dilation, groups, bias=bias is not None, device="meta", dtype=weight.dtype)
    layer.weight = params[0]
    if bias is not None:
        layer.bias = params[1]
    return layer, w, b


def _fetch(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _as_param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach(), requires_grad=False)


def _owner(gm: nn.Module, target: str) -> tuple[nn.Module | None, str, str]:
    path, _, attr = target.rpartition(".")
    return (_fetch(gm, path) if path else gm), path, attr


def lift_exported(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace conv/linear call_functions on get_attr weights by nn.Conv2d / nn.Linear submodules.

    In place; returns ``gm``.  When the weight lives at ``a.b.weight`` on a
    plain holder module (what ``ExportedProgram.module()`` produces), that
    holder is replaced by the real layer at the same path, so state_dict keys
    do not change; otherwise a new ``<target>_lifted`` submodule shares the
    tensors.  The computation is unchanged (nn.Conv2d/nn.Linear call the same
    kernels).  ``train()``/``eval()`` are re-enabled: they set the flags only;
    the graph keeps the batch-norm mode it was exported in.
    """
    replaced: set[str] = set()
    orphans: list[fx.Node] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        found = _layer_for(gm, node)
        if found is None:
            continue
        layer, w, b = found
        holder, path, attr = _owner(gm, w.target)
        users = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == w.target]
        same_holder = b is None or b.target == f"{path}.bias"
        plain = type(holder) is nn.Module and not list(holder.children()) and set(
            dict(holder.named_parameters(recurse=False)) | dict(holder.named_buffers(recurse=False))
        ) <= {"weight", "bias"} and (b is not None or not hasattr(holder, "bias"))
        if path and attr == "weight" and same_holder and plain and path not in replaced \
                and len(users) == 1 and len(w.users) == 1:
            parent, _, leaf = path.rpartition(".")
            setattr(_fetch(gm, parent) if parent else gm, leaf, layer)
            name = path
            replaced.add(path)
        else:
            base = w.target.replace(".", "_") + "_lifted"
            name, i = base, 1
            while hasattr(gm, name):
                name, i = f"{base}_{i}", i + 1
            gm.add_submodule(name, layer)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (_bind(node)["input"],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        orphans += [n for n in (w, b) if n is not None]
    for n in orphans:
        if n.graph is gm.graph and not n.users and n in gm.graph.nodes:
            target = n.target
            gm.graph.erase_node(n)
            if not any(m.op == "get_attr" and m.target == target for m in gm.graph.nodes):
                holder, path, attr = _owner(gm, target)
                if path not in replaced and holder is not None and hasattr(holder, attr):
                    delattr(holder, attr)
    gm.graph.lint()
    gm.recompile()
    for method in ("train", "eval"):  # ExportedProgram.module() disables them
        gm.__dict__.pop(method, None)
    return gm


def _load_pt2(data: bytes, label: str) -> nn.Module:
    """torch.export.load the program bytes, take .module() and lift its layers."""
    try:
        program = torch.export.load(io.BytesIO(data))
        gm = program.module()
    except Exception as e:
        raise KcompileError(f"{label}: cannot load the torch.export program: {_first_line(e)}") from None
    gm = lift_exported(gm)
    record = {"spec": "pt2", "kwargs": {}, "program": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    gm.kcompile_arch = record
    # GraphModule.__deepcopy__ keeps only attributes listed here (copy.deepcopy is how
    # kcompile.cluster makes its clustered copy).
    gm.meta.setdefault(_PRESERVED_KEY, {})["kcompile_arch"] = record
    return gm


# --------------------------------------------------------------------------- files

def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """torch.load with weights_only=True; pickled modules only when trusted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if not m:
            raise KcompileError(f"{path}: corrupt or not a PyTorch file ({_first_line(e)})") from None
        glob = m.group(1)
        if not trust_pickle:
            what = "contains pickled Python objects" if glob.startswith(_DATA_GLOBALS) else "is a pickled module"
            raise KcompileError(
                f"{path} {what} ({glob}); refusing to unpickle it (arbitrary code execution). "
                "Re-run with --trust-pickle if you trust the file"
            ) from None
    except EOFError:
        raise KcompileError(f"{path}: truncated file (unexpected end of data)") from None
    except Exception as e:
        raise KcompileError(f"{path}: corrupt or truncated file ({_first_line(e)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise KcompileError(f"{path}: cannot unpickle (--trust-pickle): {type(e).__name__}: {_first_line(e)}") from None


def load_model(source: str, arch: str | None = None, arch_kwargs: dict | None = None,
               trust_pickle: bool = False) -> nn.Module:
    """Load MODEL ``source`` as an nn.Module in eval mode (see the module docstring)."""
    kwargs = _kwargs(arch_kwargs)
    source = str(source)
    if source.startswith("zoo:"):
        if arch is not None:
            raise UsageError(f"{source} names its architecture itself; --arch is only for state_dict files")
        from . import zoo

        model = zoo.build(source[4:], **kwargs)
        model.kcompile_arch = {"spec": f"zoo:{source[4:]}", "kwargs": kwargs}
        return model.eval()

    path = Path(source).expanduser()
    if not path.exists():
        hint = ""
        if ":" in source:
            hint = " (only zoo:NAME names a model directly; other specs go with --arch and a state_dict)"
        raise KcompileError(f"{source}: no such file{hint}")
    if path.is_dir():
        raise KcompileError(f"{source}: is a directory, not a model file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise KcompileError(f"{source}: cannot read: {_first_line(e)}") from None
    if size == 0:
        raise KcompileError(f"{source}: empty file")

    def no_arch(kind: str) -> None:
        if arch is not None:
            raise UsageError(f"{source} is {kind} that describes itself; --arch is only for state_dict files")

    if path.suffix.lower() == ".pt2" or _is_export_archive(path):
        if not zipfile.is_zipfile(path):
            raise KcompileError(f"{source}: corrupt or truncated .pt2 (not a torch.export zip archive)")
        if _is_export_archive(path):
            no_arch("a torch.export program")
            try:
                data = path.read_bytes()
            except OSError as e:
                raise KcompileError(f"{source}: cannot read: {_first_line(e)}") from None
            return _load_pt2(data, source).eval()

    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        no_arch("a pickled module")
        cls = type(obj)
        obj.kcompile_arch = {"spec": "pickle", "class": f"{cls.__module__}.{cls.__qualname__}"}
        return obj.eval()
    if isinstance(obj, dict) and obj.get("format") == CLUSTERED_FORMAT:
        no_arch("a kcompile clustered checkpoint")
        try:
            from .checkpoint import load_clustered
        except ImportError as e:
            raise KcompileError(f"{source}: is a clustered checkpoint but kcompile.checkpoint "
                                f"is unavailable ({_first_line(e)})") from None
        return load_clustered(obj)
    state = _unwrap_state_dict(obj)
    if state is None:
        got = "an empty dict" if obj == {} else f"a {type(obj).__name__}"
        raise KcompileError(f"{source}: not a model file: it holds {got}, not a state_dict, "
                            "a kcompile clustered checkpoint or a torch.export program")
    if arch is None:
        raise UsageError(f"{source} is a state_dict; say which architecture it belongs to with "
                         "--arch SPEC (zoo:NAME, torchvision:NAME, package.module:callable or file.py:callable)")
    model = build_arch(arch, kwargs)
    _load_state(model, state, source, model.kcompile_arch["spec"])
    return model.eval()


def rebuild_arch(arch_record: dict) -> nn.Module:
    """Re-create an architecture from a ``kcompile_arch`` record.

    zoo/torchvision/module/file specs: the architecture with fresh
    (deterministic zoo, or the callable's own) weights, without shipped
    weights.  ``pt2``: the lifted program with the weights it was saved with.
    The result carries the record (as ``kcompile_arch``) and is in eval mode.
    """
    if not isinstance(arch_record, dict) or not isinstance(arch_record.get("spec"), str):
        raise KcompileError(f"bad architecture record {arch_record!r}: expected a dict with a 'spec' string")
    spec = arch_record["spec"]
    if spec == "pt2":
        prog = arch_record.get("program")
        if not isinstance(prog, torch.Tensor) or prog.dtype != torch.uint8:
            raise KcompileError("bad pt2 architecture record: 'program' must be a uint8 tensor of the .pt2 bytes")
        return _load_pt2(prog.contiguous().numpy().tobytes(), "embedded .pt2 program").eval()
    if spec == "pickle":
        raise KcompileError(f"cannot rebuild {arch_record.get('class', 'a model')} loaded from a pickled module: "
                            "the architecture is only in the pickle (load the original file with --trust-pickle)")
    return build_arch(spec, arch_record.get("kwargs") or {}).eval()


__all__ = ["build_arch", "lift_exported", "load_model", "rebuild_arch"]
