"""`kcompile.export`: write a model for a deployment target (onnx here; llvm/cuda compiled).

``export(model, path, target="onnx", input_shape=None, onnx_ops="custom")``:

- ``onnx``: an ONNX file whose clustered layers are ``com.kcompile`` nodes holding codebook +
  index initializers, each op carrying a standard-op function body (see ``onnx_export``).
  ``onnx_ops="portable"`` writes the same model with the functions inlined.
- ``llvm`` / ``cuda``: delegated to ``kcompile.compiler.export_library``.

The input shape is ``input_shape`` (N, C, H, W), else the zoo's default for a zoo model; the
batch dimension is dynamic unless ``input_shape`` is given (or ``dynamic_batch`` says so).
Writes are atomic: on any error no file is left at ``path``.
"""

from __future__ import annotations

import os

import torch.nn as nn

from .errors import KcompileError, UsageError
from .fileio import atomic_path

TARGETS = ("onnx", "llvm", "cuda")
ONNX_OPS = ("custom", "portable")


def resolve_input_shape(model: nn.Module, input_shape) -> tuple[int, int, int, int]:
    """``input_shape`` checked, else the model's default; UsageError when neither exists."""
    if input_shape is None:
        from .report import default_input_shape

        input_shape = default_input_shape(model)
        if input_shape is None:
            raise UsageError("the model has no default input shape: pass --input-shape N,C,H,W (e.g. 1,3,32,32)")
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise UsageError(f"invalid input shape {input_shape!r}: expected N,C,H,W") from None
    if len(shape) != 4 or min(shape) < 1:
        raise UsageError(f"invalid input shape {input_shape!r}: expected four positive integers N,C,H,W")
    return shape


def export(model: nn.Module, path: str | os.PathLike, target: str = "onnx", input_shape=None,
           onnx_ops: str = "custom", dynamic_batch: bool | None = None, index_bits4: bool = True,
           tune: bool = False) -> str:
    """Write ``model`` for ``target`` to ``path``; returns the path written. ``tune``
    (llvm): measured kernel tiles, see :func:`kcompile.compiler.compile_model`."""
    if target not in TARGETS:
        raise UsageError(f"unsupported target {target!r}: expected one of {', '.join(TARGETS)}")
    if target != "onnx":
        from .compiler import export_library

        export_library(model, path, target, resolve_input_shape(model, input_shape), tune=tune)
        return str(path)
    if onnx_ops not in ONNX_OPS:
        raise UsageError(f"unknown --onnx-ops {onnx_ops!r}: expected custom or portable")
    if dynamic_batch is None:
        dynamic_batch = input_shape is None
    shape = resolve_input_shape(model, input_shape)
    import onnx

    with atomic_path(path, suffix=".onnx") as tmp:  # checks the folder before the work
        m = build(model, shape, dynamic_batch, onnx_ops, index_bits4)
        try:
            onnx.save_model(m, tmp)
        except OSError as e:
            raise KcompileError(f"cannot write {path}: {e.strerror}") from None
    return str(path)


def build(model: nn.Module, shape, dynamic_batch: bool, onnx_ops: str, index_bits4: bool = True):
    """The checked onnx.ModelProto (errors from torch's exporter become one-line KcompileErrors)."""
    import onnx

    from .onnx_export import build_onnx

    try:
        m = build_onnx(model, shape, dynamic_batch=dynamic_batch, onnx_ops=onnx_ops, index_bits4=index_bits4)
    except KcompileError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # shape mismatch in forward, exporter failure
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KcompileError(f"cannot export the model for input shape {tuple(shape)}: {msg}") from None
    onnx.checker.check_model(m, full_check=True)
    return m
