"""Whole-model benchmark (issue 3, item 2-3): resnet18 at 224x224, batch 1.

Every 3x3 conv (stem excluded: it has 3 input channels and is 7x7; 1x1 downsample convs kept
dense) is clustered with KSE, q = 8 centroids per input channel. Paths:

  ort-dense          onnxruntime on the dense ONNX of the same (decoded) model   <- the baseline
  torch-dense        PyTorch (oneDNN) on the decoded dense model
  tvm-llvm-dense     kcompile.compile(dense model, "llvm")
  tvm-llvm           kcompile.compile(clustered model, "llvm")  (shared-centroid TVM kernels)
  tvm-llvm-tuned     the same with tune=True (tiles measured here; tuning time in build_s)
  numba              kcompile.compile(clustered model, "numba")
  ort-custom         kcompile ONNX + onnxruntime with kcompile's custom ops
  ort-stock          kcompile ONNX in stock onnxruntime (the ops' decode-then-Conv bodies)

Each path runs in its own subprocess (so that its peak RSS, ru_maxrss, is its own): build,
warm up, then ``--runs`` timed calls. TVM paths are compiled and exported in the first round
and loaded from that library in the others (the peak RSS of a TVM path is therefore the
larger of compile + run and of load + run; ``build_s`` is the compile time). Every path is checked against PyTorch. Because the
machine is shared, the subprocesses run one after another in ``--rounds`` rounds (odd rounds in
reverse order); a path's time is the median over all its runs and the ratio to ort-dense is
taken per round. ``--paths ort-dense,tvm-llvm`` measures the headline pair back to back.

    python benchmarks/resnet18_model.py --threads 2 --runs 30 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

PATHS = ("ort-dense", "torch-dense", "tvm-llvm-dense", "tvm-llvm", "tvm-llvm-tuned", "numba", "ort-custom", "ort-stock")
SHAPE = (1, 3, 224, 224)


def build_models(cache: str):
    """(dense decoded model, clustered model), clustered once and cached in ``cache``."""
    import torch.nn as nn

    import kcompile
    from kcompile.bench import densify

    path = os.path.join(cache, "resnet18_kse_q8.pth")
    if os.path.exists(path):
        cm = kcompile.load(path)
    else:
        model = kcompile.load("zoo:resnet18")
        skip = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (3, 3)]
        cm = kcompile.cluster(model, "kse", q=8, iters=10, skip=skip)
        kcompile.save(cm, path)
    return densify(cm).eval(), cm.eval()


def run_path(name: str, threads: int, runs: int, warmup: int, cache: str) -> dict:
    """Build one path, check it, time it; returns the record (runs in a fresh process)."""
    import numpy as np
    import torch

    from kcompile.bench import timed_calls

    torch.set_num_threads(threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)
    dense, cm = build_models(cache)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    with torch.no_grad():
        ref = cm(torch.from_numpy(x)).numpy()
    t0 = time.perf_counter()
    built = True
    if name == "torch-dense":
        def fn(a):
            with torch.no_grad():
                return dense(torch.from_numpy(a)).numpy()
    elif name in ("tvm-llvm", "tvm-llvm-tuned", "tvm-llvm-dense"):
        # built (and exported) in the first round of a run, loaded from the library afterwards
        import tvm
        from tvm import relax

        from kcompile.compiler import compile_model

        lib = os.path.join(cache, f"{name}.so")
        built = not os.path.exists(lib)
        if built:
            compiled = compile_model(dense if name == "tvm-llvm-dense" else cm, target="llvm", input_shape=SHAPE,
                                     threads=threads, tune=name == "tvm-llvm-tuned")
            compiled.executable.export_library(lib)
            del compiled
        dev = tvm.cpu()
        vm = relax.VirtualMachine(tvm.runtime.load_module(lib), dev)
        main_fn = vm["main"]

        def fn(a):
            return main_fn(tvm.runtime.tensor(a, dev)).numpy()
    elif name == "numba":
        from kcompile.compiler import compile_model

        fn = compile_model(cm, target="numba", input_shape=SHAPE, threads=threads)
    else:
        from kcompile.export import export
        from kcompile.ort import onnxruntime_session

        path = os.path.join(cache, f"{name}.onnx")
        export(dense if name == "ort-dense" else cm, path, target="onnx", input_shape=SHAPE)
        sess = onnxruntime_session(path, threads=threads, custom_ops=name == "ort-custom")
        inp = sess.get_inputs()[0].name

        def fn(a):
            return sess.run(None, {inp: a})[0]
    build_s = time.perf_counter() - t0
    y = np.asarray(fn(x))
    err = float(np.abs(y - ref).max() / (ref.max() - ref.min()))
    for _ in range(warmup):
        fn(x)
    times = timed_calls(lambda: fn(x), runs)
    return {"path": name, "times_ms": times, "build_s": build_s, "built": built, "rel_err": err,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    from kcompile import bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "kcompile-resnet18-bench"))
    ap.add_argument("--json", default="benchmarks/results/resnet18_model.json")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.makedirs(a.cache, exist_ok=True)
    if a._one:
        print(json.dumps(run_path(a._one, a.threads, a.runs, a.warmup, a.cache)))
        return
    paths = a.paths.split(",")
    build_models(a.cache)  # cluster once, outside the timed processes
    for p in paths:  # TVM libraries: built by this run's first round, loaded by the others
        if p.startswith("tvm-") and os.path.exists(os.path.join(a.cache, f"{p}.so")):
            os.remove(os.path.join(a.cache, f"{p}.so"))
    per_round = []
    load = [os.getloadavg()[0]]
    for r in range(a.rounds):
        recs = {}
        # odd rounds run the paths in reverse order, so that a drift of the machine's speed
        # during a round does not favour the paths that run first
        for p in (paths if r % 2 == 0 else paths[::-1]):
            out = subprocess.run([sys.executable, __file__, "--_one", p, "--threads", str(a.threads), "--runs",
                                  str(a.runs), "--warmup", str(a.warmup), "--cache", a.cache],
                                 capture_output=True, text=True, env={**os.environ, "KCOMPILE_QUIET": "1"})
            if out.returncode != 0:
                recs[p] = {"path": p, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
            else:
                recs[p] = json.loads(out.stdout.strip().splitlines()[-1])
            print(r, p, recs[p].get("error") or f"{statistics.median(recs[p]['times_ms']):.2f} ms", flush=True)
        per_round.append(recs)
        load.append(os.getloadavg()[0])
    rows = []
    for p in paths:
        ok = [rr[p] for rr in per_round if "times_ms" in rr[p]]
        if not ok:
            rows.append({"path": p, "error": per_round[0][p].get("error")})
            continue
        allt = [t for rec in ok for t in rec["times_ms"]]
        ratios = [statistics.median(rr["ort-dense"]["times_ms"]) / statistics.median(rr[p]["times_ms"])
                  for rr in per_round if "times_ms" in rr[p] and "times_ms" in rr.get("ort-dense", {})]
        rows.append({"model": "resnet18", "layer": None, "backend": p, "batch": 1, "threads": a.threads,
                     "median_ms": statistics.median(allt), "min_ms": min(allt), "max_ms": max(allt),
                     "runs": len(allt), "speedup_vs_ort_dense_per_round": ratios,
                     "peak_rss_mb": max(rec["peak_rss_mb"] for rec in ok),
                     "peak_rss_mb_loaded": max((rec["peak_rss_mb"] for rec in ok if not rec.get("built", True)),
                                               default=None),
                     "build_s": max(rec["build_s"] for rec in ok if rec.get("built", True)),
                     "rel_err": max(rec["rel_err"] for rec in ok)})
    doc = {"command": "python " + " ".join(sys.argv), "machine": {
        "platform": platform.platform(), "cpu": bench.cpu_name(platform.processor()), "cores": os.cpu_count(), "loadavg_1min_per_round": load},
        "clustering": "kse q=8 on every 3x3 conv of zoo:resnet18 (1x1 downsample and 7x7 stem dense)",
        "records": rows}
    with open(a.json, "w") as f:
        json.dump(doc, f, indent=1)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
