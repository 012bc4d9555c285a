"""Summarise `kcompile bench --suite layers|models` records into benchmarks/results/bench_suites.md.

    kcompile bench --suite models --runs 30 --json benchmarks/results/bench_models.json --html benchmarks/results/bench_models.html
    kcompile bench --suite layers --runs 30 --json benchmarks/results/bench_layers.json --html benchmarks/results/bench_layers.html
    python benchmarks/bench_suites_summary.py [--note "machine / load text"]

Reads the two JSON record lists and writes the fastest backend per layer case and the whole
model table (no timing here).
"""

from __future__ import annotations

import argparse
import json
import os

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def layer_rows(recs: list[dict]) -> list[str]:
    """One markdown row per clustered layer case: its fastest backend and the speed-ups."""
    cases: dict[tuple[str, str], list[dict]] = {}
    for r in recs:
        shape, case = r["layer"].split("/", 1)
        cases.setdefault((shape, case), []).append(r)
    out = ["| layer | clustering | fastest backend | form | median ms | torch dense ms | speed-up | tvm-llvm x | numba x |",
           "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for (shape, case), rs in cases.items():
        if case == "dense":
            continue
        best = min(rs, key=lambda r: r["median_ms"])
        sp = {r["backend"]: r["speedup_vs_dense"] for r in rs}
        out.append(f"| {shape.replace('conv3x3_', '')} | {case} | {best['backend']} | {best.get('form') or '-'} | "
                   f"{best['median_ms']:.3f} | {best['dense_median_ms']:.3f} | {best['speedup_vs_dense']:.2f}x | "
                   f"{sp.get('tvm-llvm', float('nan')):.2f}x | {sp.get('numba', float('nan')):.2f}x |")
    return out


def model_rows(recs: list[dict]) -> list[str]:
    out = ["| model | backend | median ms | min ms | vs torch dense of the same model |", "|---|---|---:|---:|---:|"]
    out += [f"| {r['model']} | {r['backend']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | {r['speedup_vs_dense']:.2f}x |"
            for r in recs]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--note", default="", help="machine and load text for the header")
    args = ap.parse_args(argv)
    layers = json.load(open(os.path.join(RESULTS, "bench_layers.json")))
    models = json.load(open(os.path.join(RESULTS, "bench_models.json")))
    lines = ["# `kcompile bench --suite layers` and `--suite models`", "",
             "Regenerate: the commands at the top of `benchmarks/bench_suites_summary.py`. " + args.note, "",
             "Every backend's output is checked against torch-decoded (`max_abs_err` in the JSON); the HTML "
             "files hold the full tables and the estimate-vs-latency scatter plots. Speed-up = torch dense median "
             "(timed in the same case) / the backend's median.", "",
             "## Layer suite: fastest backend per case", "", *layer_rows(layers), "",
             "## Model suite (whole models, batch 1)", "", *model_rows(models), ""]
    with open(os.path.join(RESULTS, "bench_suites.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
