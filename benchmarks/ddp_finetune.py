"""Fine-tuning a clustered digits-resnet in 1 process vs 2 DistributedDataParallel ranks.

The model is row-clustered once (dkm, --rate), then fine-tuned for --epochs with
``kcompile.finetune.finetune`` (global batch 64, lr 0.01, cosine) for several shuffle seeds,
once in this process and once as 2 gloo ranks spawned by ``kcompile.distributed.spawn``
(each rank 32 images per step). The spread over seeds is the noise the 2-rank result is
compared with.

    python benchmarks/ddp_finetune.py          # writes benchmarks/results/ddp_finetune.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _rank(rank, world, cm, train, test, cfg):
    from kcompile.data import evaluate
    from kcompile.finetune import finetune

    finetune(cm, train, cfg, show_progress=False)
    return evaluate(cm, test)


def main() -> None:
    import kcompile
    from kcompile import distributed as kd
    from kcompile.data import evaluate, load_dataset
    from kcompile.finetune import FinetuneConfig, finetune

    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="0.1,0.05")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/ddp_finetune.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, test = load_dataset("digits")
    dense = kcompile.load("zoo:digits-resnet")
    rec = {"command": "python benchmarks/ddp_finetune.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "model": "zoo:digits-resnet", "method": "dkm", "epochs": args.epochs, "global_batch": 64, "lr": 0.01,
           "threads_per_process": 1, "torch": torch.__version__, "python": platform.python_version(),
           "machine": f"{platform.machine()}, 2 cores shared with other jobs", "results": []}
    t0 = time.time()
    for rate in (float(r) for r in args.rates.split(",")):
        cm = kcompile.cluster(dense, "dkm", rate=rate)
        row = {"rate": rate, "clustered": evaluate(cm, test), "one_process": [], "two_ranks": []}
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = FinetuneConfig(epochs=args.epochs, lr=0.01, batch_size=64, seed=seed)
            m = copy.deepcopy(cm)
            finetune(m, train, cfg, show_progress=False)
            row["one_process"].append(evaluate(m, test))
            accs = kd.spawn(_rank, 2, (copy.deepcopy(cm), train, test, cfg), timeout=600)
            assert accs[0] == accs[1]
            row["two_ranks"].append(accs[0])
            print(f"rate {rate} seed {seed}: 1 process {row['one_process'][-1]:.2f} %, 2 ranks {accs[0]:.2f} %",
                  flush=True)
        for k in ("one_process", "two_ranks"):
            row[k + "_mean"] = statistics.mean(row[k])
        rec["results"].append(row)
    rec["seconds"] = round(time.time() - t0, 1)
    Path(args.json).write_text(json.dumps(rec, indent=2))
    print(f"wrote {args.json} ({rec['seconds']} s)")


if __name__ == "__main__":
    main()
