"""Deep k-Means on zoo:digits-resnet: one-shot row clustering vs re-training with the k-means regulariser.

For each cluster rate, the shipped (99.17 %) model is
  * clustered one-shot: ``kcompile.cluster(m, "dkm", rate=r)``;
  * re-trained for E epochs with the regulariser, then clustered the same way
    (``kcompile.dkm_retrain.retrain_dkm``), for every requested variant
    (``spectral``: the paper's truncated-SVD F; ``hard``: F = normalised k-means indicator),
    and, as a control, re-trained with lambda = 0 (plain fine-tuning of the dense model).
Test accuracy on the fixed 360-image digits test split, raw and after re-estimating the BN
running statistics on the training images (``recalibrate_bn``: clustering shifts the conv
outputs away from the stored statistics); re-trainings can be repeated over seeds (batch
order and k-means seed) and are reported as mean/min/max.

    python benchmarks/dkm_retrain.py                    # writes benchmarks/results/dkm_retrain.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import kcompile
from kcompile.data import evaluate, load_dataset
from kcompile.dkm_retrain import recalibrate_bn, retrain_dkm

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="0.25,0.1,0.05")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--svd-every", type=int, default=5)
    ap.add_argument("--variants", default="spectral:1e-4,none:0,hard:2:1",
                    help="relax:lambda[:svd_every]; relax 'none' = lambda 0 (plain re-training control)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/dkm_retrain.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, test = load_dataset("digits")
    dense = kcompile.load("zoo:digits-resnet")
    rec = {"command": "python benchmarks/dkm_retrain.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "model": "zoo:digits-resnet", "dense_accuracy": evaluate(dense, test), "epochs": args.epochs,
           "lr": args.lr, "svd_every": args.svd_every, "seeds": [int(s) for s in args.seeds.split(",")],
           "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "results": []}
    t0 = time.time()
    for rate in (float(r) for r in args.rates.split(",")):
        cm = kcompile.cluster(dense, "dkm", rate=rate)
        one = evaluate(cm, test)
        one_bn = evaluate(recalibrate_bn(cm, train), test)
        row = {"rate": rate, "one_shot": one, "one_shot_bn_recalibrated": one_bn, "retrained": {}}
        for v in args.variants.split(","):
            parts = v.split(":")
            relax, lam = parts[0], float(parts[1])
            every = int(parts[2]) if len(parts) > 2 else args.svd_every
            accs, accs_bn = [], []
            for seed in rec["seeds"]:
                cm = retrain_dkm(dense, train, rate=rate, epochs=args.epochs, lam=lam, svd_every=every, lr=args.lr,
                                 seed=seed, relax="spectral" if relax == "none" else relax, show_progress=False)
                accs.append(evaluate(cm, test))
                accs_bn.append(evaluate(recalibrate_bn(cm, train), test))
            row["retrained"][v] = {"relax": relax, "lambda": lam, "svd_every": every,
                                   "mean": statistics.mean(accs), "min": min(accs), "max": max(accs), "runs": accs,
                                   "bn_recalibrated_mean": statistics.mean(accs_bn), "bn_recalibrated_runs": accs_bn}
            print(f"rate {rate}: one-shot {one:.2f} % (BN recal {one_bn:.2f}), {v}: {statistics.mean(accs):.2f} % "
                  f"(BN recal {statistics.mean(accs_bn):.2f})", flush=True)
        rec["results"].append(row)
    rec["seconds"] = round(time.time() - t0, 1)
    Path(args.json).write_text(json.dumps(rec, indent=2))
    print(f"wrote {args.json} ({rec['seconds']} s)")


if __name__ == "__main__":
    main()
