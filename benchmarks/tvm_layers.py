"""Layer suite for the TVM llvm shared-centroid kernel vs torch's dense conv (oneDNN).

resnet18's 3x3 conv shapes (batch 1), clustered with KSE at q = 8 centroids per input
channel (``kcompile.cluster(..., "kse", q=8)``); each layer is compiled by
``kcompile.kernels.tvm_schedule.CompiledConv`` (target llvm, this CPU) and timed against
``torch.nn.functional.conv2d`` with the decoded dense weight, in the same process, in
alternating blocks of runs (``--rounds`` rounds, default 2; TVM_NUM_THREADS=2,
torch.set_num_threads(2)). ``runs`` per block: each record holds rounds*runs timings per side,
and the per-round ratios of medians (``speedup_per_round``).

Usage::

    TVM_NUM_THREADS=2 python benchmarks/tvm_layers.py [--runs 50] [--warmup 10] \
        [--rounds 2] [--json benchmarks/results/tvm_layers.json] [--only 256@14] [--q 8 | --q O/4]
        [--case c|d]

``--case`` takes the issue's other clusterings from ``layer_suite.py`` instead of KSE:
``c`` Son K=256 with one codebook over the seven layers, ``d`` filter unit, select=fixed,
ratio=0.25; the op-count bound is then ``cw.conv_macs``' dense / shared ratio, and the form is
the one ``tvm_compute.choose_form`` picks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kcompile.bench import cpu_name, timed_calls  # noqa: E402

# (name, C_in, C_out, H (input), stride)
SHAPES = [
    ("64@56", 64, 64, 56, 1),
    ("128@28", 128, 128, 28, 1),
    ("256@14", 256, 256, 14, 1),
    ("512@7", 512, 512, 7, 1),
    ("64->128@56/2", 64, 128, 56, 2),
    ("128->256@28/2", 128, 256, 28, 2),
    ("256->512@14/2", 256, 512, 14, 2),
]


def machine() -> dict:
    cpu = cpu_name()
    import tvm

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "tvm": tvm.__version__, "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
            "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}


def clustered_layer(C: int, O: int, stride: int, q: int = 8, seed: int = 0):
    """A KSE-clustered 3x3 conv (q centroids per input channel) of the given shape."""
    import kcompile

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, C, 1), nn.Conv2d(C, O, 3, stride=stride, padding=1, bias=False))
    cm = kcompile.cluster(m, "kse", q=q)
    return cm[1]


def timed_blocks(f, runs: int, warmup: int) -> list[float]:
    """``runs`` timings (ms) of f() after ``warmup`` calls, as one block. Blocks (not run-by-run
    interleaving): TVM's and OpenMP's thread pools both spin after a task, and on 2 cores
    interleaving makes each pool's spinning workers steal the other's cores. A pause
    before each block lets the previous pool go idle."""
    time.sleep(0.3)
    for _ in range(warmup):
        f()
    return timed_calls(f, runs)


def stats(ts: list[float]) -> dict:
    a = np.asarray(ts)
    return {"median_ms": float(np.median(a)), "min_ms": float(a.min()), "max_ms": float(a.max()), "runs": len(a)}


def bench_layer(name, C, O, H, stride, runs, warmup, threads=2, q: str = "8", cw=None, rounds: int = 2) -> dict:
    """One layer: KSE with ``q`` centroids per channel, or the given clustered weight ``cw``."""
    import tvm

    from kcompile.kernels.tvm_schedule import CompiledConv

    method = cw.method if cw is not None else "kse"
    if cw is None:
        cw = clustered_layer(C, O, stride, q=O // 4 if q == "O/4" else int(q)).clustered_weight().detached()
    x = np.random.default_rng(0).standard_normal((1, C, H, H)).astype(np.float32)
    t0 = time.perf_counter()
    conv = CompiledConv(cw, None, stride, 1, 1, 1, x.shape, target="llvm", threads=threads)
    build_s = time.perf_counter() - t0
    dev = tvm.cpu()
    out = tvm.runtime.empty(conv.spec.out_shape, "float32", dev)
    args = [tvm.runtime.tensor(x, dev), *conv._consts, out]
    fn = conv._fn
    xt = torch.from_numpy(x)
    wt = cw.decode().detach().contiguous()
    with torch.inference_mode():
        ref = F.conv2d(xt, wt, None, stride, 1).numpy()
        fn(*args)
        err = float(np.abs(out.numpy() - ref).max() / max(np.ptp(ref), 1e-12))
        tk, td, per_round = [], [], []
        for _ in range(rounds):  # alternating rounds: both see similar load
            bk = timed_blocks(lambda: fn(*args), runs, warmup)
            bd = timed_blocks(lambda: F.conv2d(xt, wt, None, stride, 1), runs, warmup)
            tk += bk
            td += bd
            per_round.append(float(np.median(bd) / np.median(bk)))
    Ho = ref.shape[2]
    hw = Ho * Ho
    q_req = q
    q = conv.arrays.meta.get("q", 0)
    if method == "kse":
        dense_macs = O * C * 9 * hw
        shared_ops = C * q * 9 * hw + O * C * hw
    else:
        ops = cw.conv_macs((Ho, Ho), 1)
        dense_macs, shared_ops = ops["dense"], ops["shared"]
    k, d = stats(tk), stats(td)
    return {
        "model": "resnet18", "layer": name, "backend": "tvm-llvm", "batch": 1, "threads": threads,
        **k, "dense_median_ms": d["median_ms"], "dense_min_ms": d["min_ms"], "dense_max_ms": d["max_ms"],
        "speedup_median": d["median_ms"] / k["median_ms"], "speedup_min": d["min_ms"] / k["min_ms"],
        "speedup_per_round": per_round, "rounds": rounds,
        "op_count_bound": dense_macs / shared_ops, "method": method, "q": q,
        "q_requested": q_req if method == "kse" else None,
        "form": conv.form,
        "tiles": repr(conv.tiles), "rel_err": err, "build_s": build_s,
        "shape": {"C": C, "O": O, "H": H, "stride": stride},
    }


def bench_models(runs: int, warmup: int, threads: int) -> list[dict]:
    """resnet18 at 224x224, every 3x3 conv clustered as KSE q=8: the llvm-compiled module
    (kcompile.compile) vs the dense model built by the same pipeline (every conv through the
    direct-conv schedule, the rest through TVM's operators) vs torch eager (dense), in
    alternating blocks (two rounds)."""
    import resource

    import kcompile
    from kcompile import zoo
    from kcompile.compiler import compile_model

    m = zoo.build("resnet18").eval()
    shape = (1, 3, 224, 224)
    skip = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d) and mod.kernel_size != (3, 3)]
    cm = kcompile.cluster(m, "kse", q=8, skip=skip).eval()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    t0 = time.perf_counter()
    run_c = compile_model(cm, "llvm", shape, threads=threads)
    build_c = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_d = compile_model(m, "llvm", shape, threads=threads)
    build_d = time.perf_counter() - t0
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        ref = cm(xt).numpy()
        err = float(np.abs(run_c(x) - ref).max() / max(np.ptp(ref), 1e-12))
        fns = {"tvm-llvm-clustered": lambda: run_c(x), "tvm-llvm-dense": lambda: run_d(x),
               "torch-dense": lambda: m(xt)}
        times = {k: [] for k in fns}
        for _ in range(2):  # two rounds of per-backend blocks
            for k, f in fns.items():
                times[k] += timed_blocks(f, runs, warmup)
    forms = {}
    for r in run_c.layers:
        forms[r["form"]] = forms.get(r["form"], 0) + 1
    out = []
    for k, ts in times.items():
        rec = {"model": "resnet18", "layer": None, "backend": k, "batch": 1, "threads": threads, **stats(ts),
               "input_shape": list(shape)}
        if k == "tvm-llvm-clustered":
            rec.update({"build_s": build_c, "rel_err": err, "forms": forms})
        if k == "tvm-llvm-dense":
            rec["build_s"] = build_d
        out.append(rec)
    base = next(r for r in out if r["backend"] == "torch-dense")["median_ms"]
    for r in out:
        r["speedup_vs_torch_dense_median"] = base / r["median_ms"]
    out.append({"peak_rss_mb_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of (TVM block, torch block)")
    ap.add_argument("--json", default="benchmarks/results/tvm_layers.json")
    ap.add_argument("--only", default=None, help="comma-separated layer names")
    ap.add_argument("--suite", default="layers", choices=["layers", "models"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (set TVM_NUM_THREADS to match)")
    ap.add_argument("--q", default="8", help="KSE centroids per input channel: a number or O/4 (layers suite)")
    ap.add_argument("--case", default=None, choices=["c", "d"],
                    help="layer_suite.py's case c (son K=256 network) or d (filter ratio 0.25) instead of KSE")
    a = ap.parse_args(argv)
    if os.environ.get("TVM_NUM_THREADS") != str(a.threads):
        raise SystemExit(f"set TVM_NUM_THREADS={a.threads} before starting (TVM reads it once)")
    torch.set_num_threads(a.threads)
    info = machine()
    only = set(a.only.split(",")) if a.only else None
    records = []
    if a.suite == "models":
        records = bench_models(a.runs, a.warmup, a.threads)
        for r in records:
            print(r, flush=True)
    weights = {}
    if a.case:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from layer_suite import clustered_weights

        weights = clustered_weights(a.case, iters=10)
    for name, C, O, H, s in (SHAPES if a.suite == "layers" else []):
        if only and name not in only:
            continue
        cw = weights[(C, O, H, s)][0] if a.case else None
        r = bench_layer(name, C, O, H, s, a.runs, a.warmup, a.threads, a.q, cw=cw, rounds=a.rounds)
        records.append(r)
        print(f"{name:>15}  tvm {r['median_ms']:7.3f} ms (min {r['min_ms']:.3f})  dense {r['dense_median_ms']:7.3f} ms "
              f"(min {r['dense_min_ms']:.3f})  x{r['speedup_median']:.2f} (min/min x{r['speedup_min']:.2f})  "
              f"bound x{r['op_count_bound']:.2f}  {r['form']}  err {r['rel_err']:.1e}", flush=True)
    info["loadavg_end"] = os.getloadavg()
    doc = {"command": f"TVM_NUM_THREADS={a.threads} python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
           "machine": info, "records": records}
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
