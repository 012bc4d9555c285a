"""Regenerate the README's "Performance" section from the recorded benchmark results.

Reads benchmarks/results/{layer_suite*.json, tvm_layers*.json, resnet18_model*.json,
onnx_sizes.json, kmeans_vs_sklearn.json} (whatever exists) and rewrites the text between
``<!-- performance:start -->`` and ``<!-- performance:end -->`` in README.md. Every number
comes from those files; nothing is typed in by hand.

    python benchmarks/performance_table.py
"""

from __future__ import annotations

import json
import os
import re
import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = os.path.join(ROOT, "benchmarks", "results")
START, END = "<!-- performance:start -->", "<!-- performance:end -->"


def _load(name):
    path = os.path.join(RES, name)
    return json.load(open(path)) if os.path.exists(path) else None


def _cpu(doc) -> str:
    """The CPU a result was measured on (the project's machine changed between sessions)."""
    return (doc.get("machine") or {}).get("cpu") or "cpu not recorded"


def _threads(doc) -> str:
    ts = {r.get("threads") for r in doc["records"]}
    return "/".join(str(t) for t in sorted(t for t in ts if t is not None))


def layer_table() -> list[str]:
    """Per resnet18 3x3 layer (kse q=8): numba and TVM llvm speed-ups over torch dense."""
    out = []
    for fname, label in (("layer_suite.json", "numba"), ("tvm_layers.json", "tvm-llvm")):
        doc = _load(fname)
        if not doc:
            continue
        out.append(f"- {label}: `{doc.get('command', '?')}` ({_threads(doc)} threads, {_cpu(doc)})")
    numba = _load("layer_suite.json")
    tvm = _load("tvm_layers.json")
    if not numba and not tvm:
        return []
    rows = {}
    if numba:
        for r in numba["records"]:
            if r.get("clustering") == "kse q=8" and r["backend"] == "numba:auto":
                rows.setdefault(r["layer"], {})["numba"] = (r["median_ms"], r["dense_median_ms"], r.get("op_count_bound"))
    if tvm:
        names = {"64@56": "64->64@56", "128@28": "128->128@28", "256@14": "256->256@14", "512@7": "512->512@7",
                 "64->128@56/2": "64->128@56/s2", "128->256@28/2": "128->256@28/s2", "256->512@14/2": "256->512@14/s2"}
        for r in tvm["records"]:
            if r.get("layer") in names:
                rows.setdefault(names[r["layer"]], {})["tvm"] = (r["median_ms"], r["dense_median_ms"], r.get("op_count_bound"))
    lines = ["| layer (kse q=8) | torch dense ms | numba ms | numba x | tvm-llvm ms | tvm-llvm x | op-count bound |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for layer, d in rows.items():
        n, t = d.get("numba"), d.get("tvm")
        dense = (t or n)[1]
        bound = (t or n)[2]
        cell = lambda v: (f"{v[0]:.3f}", f"{v[1] / v[0]:.2f}x") if v else ("-", "-")  # noqa: E731
        lines.append(f"| {layer} | {dense:.3f} | {' | '.join(cell(n))} | {' | '.join(cell(t))} | {bound:.2f} |")
    return out + [""] + lines


def model_table() -> list[str]:
    doc = _load("resnet18_model.json")
    if not doc:
        return []
    base = next((r for r in doc["records"] if r.get("backend") == "ort-dense" and "median_ms" in r), None)
    lines = [f"Whole resnet18, 224x224, batch 1, {_cpu(doc)}: `{doc['command']}` ({doc['clustering']}; load average per round "
             f"{', '.join(f'{v:.1f}' for v in doc['machine']['loadavg_1min_per_round'])})", "",
             "| path | median ms | vs onnxruntime dense | peak RSS MB | max rel err |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in doc["records"]:
        if "median_ms" not in r:
            lines.append(f"| {r['path']} | failed: {r.get('error')} | | | |")
            continue
        sp = statistics.median(r["speedup_vs_ort_dense_per_round"]) if base else float("nan")
        lines.append(f"| {r['backend']} | {r['median_ms']:.2f} | {sp:.2f}x | {r['peak_rss_mb']:.0f} | {r['rel_err']:.1e} |")
    pair = _load("resnet18_model_pair.json")
    if pair:
        recs = {r["backend"]: r for r in pair["records"] if "median_ms" in r}
        if "tvm-llvm" in recs and "ort-dense" in recs:
            rs = recs["tvm-llvm"]["speedup_vs_ort_dense_per_round"]
            lines += ["", f"The headline pair back to back, 2 threads ({_cpu(pair)}; `{pair['command']}`): tvm-llvm "
                      f"{recs['tvm-llvm']['median_ms']:.2f} ms, onnxruntime dense {recs['ort-dense']['median_ms']:.2f} ms, "
                      f"{statistics.median(rs):.2f}x (median of {len(rs)} per-round ratios, {min(rs):.2f}-{max(rs):.2f}; "
                      f"{sum(v >= 2 for v in rs)} of {len(rs)} rounds at 2x or more)."]
    one = _load("resnet18_model_1thread.json")
    if one:
        recs = {r["backend"]: r for r in one["records"] if "median_ms" in r}
        if "tvm-llvm" in recs and "ort-dense" in recs:
            lines += ["", f"The same at 1 thread ({_cpu(one)}; `{one['command']}`): tvm-llvm {recs['tvm-llvm']['median_ms']:.2f} ms, "
                      f"onnxruntime dense {recs['ort-dense']['median_ms']:.2f} ms, "
                      f"{statistics.median(recs['tvm-llvm']['speedup_vs_ort_dense_per_round']):.2f}x (median of "
                      f"{len(recs['tvm-llvm']['speedup_vs_ort_dense_per_round'])} per-round ratios)."]
    return lines


def kmeans_line() -> list[str]:
    doc = _load("kmeans_vs_sklearn.json")
    if not doc:
        return []
    ours, sk = doc["kcompile"], doc["sklearn"]
    return ["k-means engine vs scikit-learn (ResNet-18's 1,220,608 3x3 kernels, K=256, 50 iterations, "
            f"2 threads, {_cpu(doc)}): kcompile {ours['best_s']:.2f} s vs scikit-learn {sk['best_s']:.2f} s, best of "
            f"{len(ours['wall_s'])} ({doc['speedup_best']:.2f}x; medians {doc['speedup_median']:.2f}x); final inertia "
            f"{100 * doc['inertia_rel_diff']:+.2f} % vs scikit-learn's. kcompile seeds k-means++ on a "
            "sample of max(65,536, 256 K) points (`init_size=\"auto\"`)"
            + (f"; seeded on all points it takes {doc['kcompile_init_all']['wall_s']:.2f} s "
               f"({doc['speedup_init_all']:.2f}x)" if "kcompile_init_all" in doc else "")
            + f" (`{doc.get('command', '?')}`)"]


def render() -> str:
    parts = ["Measured on this project's 2-core machine (an Intel Xeon with AVX-512 until 2026-11-22, an AMD EPYC "
             "with AVX2 since; each result names its CPU); medians after warm-up, the baseline timed in the same "
             "run. Regenerate with `python benchmarks/performance_table.py` after rerunning the benchmarks.", ""]
    for block in (layer_table(), model_table(), kmeans_line()):
        if block:
            parts += block + [""]
    return "\n".join(parts)


def main() -> None:
    path = os.path.join(ROOT, "README.md")
    text = open(path).read()
    section = f"{START}\n{render()}\n{END}"
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda m: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Performance\n\n" + section + "\n"
    open(path, "w").write(text)
    print(render())


if __name__ == "__main__":
    main()
