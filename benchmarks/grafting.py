"""Filter grafting on digits: baseline (same epochs, no grafting) vs grafting with N = 2 and N = 3.

Every configuration trains networks with identical per-rank seeds, so network i of the
baseline starts exactly like network i of the grafted runs; the baseline is
``--num 3 --no-graft`` (three independent networks). Reported per network: final test
accuracy and invalid filters (conv filters with L1 norm < threshold), plus means.

    python benchmarks/grafting.py                         # writes benchmarks/results/grafting.{json,md}
    python benchmarks/grafting.py --arch benchmarks/grafting.py:narrow_digits --weight-decay 5e-3

``narrow_digits`` is a deliberately narrow variant of digits-resnet (stem 8, stages 8/16/32)
for runs that want invalid filters to appear.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


class NarrowDigits(nn.Module):
    """digits-resnet with every width divided by ``div`` (default 2). (N, 1, 8, 8) -> (N, 10)."""

    def __init__(self, num_classes: int = 10, div: int = 2) -> None:
        super().__init__()
        from kcompile.zoo.resnet import BasicBlock

        w = [16 // div, 32 // div, 64 // div]
        self.conv1 = nn.Conv2d(1, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(w[0], w[0]), BasicBlock(w[0], w[0]))
        self.layer2 = nn.Sequential(BasicBlock(w[0], w[1], stride=2))
        self.layer3 = nn.Sequential(BasicBlock(w[1], w[2], stride=2))
        self.fc = nn.Linear(w[2], num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def narrow_digits(num_classes: int = 10, div: int = 2) -> NarrowDigits:
    return NarrowDigits(num_classes, div)


def main() -> None:
    from kcompile.graft import GraftConfig, run_graft
    from kcompile.invalid_filters import invalid_filters
    from kcompile.loading import build_arch

    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="zoo:digits-resnet")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cos", action="store_true")
    ap.add_argument("--dlr", action="store_true")
    ap.add_argument("--thresholds", default="0.1,0.01")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/grafting.json"))
    args = ap.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    rec = {"command": "python benchmarks/grafting.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "arch": args.arch, "data": "digits (1437 train / 360 test)", "epochs": args.epochs, "lr": args.lr,
           "weight_decay": args.weight_decay, "batch_size": args.batch_size, "cos": args.cos, "dlr": args.dlr,
           "threads_per_rank": 1, "torch": torch.__version__, "python": platform.python_version(),
           "machine": f"{platform.machine()}, 2 cores shared with other jobs", "runs": {}}
    t0 = time.time()
    for name, num, graft in (("baseline (3 independent)", 3, False), ("graft N=2", 2, True), ("graft N=3", 3, True)):
        with tempfile.TemporaryDirectory() as d:
            cfg = GraftConfig(arch=args.arch, out=d, num=num, epochs=args.epochs, lr=args.lr,
                              weight_decay=args.weight_decay, batch_size=args.batch_size, cos=args.cos,
                              dlr=args.dlr, graft=graft, timeout=600, verbose=False)
            t = time.time()
            s = run_graft(cfg)
            nets = []
            for n in s["networks"]:
                m = build_arch(args.arch)
                m.load_state_dict(torch.load(n["model"], weights_only=True))
                inv = {str(th): invalid_filters(m, th)["invalid"] for th in thresholds}
                nets.append({"rank": n["rank"], "lr": n["lr"], "accuracy": n["accuracy"], "invalid": inv,
                             "filters": n["filters"],
                             "accuracy_by_epoch": [h["accuracy"] for h in n["history"]],
                             "accuracy_after_graft_by_epoch": [h.get("accuracy_after_graft") for h in n["history"]]})
        accs = [n["accuracy"] for n in nets]
        rec["runs"][name] = {"num": num, "graft": graft, "seconds": round(time.time() - t, 1), "networks": nets,
                             "accuracy_mean": statistics.mean(accs), "accuracy_max": max(accs),
                             "invalid_mean": {str(th): statistics.mean(n["invalid"][str(th)] for n in nets)
                                              for th in thresholds}}
        print(f"{name}: accuracy {', '.join(f'{a:.2f}' for a in accs)} % (mean {statistics.mean(accs):.2f}); "
              f"invalid filters {[n['invalid'] for n in nets]} of {nets[0]['filters']}", flush=True)
    rec["seconds"] = round(time.time() - t0, 1)
    Path(args.json).write_text(json.dumps(rec, indent=2))
    print(f"wrote {args.json} ({rec['seconds']} s)")


if __name__ == "__main__":
    main()
