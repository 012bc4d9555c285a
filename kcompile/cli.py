"""The `kcompile` command line. Errors: one line on stderr, exit 2 (usage) or 1 (failure)."""

from __future__ import annotations

import json
import os
import sys

import click

from .errors import KcompileError, UsageError


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """'1,3,32,32' -> (1, 3, 32, 32); UsageError for anything else."""
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"invalid --input-shape {text!r}: expected N,C,H,W like 1,3,32,32") from None
    if len(shape) != 4 or min(shape) < 1:
        raise UsageError(f"invalid --input-shape {text!r}: expected four positive integers N,C,H,W")
    return shape


def parse_arch_kwargs(arch_kwargs: str | None) -> dict | None:
    """--arch-kwargs JSON text -> dict (None when absent); UsageError for anything else."""
    if not arch_kwargs:
        return None
    try:
        kwargs = json.loads(arch_kwargs)
    except json.JSONDecodeError as e:
        raise UsageError(f"--arch-kwargs is not valid JSON: {e.msg}") from None
    if not isinstance(kwargs, dict):
        raise UsageError("--arch-kwargs must be a JSON object like '{\"num_classes\": 10}'")
    return kwargs


def load_cli_model(model: str, arch: str | None, arch_kwargs: str | None, trust_pickle: bool):
    """kcompile.load with the CLI's --arch / --arch-kwargs / --trust-pickle."""
    from .loading import load_model

    return load_model(model, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs), trust_pickle=trust_pickle)


