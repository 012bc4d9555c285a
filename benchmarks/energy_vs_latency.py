"""Energy estimates held against measured latency on resnet18's conv layers, per backend.

Every conv of ``zoo:resnet18`` (input 1x3x224x224, random weights) is timed as a one-layer
model on its real input shape, dense and clustered (KSE with q = 8 centroids per input
channel, the kernels issue's suite (a); KSE leaves the stem dense), on each backend of
``kcompile bench`` (pinned threads, median/min/max of --runs after warm-up, the torch dense
conv timed in the same run). For each backend, over all its layer points (dense and
clustered together), the Spearman rank correlation and the R^2 of a least-squares line
between each estimate and the median latency:

- ``eyeriss``: kcompile.energy's Eyeriss-style normalised energy;
- ``dkm_mac_units``: the Deep k-Means metric;
- ``macs``: sharing-aware MAC count;
- ``roofline``: the latency-aware term (kcompile.energy.latency): t = a*ops + b*words + c with
  the ops of the form the backend really executes, fitted on the backend's *dense* layers
  only and used to predict the clustered ones (so the clustered points are out of sample).

    python benchmarks/energy_vs_latency.py [--runs 30] [--threads 2] [--backends all]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kcompile.bench import BenchResult, model_layer_cases, parse_backends, run_bench
from kcompile.cli_bench import bench_html
from kcompile.cluster import cluster
from kcompile.energy.latency import Roofline, features
from kcompile.energy.layers import describe_model
from kcompile.energy.stats import r2, spearman

SHAPE = (1, 3, 224, 224)
#: the form a backend executes for a clustered layer when it does not say (see latency.features)
DECODES = {"torch-dense": "dense", "torch-decoded": "decode-dense", "onnxruntime-stock": "decode-dense"}


def executed_form(rec: dict, numba_forms: dict) -> str | None:
    if rec["method"] == "dense":
        return "dense"
    if rec["backend"] in DECODES:
        return DECODES[rec["backend"]]
    if isinstance(rec.get("executed"), str):
        return rec["executed"]
    return numba_forms.get(rec["layer"])  # ORT custom ops and TVM call kcompile's kernels' choice


def stats(recs, key) -> dict:
    pts = [r for r in recs if r.get(key) is not None]
    if len(pts) < 3:
        return {}
    x = [r[key] for r in pts]
    y = [r["median_ms"] for r in pts]
    ymin = [r["min_ms"] for r in pts]
    out = {"points": len(pts), "spearman": spearman(x, y), "r2": r2(x, y),
           "spearman_min_ms": spearman(x, ymin), "r2_min_ms": r2(x, ymin)}
    clus = [r for r in pts if r["method"] != "dense"]
    if len(clus) >= 3:
        out["spearman_clustered_only"] = spearman([r[key] for r in clus], [r["median_ms"] for r in clus])
    return out


def measure(args) -> BenchResult:
    """Cluster resnet18, time every conv case on every backend, attach (ops, words) features."""
    torch.manual_seed(0)
    t0 = time.time()
    from kcompile.loading import load_model

    dense = load_model("zoo:resnet18").eval()
    if args.cache and Path(args.cache).exists():
        cm = load_model(args.cache).eval()
    else:
        cm = cluster(dense, "kse", q=8, iters=args.iters).eval()
        if args.cache:
            from kcompile.checkpoint import save

            save(cm, args.cache)
    cases = model_layer_cases(dense, "zoo:resnet18", SHAPE, clustered=cm)
    print(f"{len(cases)} layer cases ({time.time() - t0:.0f} s to cluster)", flush=True)
    res = run_bench(cases, parse_backends(args.backends), threads=args.threads, runs=args.runs,
                    warmup=args.warmup, on_note=lambda n: print("note:", n, flush=True))
    specs = {c.layer: describe_model(c.module, c.input_shape)[0][0] for c in cases}
    numba_forms = {r["layer"]: r["executed"] for r in res.records
                   if r["backend"] == "numba" and isinstance(r.get("executed"), str)}
    for r in res.records:
        r["executed_form"] = executed_form(r, numba_forms)
        r["ops"], r["words"] = features(specs[r["layer"]], r["executed_form"])
    return res


def analyse(records) -> dict:
    """Per backend: the roofline fitted on its dense layers, and each estimate's agreement with latency."""
    by_backend: dict[str, list] = {}
    for r in records:
        by_backend.setdefault(r["backend"], []).append(r)
    summary = {}
    for b, recs in by_backend.items():
        d = [r for r in recs if r["method"] == "dense"]
        model = Roofline.fit([(r["ops"], r["words"]) for r in d], [r["median_ms"] * 1e-3 for r in d])
        model_min = Roofline.fit([(r["ops"], r["words"]) for r in d], [r["min_ms"] * 1e-3 for r in d])
        for r in recs:
            r["roofline"] = float(model.predict([(r["ops"], r["words"])])[0]) * 1e3
            r["roofline_min"] = float(model_min.predict([(r["ops"], r["words"])])[0]) * 1e3
        summary[b] = {
            "median_ms_total_dense": sum(r["median_ms"] for r in d),
            "median_ms_total_clustered": sum(r["median_ms"] for r in recs if r["method"] != "dense"),
            "roofline_fit": {"ns_per_op": model.sec_per_op * 1e9, "ns_per_word": model.sec_per_word * 1e9,
                             "overhead_ms": model.overhead_s * 1e3},
            "roofline_fit_min_ms": {"ns_per_op": model_min.sec_per_op * 1e9, "ns_per_word": model_min.sec_per_word * 1e9,
                                    "overhead_ms": model_min.overhead_s * 1e3},
            **{k: stats(recs, k) for k in ("eyeriss", "dkm_mac_units", "macs", "roofline", "roofline_min")},
        }
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="all")
    ap.add_argument("--iters", type=int, default=20, help="k-means iterations of the KSE clustering")
    ap.add_argument("--out", default="benchmarks/results/energy_vs_latency")
    ap.add_argument("--cache", default=None, help="checkpoint of the clustered resnet18 (written if missing)")
    ap.add_argument("--from-json", default=None, help="re-analyse the records of an earlier run (no timing)")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.from_json:
        old = json.loads(Path(args.from_json).read_text())
        res = BenchResult(old["records"], old["notes"], old["machine"])
        command, args.runs, args.warmup, args.iters = old["command"], old["runs"], old["warmup"], old["clustering"]["iters"]
    else:
        res = measure(args)
        command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    summary = analyse(res.records)
    clustered_layers = [r for r in res.records if r["method"] != "dense"]
    fastest = min(summary, key=lambda b: summary[b]["median_ms_total_clustered"] or float("inf")) if clustered_layers else None
    out = {
        "command": command,
        "machine": res.machine, "model": "zoo:resnet18 (random weights)", "input_shape": list(SHAPE),
        "clustering": {"method": "kse", "q": 8, "iters": args.iters},
        "runs": args.runs, "warmup": args.warmup, "notes": res.notes,
        "fastest_backend_on_clustered_layers": fastest,
        "summary": summary, "records": res.records,
        "seconds": old.get("seconds") if args.from_json else time.time() - t0,
    }
    p = Path(args.out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.with_suffix(".json").write_text(json.dumps(out, indent=2, default=str))
    html = bench_html(res, title="kcompile: energy estimates vs measured latency (resnet18 conv layers)",
                      estimates=(("eyeriss", "Eyeriss-style estimate (MAC units)"),
                                 ("dkm_mac_units", "Deep k-Means metric (MAC units)"),
                                 ("roofline", "latency-aware roofline (ms, fitted on dense layers)")),
                      intro=f"<p>Command: <code>{out['command']}</code></p>")
    p.with_suffix(".html").write_text(html)
    for b, s in summary.items():
        print(f"{b:20s} median: " + "  ".join(f"{k} rho {s[k].get('spearman', float('nan')):.3f} R2 {s[k].get('r2', float('nan')):.3f}"
                                              for k in ("eyeriss", "dkm_mac_units", "macs", "roofline")))
        print(f"{'':20s} min:    " + "  ".join(f"{k} rho {s[k].get('spearman_min_ms', float('nan')):.3f} R2 {s[k].get('r2_min_ms', float('nan')):.3f}"
                                              for k in ("eyeriss", "dkm_mac_units", "macs", "roofline_min")))
    print("fastest backend on the clustered layers:", fastest)
    return out


if __name__ == "__main__":
    main()
