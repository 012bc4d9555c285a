"""`kcompile demo`: the main job on the embedded zoo:digits-resnet, every method side by side.

For each method: cluster, fine-tune briefly (indices fixed), export ONNX (custom ops and
portable) and a compiled TVM module, check that every runtime agrees with PyTorch, estimate
energy, time every CPU backend against the dense model in the same run, then print one
summary table and write a self-contained HTML report.

Time and threads (2 shared cores): clustering, fine-tuning and evaluation run with torch at
``train_threads`` (1: on an oversubscribed machine 2-thread OpenMP barriers wait for a core,
and a 1-thread epoch was 3-4x faster here); timing runs at ``threads``. What is timed is
what was written: the ONNX sessions of the exported files (the same sessions that are
checked) and the exported TVM library loaded back, so each model is compiled by TVM once.
"""

from __future__ import annotations

import contextlib
import html
import json
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
DEMO_MODEL = "zoo:digits-resnet"


@contextlib.contextmanager
def torch_threads(n: int):
    """torch intra-op threads set to ``n`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def open_sessions(files: dict, threads: int) -> dict:
    """onnxruntime sessions of the exported files: {"custom" (kcompile ops), "stock" (the same
    file, the ops' function bodies), "portable" (the inlined file)}."""
    from .ort import onnxruntime_session

    return {"custom": onnxruntime_session(files["custom"], threads=threads, custom_ops=True),
            "stock": onnxruntime_session(files["custom"], threads=threads, custom_ops=False),
            "portable": onnxruntime_session(files["portable"], threads=threads, custom_ops=False)}


def load_library(path) -> "object":
    """The TVM library written by ``export(target="llvm")`` loaded back as a callable
    ``kcompile.compiler.CompiledModel`` (x (N, C, H, W) float32 numpy -> y numpy), using the
    ``<stem>.json`` written next to it (input/output shapes, layers)."""
    import tvm

    from .compiler import CompiledModel

    path = Path(path)
    meta = json.loads(path.with_name(path.stem + ".json").read_text())
    return CompiledModel(meta["target"], meta["input_shape"], meta["output_shape"], meta["layers"],
                         executable=tvm.runtime.load_module(str(path)))


def _agreement(cm, sessions: dict, x: np.ndarray) -> dict:
    """Max |difference| / output range of each exported ONNX artifact vs PyTorch on batch ``x``
    (N, C, H, W)."""
    with torch.no_grad():
        ref = cm(torch.from_numpy(x)).numpy()
    span = float(ref.max() - ref.min()) or 1.0
    out = {}
    for label, key in (("onnx custom ops", "custom"), ("onnx stock (function bodies)", "stock"),
                       ("onnx portable", "portable")):
        sess = sessions[key]
        y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        out[label] = float(np.abs(y - ref).max()) / span
    return out


def run_demo(epochs: int = 2, runs: int = 30, out_dir: str | os.PathLike = "kcompile-demo",
             methods=DEMO_METHODS, backends=BACKENDS, console: Console | None = None,
             show_progress: bool = True, threads: int = 2, train_threads: int = 1,
             check_torch: bool = True) -> list[dict]:
    """Run the demo; returns one row per method and writes ``out_dir``/report.html.

    Each row: label, accuracies (dense / clustered / fine-tuned, %), compression (bytes),
    the method's own ratio, MACs ratio, Eyeriss-style energy ratio dense/clustered, max
    relative error of every exported artifact, latency per backend (median ms, batch 1,
    ``threads`` threads), the notes of the timing run, ``seconds`` and ``stage_seconds``
    (cluster, fine-tune, export onnx, export tvm, load + check, bench) and ``torch_check``.
    ``check_torch``: also time the dense model alone in a fresh process (torch the only
    runtime there) and hold the run's torch-dense figures against it (``torch_check``:
    fresh_median_ms, fresh_min_ms, note).
    """
    from .bench import TorchAlone, pin_threads
    from .data import evaluate, load_dataset
    from .loading import load_model

    console = console or Console(width=max(Console().width, 160))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pin_threads(threads)  # before any runtime starts its pool (TVM reads its settings then)
    alone = TorchAlone(DEMO_MODEL, INPUT_SHAPE, threads, runs) if check_torch and "torch-dense" in backends else None
    try:
        with torch_threads(train_threads):
            model = load_model(DEMO_MODEL)
            train, test = load_dataset("digits")
            dense_acc = evaluate(model, test)
        x = torch.stack([test[i][0] for i in range(4)]).numpy()
        rows = [_run_method(model, (train, test), dense_acc, x, method, opts, label, out, epochs=epochs, runs=runs,
                            backends=backends, threads=threads, train_threads=train_threads,
                            show_progress=show_progress)
                for method, opts, label in methods]
        check = _torch_check(alone, rows, threads)
    finally:
        if alone is not None:
            alone.close()
    for r in rows:
        r["torch_check"] = check
    _print_table(console, rows, dense_acc, epochs, backends, threads, check)
    report = out / "report.html"
    _write_html(report, rows, dense_acc, epochs, backends, threads, check)
    console.print(f"artifacts and report: {out}/ ({report.name})")
    return rows


def _run_method(model, data, dense_acc: float, x: np.ndarray, method: str, opts: dict, label: str, out: Path, *,
                epochs: int, runs: int, backends, threads: int, train_threads: int, show_progress: bool) -> dict:
    """One method of the demo (cluster, fine-tune, export, check, time): its table row.
    ``data`` = (train, test) datasets of (1, 8, 8) images; ``x`` (4, 1, 8, 8) the check batch."""
    from . import energy
    from .bench import Case, run_bench, session_runner
    from .cluster import cluster
    from .data import evaluate
    from .export import export
    from .finetune import FinetuneConfig, finetune
    from .report import inspect_model

    train, test = data
    t0 = time.perf_counter()
    stages: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(name):
        t = time.perf_counter()
        yield
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t

    files = {"custom": out / f"{method}.onnx", "portable": out / f"{method}-portable.onnx",
             "llvm": out / f"{method}-llvm.so"}
    with torch_threads(train_threads):
        with stage("cluster"):
            cm = cluster(model, method, **opts)
            clustered_acc = evaluate(cm, test)
        with stage("fine-tune"):
            if epochs:
                finetune(cm, train, FinetuneConfig(epochs=epochs, lr=0.01), show_progress=show_progress)
            finetuned_acc = evaluate(cm, test)
        rep = inspect_model(cm)
        with stage("export onnx"):
            export(cm, files["custom"], target="onnx", onnx_ops="custom")
            export(cm, files["portable"], target="onnx", onnx_ops="portable")
        with stage("export tvm"):
            export(cm, files["llvm"], target="llvm", input_shape=INPUT_SHAPE)
        en = energy.estimate(cm, INPUT_SHAPE)
    with stage("load + check"):
        sessions = open_sessions(files, threads)
        agree = _agreement(cm, sessions, x)
        runners = {"onnxruntime-custom": session_runner(sessions["custom"], custom=True),
                   "onnxruntime-stock": session_runner(sessions["stock"], custom=False),
                   "tvm-llvm": load_library(files["llvm"])}
    with stage("bench"):
        case = Case(DEMO_MODEL[4:], None, cm, INPUT_SHAPE, method=method,
                    runners={b: f for b, f in runners.items() if b in backends})
        bench = run_bench([case], backends=backends, threads=threads, runs=runs, warmup=3,
                          show_progress=show_progress)
    for r in bench.records:
        if r.get("max_abs_err") is not None:
            agree[r["backend"]] = r["max_abs_err"]
    return {
        "label": label, "method": method, "dense_acc": dense_acc, "clustered_acc": clustered_acc,
        "finetuned_acc": finetuned_acc, "compression": rep["compression_ratio"],
        "method_ratios": rep["method_ratios"], "macs_ratio": rep["macs_dense"] / rep["macs_clustered"],
        "energy_ratio": en.dense_total["eyeriss"] / en.total["eyeriss"],
        "joules_45nm": en.total["joules_45nm"], "agreement": agree,
        "latency_ms": {r["backend"]: r["median_ms"] for r in bench.records},
        "notes": bench.notes, "files": {k: str(v) for k, v in files.items()},
        "seconds": time.perf_counter() - t0, "stage_seconds": stages,
    }


#: a run's torch-dense median this many times the fresh-process figure is called stalled
STALL_RATIO = 3.0


def _torch_check(alone, rows: list[dict], threads: int) -> dict:
    """The fresh-process torch-dense reference (``bench.TorchAlone``) against the run's figures."""
    if alone is None:
        return {}
    try:
        t = alone.measure()
    except Exception as e:  # the check must not sink the demo
        return {"note": f"torch-dense check unavailable: {str(e).strip() or type(e).__name__}"}
    ours = {r["label"]: r["latency_ms"]["torch-dense"] for r in rows if "torch-dense" in r["latency_ms"]}
    note = (f"torch-dense check: the dense model alone in a fresh process (torch only, {threads} threads) "
            f"ran {t.median_ms:.3f} ms median (min {t.min_ms:.3f}, {t.runs} runs)")
    if ours:
        note += f"; in this run torch-dense ran {min(ours.values()):.3f}-{max(ours.values()):.3f} ms"
        slow = [f"{k} ({v / t.median_ms:.0f}x)" for k, v in ours.items() if v > STALL_RATIO * t.median_ms]
        if slow:
            note += (f"; stalled for {', '.join(slow)}: 2-thread OpenMP barriers waited for a core "
                     "(machine load), compare --threads 1")
    return {"fresh_median_ms": t.median_ms, "fresh_min_ms": t.min_ms, "note": note}


def _best(row: dict) -> tuple[str, float]:
    lat = row["latency_ms"]
    dense = lat.get("torch-dense")
    cands = {b: v for b, v in lat.items() if b != "torch-dense"}
    if not dense or not cands:
        return "-", float("nan")
    b = min(cands, key=cands.get)
    return b, dense / cands[b]


def _print_table(console: Console, rows, dense_acc, epochs, backends, threads: int = 2, check: dict | None = None) -> None:
    t = Table(title=f"kcompile demo: {DEMO_MODEL} (dense accuracy {dense_acc:.2f} %, {epochs} fine-tuning "
                    f"epochs; latency = median ms at batch 1, {threads} threads)")
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
    if check and check.get("note"):
        console.print(f"  {check['note']}")
    stages: dict[str, float] = {}
    for r in rows:
        for k, v in r.get("stage_seconds", {}).items():
            stages[k] = stages.get(k, 0.0) + v
    if stages:
        console.print("  seconds per stage (all methods): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))


def _write_html(path: Path, rows, dense_acc, epochs, backends, threads: int = 2, check: dict | None = None) -> None:
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
    if check and check.get("note"):
        notes += f"<li>{html.escape(check['note'])}</li>"
    doc = page(f"kcompile demo: {DEMO_MODEL}",
               f"<p>Dense accuracy {dense_acc:.2f} %; {epochs} fine-tuning epochs per method (indices fixed). "
               "Energy ratio = Eyeriss-style estimate dense / clustered. Latency: median of the timed runs "
               f"(batch 1, {threads} threads), the dense model timed in the same run; the ONNX files and the "
               "TVM library timed are the ones written next to this report.</p>" + table(header, body) + figure(fig)
               + (f"<ul class='note'>{notes}</ul>" if notes else ""))
    with atomic_path(path, suffix=".html") as tmp:
        Path(tmp).write_text(doc, encoding="utf-8")
