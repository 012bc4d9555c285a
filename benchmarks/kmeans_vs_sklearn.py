"""kcompile.kmeans vs scikit-learn's KMeans on the 3x3 kernels of a ResNet-18.

Data: every 3x3 kernel of ResNet-18 (1,220,608 kernels of 9 values) from
``kcompile.zoo.build("resnet18")`` when the zoo is importable, otherwise from a local list of
ResNet-18's 3x3 conv shapes with torch.manual_seed(0) and torchvision's init
(kaiming_normal_, mode="fan_out", nonlinearity="relu").
Both run K = 256, k-means++ (greedy, n_init=1), at most 50 Lloyd iterations, tol 1e-4, seed 0,
2 threads (threadpoolctl for scikit-learn, torch.set_num_threads for kcompile). kcompile seeds
on its default sample (init_size="auto": 65,536 of the points); one more run with
init_size="all" (k-means++ on every point, as scikit-learn does) is reported beside it.

    python benchmarks/kmeans_vs_sklearn.py [--repeats 2] [--json benchmarks/results/kmeans_vs_sklearn.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
EXPECTED_KERNELS = 1_220_608


def resnet18_kernels() -> tuple[torch.Tensor, str]:
    """All 3x3 kernels of a ResNet-18 as an (N, 9) float32 tensor, and where they came from."""
    try:
        from kcompile.zoo import build  # type: ignore[attr-defined]

        model = build("resnet18")
        ws = [
            m.weight.detach().reshape(-1, 9)
            for m in model.modules()
            if isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (3, 3)
        ]
        return torch.cat(ws).float().contiguous(), 'kcompile.zoo.build("resnet18")'
    except (ImportError, AttributeError):
        pass
    # (out, in) of every 3x3 conv of ResNet-18 (basic blocks; the 7x7 stem and 1x1
    # downsamples have no 3x3 kernels)
    shapes = []
    for cin, cout, stride in [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]:
        for block in range(2):
            shapes.append((cout, cin if block == 0 else cout))
            shapes.append((cout, cout))
    torch.manual_seed(0)
    ws = []
    for o, c in shapes:
        w = torch.empty(o, c, 3, 3)
        torch.nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
        ws.append(w.reshape(-1, 9))
    return torch.cat(ws).contiguous(), "local ResNet-18 3x3 conv shapes, torch.manual_seed(0), kaiming_normal_(fan_out, relu)"


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }
    try:
        import sklearn

        info["sklearn"] = sklearn.__version__
    except ImportError:
        pass
    from kcompile.bench import cpu_name

    cpu = cpu_name()
    if cpu:
        info["cpu"] = cpu
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def run_sklearn(X: np.ndarray, k: int, iters: int, seed: int, threads: int):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        t0 = time.perf_counter()
        km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=iters, random_state=seed, algorithm="lloyd").fit(X)
        dt = time.perf_counter() - t0
    return dt, float(km.inertia_), int(km.n_iter_)


def run_ours(X: torch.Tensor, k: int, iters: int, seed: int, threads: int, init_size="auto"):
    from kcompile.kmeans import kmeans

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        r = kmeans(X, k, iters=iters, seed=seed, init_size=init_size)
        dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)
    return dt, float(r.inertia[0]), int(r.iterations)


NOTES = """
Notes (kcompile side, 2 threads, AMD EPYC, profiled on 2026-12-07 at a quiet moment): k-means++
takes about 0.53 s on its default sample of 65,536 points and the 50 Lloyd iterations 6-7 s, of
which the bounded checks (32.2 M point checks in all) take about 4.4 s, the full searches of the
points that moved (1.26 M) about 0.9 s, and the bounds, cluster sums and masks the rest. Fixed
costs were cut on 2026-12-07: cluster sums by a float64 bincount per column instead of
index_add_ (~4x faster), the augmented data written in place (a fresh 50 MB temporary costs
~25 ms of page faults on this VM; setting up the problem went from 323 to 95 ms), and k-means++
reading whole point blocks by indexing instead of an expanded gather (0.78 -> 0.53 s).
Seeding on a uniform sample is the idea of scikit-learn MiniBatchKMeans' `init_size`; the table
gives the final inertia with it and without it (`init_size="all"`). Each check of a point costs
one float32 matmul row (256 distances, inner dimension 11) and one vectorised minimum: about
107 ns and 36 ns on the EPYC (torch profiler, 3.7 s and 1.26 s over 34.7 M rows); the 4 MB
distance block of 4,096 points does not fit the 512 KB L2, and smaller blocks cost more in
per-call overhead than they save (measured with 1 MB blocks). Hamerly's bounds skip ~47 % of the
point checks (on these unstructured Gaussian kernels a point's nearest and second-nearest
centroids stay close, so the bounds cannot prune more; Yinyang group bounds and sorting points
into prunable blocks were tried and cost more than they saved in torch).

