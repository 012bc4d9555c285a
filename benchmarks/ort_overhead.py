"""Per-call cost of kcompile's custom-op path in onnxruntime vs stock onnxruntime (function bodies).

    python benchmarks/ort_overhead.py [--runs 50] [--out benchmarks/results/ort_overhead.json]

Cases (all threads pinned to 2, batch 1 unless said):
- ``one_tiny_conv``: a single ClusteredConv (4->4 channels, 3x3, 4x4 input): compute is
  negligible, so the time is the per-node bridge cost (onnxruntime-extensions copies every input
  into NumPy, calls Python, returns the output through a Python list) — reported as
  custom minus stock.
- ``tiny_son``: tests/tiny_models.py TinyNet (8x8 input) clustered with Son K=8.
- ``digits_resnet_son``: zoo:digits-resnet (1x8x8) clustered with Son K=64.
- ``resnet56_son``: zoo:resnet56 (3x32x32) clustered with Son K=64 (batch 1).
Each: stock onnxruntime session (function bodies constant-folded at load), kcompile custom-op
session with kcompile.kernels (``custom_ort``) and with the NumPy reference (``custom_ort_numpy``),
and the PyTorch clustered model, timed in the same run: >= 30 runs after 5 warm-up runs;
median/min/max in ms; ratios custom/stock. onnxruntime's threads are 2; one pass per torch
thread setting (``--torch-threads``, default 2 then 1): on a loaded 2-core machine torch's
2-thread parallel regions wait for a core, which also slows the kernels' dense sub-convs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def timeit(fn, runs: int, warmup: int = 5) -> dict:
    from kcompile.bench import timed_calls

    for _ in range(warmup):
        fn()
    ts = timed_calls(fn, runs)
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "runs": runs}


def models():
    from kcompile.cluster import cluster
    from kcompile.ir import ClusteredWeight
    from kcompile.layers import ClusteredConv2d
    from kcompile.zoo import build
    from tiny_models import tiny

    g = torch.Generator().manual_seed(0)
    cw = ClusteredWeight("kernel", (4, 4, 3, 3), torch.randn(4, 9, generator=g),
                         torch.randint(0, 4, (4, 4), generator=g).to(torch.uint8))
    yield "one_tiny_conv", nn.Sequential(ClusteredConv2d(cw, padding=(1, 1))).eval(), (1, 4, 4, 4)
    yield "tiny_son", cluster(tiny().eval(), "son", k=8, iters=5).eval(), (1, 3, 8, 8)
    yield "digits_resnet_son", cluster(build("digits-resnet").eval(), "son", k=64, iters=5).eval(), (1, 1, 8, 8)
    yield "resnet56_son", cluster(build("resnet56").eval(), "son", k=64, iters=3).eval(), (1, 3, 32, 32)


def one(name, cm, shape, torch_threads, runs, build_onnx, onnxruntime_session) -> dict:
    om = build_onnx(cm, shape)
    n_custom = sum(n.domain == "com.kcompile" for n in om.graph.node)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    stock = onnxruntime_session(om, threads=2, custom_ops=False)
    custom = onnxruntime_session(om, threads=2)
    custom_np = onnxruntime_session(om, threads=2, backend="numpy")
    feed = {"input": x}
    xt = torch.from_numpy(x)

    def run_torch():
        with torch.inference_mode():
            cm(xt)

    res = {
        "stock_ort": timeit(lambda: stock.run(None, feed), runs),
        "custom_ort": timeit(lambda: custom.run(None, feed), runs),
        "custom_ort_numpy": timeit(lambda: custom_np.run(None, feed), runs),
        "torch_clustered": timeit(run_torch, runs),
    }
    y_s, y_c = stock.run(None, feed)[0], custom.run(None, feed)[0]
    rec = {"model": name, "input_shape": list(shape), "custom_nodes": n_custom, "ort_threads": 2,
           "torch_threads": torch_threads, **res,
           "kernels": sorted(set(custom.kcompile_backends().values())),
           "max_abs_diff_custom_vs_stock": float(np.abs(y_s - y_c).max()),
           "ratio_custom_over_stock": res["custom_ort"]["median_ms"] / res["stock_ort"]["median_ms"],
           "overhead_per_custom_node_ms": (res["custom_ort"]["median_ms"] - res["stock_ort"]["median_ms"]) / max(n_custom, 1)}
    print(f"torch_threads={torch_threads} {name:20s} nodes={n_custom:3d} stock {res['stock_ort']['median_ms']:.3f} ms  custom "
          f"{res['custom_ort']['median_ms']:.3f} ms  torch {res['torch_clustered']['median_ms']:.3f} ms  "
          f"custom/stock {rec['ratio_custom_over_stock']:.1f}x  per node +{rec['overhead_per_custom_node_ms']:.3f} ms", flush=True)
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ort_overhead.json"))
    ap.add_argument("--torch-threads", default="2,1",
                    help="torch intra-op threads (used by PyTorch and by the kernels' dense sub-convs), one pass each")
    args = ap.parse_args(argv)
    from kcompile.onnx_export import build_onnx
    from kcompile.ort import onnxruntime_session

    records = []
    cases = list(models())
    for tt in [int(v) for v in args.torch_threads.split(",")]:
        torch.set_num_threads(tt)
        for name, cm, shape in cases:
            records.append(one(name, cm, shape, tt, args.runs, build_onnx, onnxruntime_session))
    import onnxruntime
    import onnxruntime_extensions

    out = {"command": "python benchmarks/ort_overhead.py " + " ".join(argv or sys.argv[1:]),
           "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                       "python": platform.python_version(), "torch": torch.__version__,
                       "onnxruntime": onnxruntime.__version__, "onnxruntime_extensions": onnxruntime_extensions.__version__,
                       "note": "2 cores shared with other jobs: timings are noisy"},
           "records": records}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
