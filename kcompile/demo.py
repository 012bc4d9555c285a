"""`kcompile demo`: the main job on the embedded zoo:digits-resnet, every method side by side.

For each method: cluster, fine-tune briefly (indices fixed), export ONNX (custom ops and
portable) and a compiled TVM module, check that every runtime agrees with PyTorch, estimate
energy, time every CPU backend against the dense model in the same run, then print one
summary table and write a self-contained HTML report.
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

# (method, options, label): the settings the acceptance figures are stated for
DEMO_METHODS = (
    ("son", {"k": 64}, "son K=64"),
    ("kse", {"G": 4}, "kse G=4"),
    ("dkm", {"rate": 0.25}, "dkm rate=0.25"),
    ("filter", {"select": "fixed", "ratio": 0.5}, "filter fixed 0.5"),
)
BACKENDS = ("torch-dense", "torch-decoded", "onnxruntime-custom", "onnxruntime-stock", "numba", "tvm-llvm")
INPUT_SHAPE = (1, 1, 8, 8)


def _agreement(cm, files: dict, x: np.ndarray) -> dict:
    """Max |difference| / output range of each exported artifact vs PyTorch on batch ``x``."""
    from .ort import onnxruntime_session

    with torch.no_grad():
        ref = cm(torch.from_numpy(x)).numpy()
    span = float(ref.max() - ref.min()) or 1.0
    out = {}
    for label, path, custom in (("onnx custom ops", files["custom"], True),
                                ("onnx stock (function bodies)", files["custom"], False),
                                ("onnx portable", files["portable"], False)):
        sess = onnxruntime_session(path, threads=2, custom_ops=custom)
        y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        out[label] = float(np.abs(y - ref).max()) / span
    return out


def run_demo(epochs: int = 2, runs: int = 30, out_dir: str | os.PathLike = "kcompile-demo",
             methods=DEMO_METHODS, backends=BACKENDS, console: Console | None = None,
             show_progress: bool = True) -> list[dict]:
    """Run the demo; returns one row per method and writes ``out_dir``/report.html.

    Each row: label, accuracies (dense / clustered / fine-tuned, %), compression (bytes),
    the method's own ratio, MACs ratio, Eyeriss-style energy ratio dense/clustered, max
    relative error of every exported artifact, latency per backend (median ms, batch 1)
    and the speed-up of each backend over the dense model timed in the same run.
    """
    from . import energy
    from .bench import Case, run_bench
    from .cluster import cluster
    from .data import evaluate, load_dataset
    from .export import export
    from .finetune import FinetuneConfig, finetune
    from .loading import load_model
    from .report import inspect_model

    console = console or Console(width=max(Console().width, 160))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model("zoo:digits-resnet")
    train, test = load_dataset("digits")
    dense_acc = evaluate(model, test)
    x = torch.stack([test[i][0] for i in range(4)]).numpy()
    rows = []
    for method, opts, label in methods:
        t0 = time.perf_counter()
        cm = cluster(model, method, **opts)
        clustered_acc = evaluate(cm, test)
        if epochs:
            finetune(cm, train, FinetuneConfig(epochs=epochs, lr=0.01), show_progress=show_progress)
        rep = inspect_model(cm)
        files = {"custom": out / f"{method}.onnx", "portable": out / f"{method}-portable.onnx",
                 "llvm": out / f"{method}-llvm.so"}
        export(cm, files["custom"], target="onnx", onnx_ops="custom")
        export(cm, files["portable"], target="onnx", onnx_ops="portable")
        export(cm, files["llvm"], target="llvm", input_shape=INPUT_SHAPE)
        agree = _agreement(cm, files, x)
        en = energy.estimate(cm, INPUT_SHAPE)
        bench = run_bench([Case("digits-resnet", None, cm, INPUT_SHAPE, method=method)], backends=backends,
                          threads=2, runs=runs, warmup=3, show_progress=show_progress)
        lat = {r["backend"]: r for r in bench.records}
        for r in bench.records:
            if r.get("max_abs_err") is not None:
                agree[r["backend"]] = r["max_abs_err"]
        rows.append({
            "label": label, "method": method, "dense_acc": dense_acc, "clustered_acc": clustered_acc,
            "finetuned_acc": evaluate(cm, test), "compression": rep["compression_ratio"],
            "method_ratios": rep["method_ratios"], "macs_ratio": rep["macs_dense"] / rep["macs_clustered"],
            "energy_ratio": en.dense_total["eyeriss"] / en.total["eyeriss"],
            "joules_45nm": en.total["joules_45nm"], "agreement": agree,
            "latency_ms": {b: r["median_ms"] for b, r in lat.items()},
            "notes": bench.notes, "files": {k: str(v) for k, v in files.items()},
            "seconds": time.perf_counter() - t0,
        })
    _print_table(console, rows, dense_acc, epochs, backends)
    report = out / "report.html"
    _write_html(report, rows, dense_acc, epochs, backends)
    console.print(f"artifacts and report: {out}/ ({report.name})")
    return rows


def _best(row: dict) -> tuple[str, float]:
    lat = row["latency_ms"]
    dense = lat.get("torch-dense")
    cands = {b: v for b, v in lat.items() if b != "torch-dense"}
    if not dense or not cands:
        return "-", float("nan")
    b = min(cands, key=cands.get)
    return b, dense / cands[b]


def _print_table(console: Console, rows, dense_acc, epochs, backends) -> None:
    t = Table(title=f"kcompile demo: zoo:digits-resnet (dense accuracy {dense_acc:.2f} %, {epochs} fine-tuning "
                    "epochs; latency = median ms at batch 1, 2 threads)")
    cols = ["method", "acc clustered", "acc fine-tuned", "Δ dense", "size", "own ratio", "MACs", "energy",
            "max rel err", *[b.replace("onnxruntime", "ort") for b in backends], "best vs dense"]
    for c in cols:
        t.add_column(c, justify="left" if c == "method" else "right")
    for r in rows:
        own = ", ".join(f"{v:.1f}x" for v in r["method_ratios"].values())
        best, sp = _best(r)
        t.add_row(r["label"], f"{r['clustered_acc']:.2f}", f"{r['finetuned_acc']:.2f}",
                  f"{r['finetuned_acc'] - dense_acc:+.2f}", f"{r['compression']:.2f}x", own,
                  f"{r['macs_ratio']:.2f}x", f"{r['energy_ratio']:.2f}x", f"{max(r['agreement'].values()):.1e}",
                  *[f"{r['latency_ms'][b]:.3f}" if b in r["latency_ms"] else "skip" for b in backends],
                  f"{sp:.2f}x ({best})")
    console.print(t)
    for r in rows:
        for n in r["notes"]:
            console.print(f"  note ({r['label']}): {n}")


def _write_html(path: Path, rows, dense_acc, epochs, backends) -> None:
    from .energy.html import figure, page, table
    from .fileio import atomic_path

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    header = ["method", "acc clustered %", "acc fine-tuned %", "size ratio", "MACs ratio", "energy ratio",
              "max rel err", *[f"{b} ms" for b in backends]]
    body = [[r["label"], r["clustered_acc"], r["finetuned_acc"], r["compression"], r["macs_ratio"], r["energy_ratio"],
             max(r["agreement"].values()), *[r["latency_ms"].get(b) for b in backends]] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    w = 0.8 / len(backends)
    for i, b in enumerate(backends):
        ax.bar([j + i * w for j in range(len(rows))], [r["latency_ms"].get(b, 0) for r in rows], w, label=b)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(rows))], [r["label"] for r in rows])
    ax.set_ylabel("median ms (batch 1)")
    ax.legend(fontsize=7, ncol=3)
    notes = "".join(f"<li>{html.escape(r['label'])}: {html.escape(n)}</li>" for r in rows for n in r["notes"])
    doc = page("kcompile demo: zoo:digits-resnet",
               f"<p>Dense accuracy {dense_acc:.2f} %; {epochs} fine-tuning epochs per method (indices fixed). "
               "Energy ratio = Eyeriss-style estimate dense / clustered. Latency: median of the timed runs, "
               "the dense model timed in the same run.</p>" + table(header, body) + figure(fig)
               + (f"<ul class='note'>{notes}</ul>" if notes else ""))
    with atomic_path(path, suffix=".html") as tmp:
        Path(tmp).write_text(doc, encoding="utf-8")