This machine is shared: wall times move by 10-30 % between runs and by up to 10x when other
jobs run (2-thread torch ops wait on each other when a core is taken). On it, scikit-learn takes
33-52 s, not the ~21 s quoted in the issue; against 21 s this run's speed-up would be
{vs21:.1f}x.
"""


def summary_md(res: dict) -> str:
    ours, sk = res["kcompile"], res["sklearn"]
    m = res["machine"]
    return (
        "# kcompile.kmeans vs scikit-learn KMeans (ResNet-18 3x3 kernels)\n\n"
        f"`{res['command']}`\n\n"
        f"Data: {res['data']['n_points']:,} kernels x {res['data']['dims']} ({res['data']['source']}); "
        f"K = {res['params']['k']}, at most {res['params']['max_iter']} Lloyd iterations, tol 1e-4, seed {res['params']['seed']}, "
        f"{res['params']['threads']} threads. Machine: {m.get('cpu')}, {m.get('cpu_count')} vCPUs, torch {m['torch']}, "
        f"scikit-learn {m.get('sklearn')}; load average at start {m.get('loadavg_start', ['?'])[0]:.2f}.\n\n"
        "| | wall time (best / all runs) | inertia | iterations |\n| --- | --- | --- | --- |\n"
        f"| scikit-learn | {sk['best_s']} s / {sk['wall_s']} | {sk['inertia']:.6g} | {sk['iterations']} |\n"
        f"| kcompile.kmeans | {ours['best_s']} s / {ours['wall_s']} | {ours['inertia']:.6g} | {ours['iterations']} |\n"
        f"| kcompile.kmeans, init_size=\"all\" (1 run) | {res['kcompile_init_all']['wall_s']} s | "
        f"{res['kcompile_init_all']['inertia']:.6g} | {res['kcompile_init_all']['iterations']} |\n\n"
        f"Speed-up {res['speedup_best']}x (best) / {res['speedup_median']}x (median); with k-means++ on all "
        f"points {res['speedup_init_all']}x. Inertia difference "
        f"{res['inertia_rel_diff']:+.4%} (negative: ours is lower). Targets: inertia within 1 % "
        f"({'met' if res['met']['inertia'] else 'missed'}), at least 5x faster ({'met' if res['met']['speedup'] else 'missed'}).\n"
        + NOTES.format(vs21=21.0 / ours["best_s"])
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each (the best is compared)")
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--json", default=str(HERE / "results" / "kmeans_vs_sklearn.json"))
    args = ap.parse_args(argv)

    X, source = resnet18_kernels()
    print(f"data: {X.shape[0]} kernels x {X.shape[1]} ({source})", flush=True)
    Xn = X.numpy()
    res: dict = {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]),
        "machine": machine_info(),
        "data": {"source": source, "n_points": int(X.shape[0]), "dims": int(X.shape[1]), "expected_points": EXPECTED_KERNELS},
        "params": {"k": args.k, "max_iter": args.iters, "tol": 1e-4, "seed": args.seed, "threads": args.threads, "n_init": 1, "init": "k-means++ (greedy)"},
    }
    ours = [run_ours(X, args.k, args.iters, args.seed, args.threads) for _ in range(args.repeats)]
    print("kcompile:", ours, flush=True)
    res["kcompile"] = {
        "wall_s": [round(t, 3) for t, _, _ in ours],
        "best_s": round(min(t for t, _, _ in ours), 3),
        "median_s": round(statistics.median(t for t, _, _ in ours), 3),
        "inertia": ours[0][1],
        "iterations": ours[0][2],
        "identical_across_runs": len({o[1] for o in ours}) == 1,
        "peak_rss_mb_after_runs": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "init_size": "auto",
    }
    t_all, in_all, it_all = run_ours(X, args.k, args.iters, args.seed, args.threads, init_size="all")
    print("kcompile, k-means++ on all points:", (t_all, in_all, it_all), flush=True)
    res["kcompile_init_all"] = {"wall_s": round(t_all, 3), "inertia": in_all, "iterations": it_all, "init_size": "all"}
    if not args.skip_sklearn:
        sk = [run_sklearn(Xn, args.k, args.iters, args.seed, args.threads) for _ in range(args.repeats)]
        print("sklearn:", sk, flush=True)
        res["sklearn"] = {
            "call": f'KMeans(n_clusters={args.k}, init="k-means++", n_init=1, max_iter={args.iters}, random_state={args.seed}, algorithm="lloyd")',
            "wall_s": [round(t, 3) for t, _, _ in sk],
            "best_s": round(min(t for t, _, _ in sk), 3),
            "median_s": round(statistics.median(t for t, _, _ in sk), 3),
            "inertia": sk[0][1],
            "iterations": sk[0][2],
        }
        rel = (res["kcompile"]["inertia"] - res["sklearn"]["inertia"]) / res["sklearn"]["inertia"]
        speed = res["sklearn"]["best_s"] / res["kcompile"]["best_s"]
        res["inertia_rel_diff"] = rel
        res["speedup_best"] = round(speed, 2)
        res["speedup_median"] = round(res["sklearn"]["median_s"] / res["kcompile"]["median_s"], 2)
        res["speedup_init_all"] = round(res["sklearn"]["best_s"] / res["kcompile_init_all"]["wall_s"], 2)
        res["targets"] = {"inertia_within": 0.01, "speedup_at_least": 5.0}
        res["met"] = {"inertia": abs(rel) <= 0.01 or rel < 0, "speedup": speed >= 5.0}
        print(f"inertia: ours {res['kcompile']['inertia']:.6g} sklearn {res['sklearn']['inertia']:.6g} rel {rel:+.4%}; "
              f"speed-up {speed:.2f}x (best of {args.repeats})")
    try:
        res["machine"]["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print("wrote", args.json)
        if "sklearn" in res:
            md = Path(args.json).with_suffix(".md")
            md.write_text(summary_md(res))
            print("wrote", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
