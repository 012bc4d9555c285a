"""`kcompile demo`: the main job on the embedded zoo:digits-resnet, every method side by side."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

# (method, options, label): the settings the acceptance figures are stated for
DEMO_METHODS = (
    ("son", {"k": 64}, "son K=64"),
    ("kse", {"G": 4}, "kse G=4"),
    ("dkm", {"rate": 0.25}, "dkm rate=0.25"),
    ("filter", {"select": "fixed", "ratio": 0.5}, "filter fixed 0.5"),
)


def run_demo(epochs: int = 3, console: Console | None = None, show_progress: bool = True) -> list[dict]:
    """Cluster, fine-tune (indices fixed) and evaluate each method; print and return the rows.

    Each row: label, accuracy dense / clustered / fine-tuned (%), compression (bytes of the
    whole model and of the clustered layers), the method's own ratio, MACs ratio.
    """
    from .cluster import cluster
    from .data import evaluate, load_dataset
    from .finetune import FinetuneConfig, finetune
    from .loading import load_model
    from .report import inspect_model

    console = console or Console(width=max(Console().width, 150))
    model = load_model("zoo:digits-resnet")
    train, test = load_dataset("digits")
    dense_acc = evaluate(model, test)
    rows = []
    for method, opts, label in DEMO_METHODS:
        t0 = time.perf_counter()
        cm = cluster(model, method, **opts)
        clustered_acc = evaluate(cm, test)
        finetune(cm, train, FinetuneConfig(epochs=epochs, lr=0.01), show_progress=show_progress)
        rep = inspect_model(cm)
        rows.append({
            "label": label, "method": method, "dense_acc": dense_acc, "clustered_acc": clustered_acc,
            "finetuned_acc": evaluate(cm, test), "compression": rep["compression_ratio"],
            "clustered_layers_ratio": rep["clustered_layers_ratio"], "method_ratios": rep["method_ratios"],
            "macs_ratio": rep["macs_dense"] / rep["macs_clustered"], "seconds": time.perf_counter() - t0,
        })
    t = Table(title=f"kcompile demo: zoo:digits-resnet (dense accuracy {dense_acc:.2f} %, {epochs} fine-tuning epochs)")
    for col in ("method", "acc clustered", "acc fine-tuned", "Δ vs dense", "model size", "clustered layers",
                "method's own ratio", "MACs", "time"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        own = ", ".join(f"{k} {v:.1f}x" for k, v in r["method_ratios"].items())
        t.add_row(r["label"], f"{r['clustered_acc']:.2f} %", f"{r['finetuned_acc']:.2f} %",
                  f"{r['finetuned_acc'] - dense_acc:+.2f}", f"{r['compression']:.2f}x",
                  f"{r['clustered_layers_ratio']:.2f}x", own, f"{r['macs_ratio']:.2f}x fewer", f"{r['seconds']:.1f} s")
    console.print(t)
    return rows