def model_options(f):
    """MODEL plus --arch, --arch-kwargs, --trust-pickle."""
    f = click.option("--trust-pickle", is_flag=True, help="Allow unpickling a whole pickled nn.Module (runs code from the file).")(f)
    f = click.option("--arch-kwargs", default=None, help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'.")(f)
    f = click.option("--arch", default=None, help="Architecture of a state_dict: zoo:NAME, torchvision:NAME, pkg.mod:callable, file.py:callable.")(f)
    f = click.argument("model")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kcompile")
def cli():
    """kcompile: cluster CNN weights, export codebook+index ONNX, compile shared-centroid kernels."""


# ---------------------------------------------------------------------------------- cluster
@cli.command()
@model_options
@click.option("-o", "--output", required=True, help="Output clustered checkpoint (.pth).")
@click.option("--method", required=True, help="son, kse, dkm or filter.")
@click.option("--k", "k", type=int, default=None, help="son: codebook size (256); dkm: centroids per layer.")
@click.option("--scope", default=None, help="son: network, layer, or ranges like 0-0=64,1-16=256.")
@click.option("--transforms", type=int, default=None, help="son: TIC transform-set size 1, 2, 4 or 8.")
@click.option("--G", "G", type=int, default=None, help="kse: G (4).")
@click.option("--T", "T", type=int, default=None, help="kse: T (0).")
@click.option("--q", "q", type=int, default=None, help="kse: every input channel gets min(q, O) centroids.")
@click.option("--rate", type=float, default=None, help="dkm: cluster rate K/N (0.1).")
@click.option("--sparsity", type=float, default=None, help="dkm: fraction of rows in a zero cluster.")
@click.option("--select", default=None, help="filter: fixed, inertia or wcss.")
@click.option("--ratio", type=float, default=None, help="filter: fraction of filters kept (fixed).")
@click.option("--limit", type=float, default=None, help="filter: inertia limit (inertia).")
@click.option("--wcss-range", default=None, help="filter: lo-hi fractions for the elbow search, e.g. 0.9-1.0.")
@click.option("--first-layer-only", is_flag=True, default=None, help="filter: cluster only the first conv.")
@click.option("--seed", type=int, default=None, help="Seed of k-means (0).")
@click.option("--skip", default=None, help="Comma-separated layer names kept dense.")
@click.option("--data", default=None, help="Fine-tuning data: digits, a .npz with x and y, or an image-folder tree.")
@click.option("--finetune-epochs", type=int, default=0, show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--retrain-epochs", type=int, default=0, show_default=True,
              help="dkm: re-train with the spectral k-means regulariser for N epochs before clustering (needs --data).")
@click.option("--lambda", "lam", type=float, default=1e-4, show_default=True, help="dkm re-training: regulariser weight lambda.")
@click.option("--dkm-relax", type=click.Choice(["spectral", "hard"]), default="spectral", show_default=True,
              help="dkm re-training: F from the truncated SVD (the paper) or from the normalised k-means assignment.")
@click.option("--svd-every", type=int, default=5, show_default=True, help="dkm re-training: epochs between SVD refreshes of F.")
def cluster(model, arch, arch_kwargs, trust_pickle, output, method, data, finetune_epochs, lr, batch_size,
            retrain_epochs, lam, dkm_relax, svd_every, **opts):
    """Cluster MODEL's weights with a method and write a self-describing checkpoint.

    Under `torchrun --nproc-per-node N -m kcompile.cli cluster ...` fine-tuning and dkm
    re-training run with DistributedDataParallel and only rank 0 writes OUT.
    """
    from .checkpoint import save
    from .cluster import METHODS, cluster as run_cluster, make_config

    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if finetune_epochs < 0:
        raise UsageError("--finetune-epochs must be >= 0")
    if (finetune_epochs or retrain_epochs) and not data:
        raise UsageError("--finetune-epochs / --retrain-epochs need --data (digits, a .npz or an image folder)")
    if retrain_epochs < 0 or retrain_epochs and method != "dkm":
        raise UsageError("--retrain-epochs must be >= 0 and applies to --method dkm only")
    opts = {k: v for k, v in opts.items() if v is not None and v is not False}
    from .distributed import env_world, is_initialized

    launched = env_world()  # torchrun's rank layout, validated; None for a plain run
    is_main = launched is None or launched.is_main
    m = load_cli_model(model, arch, arch_kwargs, trust_pickle)
    if retrain_epochs:
        from .data import load_dataset
        from .dkm_retrain import retrain_dkm

        make_config(method, opts)  # reject bad options before training
        cm = retrain_dkm(m, load_dataset(data)[0], epochs=retrain_epochs, lam=lam, svd_every=svd_every,
                         lr=lr, batch_size=batch_size, relax=dkm_relax, **opts)
    else:
        cm = run_cluster(m, method, **opts)
    if finetune_epochs:
        from .data import evaluate, load_dataset
        from .finetune import FinetuneConfig, finetune

        train, test = load_dataset(data)
        before = evaluate(cm, test)
        finetune(cm, train, FinetuneConfig(epochs=finetune_epochs, lr=lr, batch_size=batch_size))
        if is_main:
            click.echo(f"accuracy: dense {evaluate(m, test):.2f} %, clustered {before:.2f} %, fine-tuned {evaluate(cm, test):.2f} %")
    if is_main:  # under torchrun only rank 0 writes
        save(cm, output)
        click.echo(f"wrote {output} ({len(cm.kcompile_report)} layers clustered with {method})")
    if is_initialized():  # no rank tears the process group down while rank 0 still works
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------------- inspect
@cli.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--input-shape", default=None, help="N,C,H,W used to count FLOPs (zoo models know theirs).")
@click.option("--invalid-threshold", type=float, default=None,
              help="Also count invalid filters (L1 norm below this threshold), per layer and in total.")
def inspect(model, arch, arch_kwargs, trust_pickle, as_json, input_shape, invalid_threshold):
    """Per-layer method, unit, K, index bits, bytes, compression ratios and FLOPs."""
    from .report import inspect_model

    if invalid_threshold is not None and invalid_threshold <= 0:
        raise UsageError(f"--invalid-threshold must be positive (got {invalid_threshold})")
    m = load_cli_model(model, arch, arch_kwargs, trust_pickle)
    rep = inspect_model(m, parse_shape(input_shape))
    if invalid_threshold is not None:
        from .invalid_filters import invalid_filters

        rep["invalid_filters"] = invalid_filters(m, invalid_threshold)
    if as_json:
        click.echo(json.dumps(rep, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"kcompile inspect {model}")
    for col in ("layer", "method", "unit", "K", "idx bits", "dense B", "compressed B", "ratio", "MACs dense", "MACs shared", "form"):
        t.add_column(col, justify="left" if col in ("layer", "method", "unit", "form") else "right")
    for r in rep["layers"]:
        t.add_row(r["name"], r["method"], r["unit"], str(r["K"]), str(r["index_bits"]), f"{r['dense_bytes']:,}",
                  f"{r['compressed_bytes']:,}", f"{r['dense_bytes'] / max(r['compressed_bytes'], 1):.1f}x",
                  f"{r.get('macs_dense', 0):,}", f"{r.get('macs_shared', 0):,}", r.get("macs_form", ""))
    con = Console()
    con.print(t)
    con.print(f"model: {rep['dense_bytes']:,} B dense -> {rep['compressed_bytes']:,} B "
              f"(compression {rep['compression_ratio']:.2f}x; clustered layers {rep['clustered_layers_ratio']:.2f}x)")
    for k, v in rep["method_ratios"].items():
        con.print(f"  {k} accounting: {v:.2f}x")
    inv = rep.get("invalid_filters")
    if inv is not None:
        per = ", ".join(f"{n} {v['invalid']}/{v['filters']}" for n, v in inv["layers"].items() if v["invalid"])
        con.print(f"invalid filters (L1 < {inv['threshold']}): {inv['invalid']}/{inv['filters']}" + (f" ({per})" if per else ""))
    if rep["macs_dense"] is not None:
        con.print(f"MACs per image: dense {rep['macs_dense']:,} -> clustered {rep['macs_clustered']:,} "
                  f"({rep['macs_dense'] / max(rep['macs_clustered'], 1):.2f}x fewer, accumulations counted)")


# ---------------------------------------------------------------------------------- demo
@cli.command()
@click.option("--epochs", type=int, default=3, show_default=True, help="Fine-tuning epochs per method.")
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs per backend (median reported).")
@click.option("--threads", type=int, default=2, show_default=True, help="Threads of every backend while timing.")
@click.option("-o", "--output-dir", default="kcompile-demo", show_default=True, help="Where artifacts and report.html go.")
def demo(epochs, runs, threads, output_dir):
    """Cluster the embedded zoo:digits-resnet with every method, fine-tune, export, compile, time and report."""
    from .demo import run_demo

    if epochs < 0 or runs < 1 or threads < 1:
        raise UsageError("--epochs must be >= 0, --runs >= 1 and --threads >= 1")
    run_demo(epochs=epochs, runs=runs, out_dir=output_dir, threads=threads)


_registered = False


def _register_optional_commands() -> None:
    """Add the commands that live in their own modules (export, bench, energy, graft), once."""
    global _registered
    if _registered:
        return
    _registered = True
    import importlib

    for name in ("cli_export", "cli_bench", "cli_energy", "cli_graft"):
        try:
            mod = importlib.import_module(f"kcompile.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"kcompile.{name}":
                raise
            continue
        for command in mod.COMMANDS:
            cli.add_command(command)


def _leave_process_group(code: int) -> None:
    """A process that torchrun started (several ranks, a group initialised): once the command
    succeeded, every rank waits for the others and the process ends there with ``code``
    (``kcompile.distributed.finish_and_exit``: no teardown)."""
    if "torch.distributed" not in sys.modules:
        return
    from .distributed import env_world, finish_and_exit

    env = env_world()
    if env is not None and env.world_size > 1:
        finish_and_exit(code)  # a no-op unless the command joined the group


def main(argv=None) -> None:
    """Entry point: runs the CLI and turns every error into one line and an exit code."""
    import warnings

    def _one_line_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            return  # libraries' API deprecations are not the user's business
        click.echo(f"kcompile: warning: {str(message).splitlines()[0]}", err=True)

    warnings.showwarning = _one_line_warning
    try:
        _register_optional_commands()
        rv = cli.main(args=argv, prog_name="kcompile", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
        if argv is None:  # the real command line (tests call main(argv) in their own process)
            _leave_process_group(code)
        sys.exit(code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("kcompile: aborted", err=True)
        sys.exit(1)
    except click.UsageError as e:
        click.echo(f"kcompile: error: {e.format_message()}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"kcompile: error: {e.format_message()}", err=True)
        sys.exit(1)
    except KcompileError as e:
        click.echo(f"kcompile: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("kcompile: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # a bug in kcompile: still one line, no traceback unless asked
        if os.environ.get("KCOMPILE_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        click.echo(f"kcompile: internal error: {type(e).__name__}: {msg} (set KCOMPILE_DEBUG=1 for details)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    from kcompile.cli import main as _main  # the package module, so that command modules see one cli

    _main()
