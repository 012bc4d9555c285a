"""`kcompile export MODEL --target {onnx,llvm,cuda} [-o OUT] [--input-shape N,C,H,W] [--onnx-ops ...]`."""

from __future__ import annotations

import os
import warnings

import click

from .cli import load_cli_model, model_options, parse_shape
from .errors import UsageError

_SUFFIX = {"onnx": ".onnx", "llvm": ".so", "cuda": ".so"}


def _default_output(model: str, target: str) -> str:
    base = model[4:] if model.startswith("zoo:") else os.path.splitext(os.path.basename(model))[0]
    return f"{base.replace('/', '_') or 'model'}{'' if target == 'onnx' else '-' + target}{_SUFFIX[target]}"


@click.command()
@model_options
@click.option("--target", required=True, help="onnx, llvm or cuda.")
@click.option("-o", "--output", default=None, help="Output file (default: MODEL's name + .onnx / -TARGET.so).")
@click.option("--input-shape", default=None, help="N,C,H,W; fixes the batch dimension (default: the zoo's shape, dynamic batch).")
@click.option("--onnx-ops", default="custom", show_default=True,
              help="custom: com.kcompile ops with function bodies; portable: the functions inlined (standard ops only).")
@click.option("--tune", is_flag=True, default=False,
              help="llvm: time a few tile choices of each shared-centroid kernel here and keep the fastest.")
def export(model, arch, arch_kwargs, trust_pickle, target, output, input_shape, onnx_ops, tune):
    """Export MODEL: ONNX keeping codebook + index (onnx) or a compiled library (llvm, cuda)."""
    from .export import ONNX_OPS, TARGETS
    from .export import export as run_export

    if target not in TARGETS:
        raise UsageError(f"unsupported --target {target!r}: expected one of {', '.join(TARGETS)}")
    if onnx_ops not in ONNX_OPS:
        raise UsageError(f"unknown --onnx-ops {onnx_ops!r}: expected custom or portable")
    if tune and target != "llvm":
        raise UsageError(f"--tune measures kernels on this machine: it needs --target llvm, not {target}")
    shape = parse_shape(input_shape)
    output = output or _default_output(model, target)
    m = load_cli_model(model, arch, arch_kwargs, trust_pickle)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = run_export(m, output, target=target, input_shape=shape, onnx_ops=onnx_ops, tune=tune)
    for w in caught:
        if issubclass(w.category, UserWarning) and "dense fallback" in str(w.message):
            click.echo(f"kcompile: warning: {w.message}", err=True)
    size = os.path.getsize(path) if os.path.exists(path) else 0
    click.echo(f"wrote {path} ({size:,} bytes, target {target}{', ' + onnx_ops + ' ops' if target == 'onnx' else ''})")


COMMANDS = [export]
