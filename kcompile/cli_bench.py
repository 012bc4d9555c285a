"""`kcompile bench`: per-backend latency of layers / models, dense baseline in the same run."""

from __future__ import annotations

import json

import click

from .errors import UsageError


ESTIMATES = (("eyeriss", "Eyeriss-style estimate (MAC units)"), ("macs", "MACs as deployed"))


def bench_html(result, title: str = "kcompile bench", estimates=ESTIMATES, intro: str = "") -> str:
    """Self-contained HTML: the records, the skipped backends, and per backend a scatter plot of
    estimated energy (Eyeriss-style) vs measured latency over the layer records."""
    import html as H

    from .energy.html import _plt, figure, page, table

    recs = result.records
    parts = [intro, f"<p>Machine: {H.escape(json.dumps(result.machine))}</p>"]
    cols = ("model", "layer", "backend", "batch", "threads", "median_ms", "min_ms", "max_ms", "runs",
            "dense_median_ms", "speedup_vs_dense", "eyeriss", "macs")
    parts.append("<h2>Measurements</h2>" + table(cols, [[r.get(c) for c in cols] for r in recs]))
    if result.notes:
        parts.append("<h2>Notes (skipped backends, mismatches)</h2><ul>"
                     + "".join(f"<li>{H.escape(n)}</li>" for n in result.notes) + "</ul>")
    for key, label in estimates:
        corr = result.correlations(key)
        if not corr:
            continue
        parts.append(f"<h2>{H.escape(label)} vs measured latency</h2>" + table(
            ("backend", "points", "Spearman", "R^2"), [(b, c["points"], c["spearman"], c["r2"]) for b, c in corr.items()]))
        plt = _plt()
        n = len(corr)
        ncol = min(3, n)
        nrow = -(-n // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 4.0 * nrow), squeeze=False)
        for ax in axes.flat[n:]:
            ax.axis("off")
        for ax, (b, c) in zip(axes.flat, corr.items()):
            rs = [r for r in recs if r["backend"] == b and r["layer"] is not None and r.get(key) is not None]
            dense = [r for r in rs if r.get("method") == "dense"]
            clus = [r for r in rs if r.get("method") != "dense"]
            ax.scatter([r[key] for r in dense], [r["median_ms"] for r in dense], s=14, label="dense")
            ax.scatter([r[key] for r in clus], [r["median_ms"] for r in clus], s=14, marker="x", label="clustered")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{b}\nSpearman {c['spearman']:.3f}, R^2 {c['r2']:.3f}", fontsize=9)
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylabel("median latency (ms)", fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        parts.append(figure(fig))
    return page(title, "".join(parts))


def _print(result, con) -> None:
    from rich.table import Table

    t = Table(title="kcompile bench")
    for col in ("model", "layer", "backend", "median ms", "min", "max", "runs", "dense ms", "speed-up"):
        t.add_column(col, justify="left" if col in ("model", "layer", "backend") else "right", no_wrap=True)
    for r in result.records:
        sp = r.get("speedup_vs_dense")
        t.add_row(r["model"], r["layer"] or "-", r["backend"], f"{r['median_ms']:.3f}", f"{r['min_ms']:.3f}",
                  f"{r['max_ms']:.3f}", str(r["runs"]),
                  "-" if r.get("dense_median_ms") is None else f"{r['dense_median_ms']:.3f}",
                  "-" if sp is None else f"{sp:.2f}x")
    con.print(t)
    for n in result.notes:
        con.print(f"note: {n}", markup=False, highlight=False)
    corr = result.correlations("eyeriss")
    for b, c in corr.items():
        con.print(f"energy vs latency [{b}]: Spearman {c['spearman']:.3f}, R^2 {c['r2']:.3f} over {c['points']} layers",
                  markup=False, highlight=False)


@click.command()
@click.argument("models", nargs=-1)
@click.option("--suite", type=click.Choice(["layers", "models"]), default=None,
              help="layers: resnet18's 3x3 conv shapes x the kernels issue's clusterings; models: zoo models dense vs clustered.")
@click.option("--backends", default=None, help="Comma-separated: torch-dense, torch-decoded, onnxruntime-custom, "
              "onnxruntime-stock, numba, tvm-llvm, numba-cuda, tvm-cuda (aliases: torch, onnxruntime, tvm, "
              "cuda, all). Default: all CPU backends (and the CUDA ones when a GPU exists).")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--runs", type=int, default=30, show_default=True, help="Timed runs after warm-up.")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--input-shape", default=None, help="N,C,H,W for MODEL paths without a default (N is replaced by --batch).")
@click.option("--per-layer", is_flag=True, help="Time each conv of MODEL as a one-layer case (dense and clustered twins).")
@click.option("--json", "json_path", default=None, help="Write the records (a JSON list) to FILE.")
@click.option("--html", "html_path", default=None, help="Write a self-contained HTML report to FILE.")
@click.option("--arch", default=None, help="Architecture of state_dict MODELs (see kcompile cluster --help).")
@click.option("--arch-kwargs", default=None, help="JSON keyword arguments for --arch.")
@click.option("--trust-pickle", is_flag=True, help="Allow unpickling whole pickled modules.")
def bench(models, suite, backends, batch, threads, runs, warmup, input_shape, per_layer, json_path, html_path,
          arch, arch_kwargs, trust_pickle):
    """Time MODELs (or a suite) on each backend; median/min/max of --runs after warm-up."""
    from rich.console import Console

    from .bench import (Case, layer_suite, model_layer_cases, model_suite, parse_backends, pin_threads,
                        run_bench)
    from .cli import load_cli_model, parse_shape
    from .fileio import atomic_path

    if not models and not suite:
        raise UsageError("give MODEL paths or --suite layers|models")
    for name, v, lo in (("--batch", batch, 1), ("--threads", threads, 1), ("--runs", runs, 1), ("--warmup", warmup, 0)):
        if v < lo:
            raise UsageError(f"{name} must be >= {lo} (got {v})")
    if json_path and html_path and json_path == html_path:
        raise UsageError("--json and --html must name different files")
    chosen = parse_backends(backends)
    shape = parse_shape(input_shape)
    pin_threads(threads)
    cases = []
    for spec in models:
        m = load_cli_model(spec, arch, arch_kwargs, trust_pickle).eval()
        from .report import default_input_shape

        s = shape or default_input_shape(m)
        if s is None:
            raise UsageError(f"{spec} has no default input shape: pass --input-shape N,C,H,W")
        s = (batch, *tuple(s)[1:])
        if per_layer:
            from .bench import densify

            dense = densify(m)
            cases += model_layer_cases(dense, spec, s, clustered=m)
        else:
            cases.append(Case(spec, None, m, s, "clustered" if any(
                callable(getattr(x, "clustered_weight", None)) for x in m.modules()) else "dense"))
    if suite == "layers":
        cases += layer_suite(batch)
    elif suite == "models":
        cases += model_suite(batch)
    con = Console(stderr=False)
    result = run_bench(cases, chosen, threads=threads, runs=runs, warmup=warmup)
    if not con.is_terminal:
        con = Console(width=160)
    _print(result, con)
    if json_path:
        with atomic_path(json_path) as tmp:
            with open(tmp, "w") as f:
                json.dump(result.records, f, indent=2)
        click.echo(f"wrote {json_path}")
    if html_path:
        text = bench_html(result)
        with atomic_path(html_path) as tmp:
            with open(tmp, "w") as f:
                f.write(text)
        click.echo(f"wrote {html_path}")


COMMANDS = [bench]
