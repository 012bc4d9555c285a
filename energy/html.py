"""Self-contained HTML reports: matplotlib figures embedded as base64 PNGs, no external links.

``page(title, body)`` wraps HTML fragments; ``figure(fig)`` turns a matplotlib figure into an
``<img src="data:image/png;base64,...">``; ``table(header, rows)`` escapes every cell.
``energy_html(report)`` renders an ``EnergyReport``: per-layer bars of compute vs data
movement, dense vs clustered side by side, totals, bit widths and the energy table.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

_STYLE = """
body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:90%}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#eee} td:first-child,th:first-child{text-align:left}
img{max-width:100%} .note{color:#666;font-size:90%}
"""


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure(fig) -> str:
    """An <img> tag holding ``fig`` as an embedded PNG (the figure is closed)."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(header, rows) -> str:
    """An HTML table; every cell is formatted with ``fmt`` and escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _bars(report):
    """Per-layer stacked bars (compute / data movement), dense and clustered side by side."""
    plt = _plt()
    layers = report.layers
    n = len(layers)
    fig, axes = plt.subplots(2, 1, figsize=(min(30, max(8, 0.22 * n + 4)), 8))
    x = np.arange(n)
    w = 0.4
    for ax, (title, get) in zip(axes, (
            ("Eyeriss-style (MAC units)", lambda l: (l.eyeriss.compute, l.eyeriss.data)),
            ("Deep k-Means metric (MAC units)", lambda l: (l.dkm.compute_units, l.dkm.data_units)))):
        dense = np.array([get(l.dense or l) for l in layers]).reshape(n, 2)
        clus = np.array([get(l) for l in layers]).reshape(n, 2)
        ax.bar(x - w / 2, dense[:, 0], w, color="#9ecae1", label="dense compute")
        ax.bar(x - w / 2, dense[:, 1], w, bottom=dense[:, 0], color="#3182bd", label="dense data movement")
        ax.bar(x + w / 2, clus[:, 0], w, color="#fdae6b", label="as deployed compute")
        ax.bar(x + w / 2, clus[:, 1], w, bottom=clus[:, 0], color="#e6550d", label="as deployed data movement")
        ax.set_xticks(x)
        ax.set_xticklabels([l.name for l in layers], rotation=80, fontsize=6)
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def energy_html(report, title: str = "kcompile energy report", extra: str = "") -> str:
    """The full energy report as one self-contained HTML page."""
    d = report.as_dict()
    t, td = d["total"], d["dense_total"]
    bw, bx = report.bits
    parts = [f"<p>Input shape {html.escape(str(d['input_shape']))}; weights {bw}-bit, activations {bx}-bit; "
             f"energy table: {html.escape(report.table.name)} ({html.escape(report.table.source)}); "
             f"dataflow tiles: {d['dataflow']}.</p>"]
    keys = ("macs", "fa_compute", "weight_rep", "activation_rep", "dkm_mac_units", "eyeriss", "joules_45nm", "weight_bits")
    parts.append("<h2>Totals</h2>" + table(
        ("", *keys), [("dense", *(td[k] for k in keys)), ("as deployed", *(t[k] for k in keys)),
                      ("ratio dense / deployed", *(td[k] / t[k] if t[k] else None for k in keys))]))
    if report.layers:
        parts.append("<h2>Per layer: compute vs data movement</h2>" + figure(_bars(report)))
    rows = [(l["name"], l["kind"], l["form"], l["macs"], l["fa_compute"], l["weight_rep"], l["activation_rep"],
             l["dkm_mac_units"], l["eyeriss"], (l.get("dense") or l)["eyeriss"], l["joules_45nm"]) for l in d["layers"]]
    parts.append("<h2>Layers</h2>" + table(("layer", "kind", "form", "MACs", "FA compute", "weight rep (bit-uses)",
                                             "activation rep (bit-uses)", "DKM (MACs)", "Eyeriss", "Eyeriss dense",
                                             "J (45 nm)"), rows))
    if d["not_modelled"]:
        parts.append("<h2>Not modelled</h2><p class=note>Layers the energy model does not know; their MACs "
                     "(rough counts) are listed, not included in the totals.</p>"
                     + table(("layer", "kind", "MACs"), [(n["name"], n["kind"], n["macs"]) for n in d["not_modelled"]]))
    tab = report.table.describe()
    parts.append("<h2>Energy table</h2>" + table(("key", "value"), [(k, v) for k, v in tab.items()]))
    parts.append(extra)
    return page(title, "".join(parts))
