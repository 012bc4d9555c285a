"""`kcompile energy MODEL`: Deep k-Means metrics and Eyeriss-style estimates per layer."""

from __future__ import annotations

import json

import click

from .cli import load_cli_model, model_options, parse_shape
from .errors import UsageError

DEFAULT_SHAPE = (1, 3, 32, 32)


def _input_shape(model, text):
    shape = parse_shape(text)
    if shape is not None:
        return shape
    from .report import default_input_shape

    return default_input_shape(model) or DEFAULT_SHAPE


def _print_table(report, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if not con.is_terminal:  # piped: do not squeeze the table into 80 columns
        con = Console(width=140)
    t = Table(title=title)
    for col in ("layer", "form", "MACs", "DKM", "Eyeriss", "dense Eyeriss", "uJ 45nm"):
        t.add_column(col, justify="left" if col in ("layer", "form") else "right",
                     no_wrap=True)
    for l in report.layers:
        t.add_row(l.name, l.form, f"{l.macs:,.0f}", f"{l.dkm.mac_units:.3g}", f"{l.eyeriss.total:.3g}",
                  f"{(l.dense or l).eyeriss.total:.3g}", f"{l.joules.total * 1e6:.3g}")
    con.print(t)
    tot, dt = report.total, report.dense_total
    con.print(f"bits: weights {report.bits[0]}, activations {report.bits[1]}; table: {report.table.name}")
    con.print(f"total: Eyeriss {tot['eyeriss']:.4g} MAC units (dense {dt['eyeriss']:.4g}, "
              f"{dt['eyeriss'] / max(tot['eyeriss'], 1e-30):.2f}x), Deep k-Means {tot['dkm_mac_units']:.4g} "
              f"(dense {dt['dkm_mac_units']:.4g}), {tot['joules_45nm'] * 1e6:.4g} uJ at 45 nm "
              f"(dense {dt['joules_45nm'] * 1e6:.4g} uJ)")
    if report.not_modelled:
        kinds: dict[str, list] = {}
        for n in report.not_modelled:
            kinds.setdefault(n.kind, []).append(n.macs)
        desc = ", ".join(f"{len(v)} {k} ({sum(v):,} MACs)" for k, v in kinds.items())
        con.print(f"not modelled (not in the totals): {desc}")


@click.command()
@model_options
@click.option("--input-shape", default=None, help="N,C,H,W (zoo models know theirs; else 1,3,32,32).")
@click.option("--json", "json_path", default=None, help="Write the per-layer estimates as JSON to FILE.")
@click.option("--html", "html_path", default=None, help="Write a self-contained HTML report to FILE.")
@click.option("--bits", default="8,8", show_default=True, help="Weight and activation bit widths W,A.")
@click.option("--table", "table_path", default=None,
              help="Energy table (JSON or TOML with 'normalised' and/or 'absolute_pj'); default Eyeriss + 45 nm.")
def energy(model, arch, arch_kwargs, trust_pickle, input_shape, json_path, html_path, bits, table_path):
    """Estimate MODEL's energy per layer: Deep k-Means metrics, Eyeriss-style and 45 nm joules."""
    from . import energy as en
    from .fileio import atomic_path

    bw_bx = en.parse_bits(bits)
    table = en.load_table(table_path)
    if json_path and html_path and json_path == html_path:
        raise UsageError("--json and --html must name different files")
    m = load_cli_model(model, arch, arch_kwargs, trust_pickle)
    report = en.estimate(m, _input_shape(m, input_shape), table=table, bits=bw_bx)
    _print_table(report, f"kcompile energy {model}")
    if json_path:
        d = report.as_dict()
        d["model"] = model
        with atomic_path(json_path) as tmp:
            with open(tmp, "w") as f:
                json.dump(d, f, indent=2)
        click.echo(f"wrote {json_path}")
    if html_path:
        from .energy.html import energy_html

        text = energy_html(report, title=f"kcompile energy {model}")
        with atomic_path(html_path) as tmp:
            with open(tmp, "w") as f:
                f.write(text)
        click.echo(f"wrote {html_path}")


COMMANDS = [energy]
