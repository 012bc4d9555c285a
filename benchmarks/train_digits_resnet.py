"""Train the shipped zoo:digits-resnet weights on scikit-learn's digits.

Deterministic (fixed seeds, one thread, deterministic algorithms), CPU only,
well under 2 minutes.  Trains on the fixed 1437-image training split of
``kcompile.data.load_dataset("digits")`` (never looks at the test split while
training), then reports train/test top-1 accuracy, writes the float32
state_dict to kcompile/zoo/weights/digits_resnet.pt and a JSON record (with
the command line that produced it) to benchmarks/results/train_digits_resnet.json.

    python benchmarks/train_digits_resnet.py            # reproduce the shipped weights
    python benchmarks/train_digits_resnet.py --out /tmp/w.pt --json /tmp/r.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kcompile import zoo
from kcompile.data import evaluate, load_dataset

ROOT = Path(__file__).resolve().parents[1]


def shift_augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Randomly translate each (1, 8, 8) image by up to ``max_shift`` pixels (zero fill).

    x: (B, C, H, W) normalised images; the fill value is the normalised 0
    pixel (the batch minimum of the background), so shifted borders look blank.
    """
    b, _, h, w = x.shape
    p = max_shift
    bg = float(x.min())
    padded = F.pad(x, (p, p, p, p), value=bg)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    out = torch.empty_like(x)
    for i in range(b):
        out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


def train(epochs: int, seed: int, lr: float, batch: int, wd: float) -> tuple[torch.nn.Module, list[float]]:
    """Train a fresh digits-resnet with AdamW + cosine LR; return it and per-epoch losses."""
    train_set, _ = load_dataset("digits")
    x_all, y_all = train_set.tensors
    torch.manual_seed(seed)
    model = zoo.build("digits-resnet", pretrained=False)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps_per_epoch = math.ceil(len(x_all) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    losses = []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_all), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            x = shift_augment(x_all[idx], gen)
            loss = F.cross_entropy(model(x), y_all[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x_all))
    return model.eval(), losses


def state_hash(state: dict) -> str:
    """sha256 over the state_dict's keys, dtypes, shapes and raw tensor bytes, in order."""
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--out", type=Path, default=ROOT / "kcompile/zoo/weights/digits_resnet.pt")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/train_digits_resnet.json")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    model, losses = train(args.epochs, args.seed, args.lr, args.batch, args.wd)
    seconds = time.perf_counter() - t0

    train_set, test_set = load_dataset("digits")
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).clone().contiguous()
             for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    # Re-load through the zoo path exactly as users get it.
    reloaded = zoo.build("digits-resnet", pretrained=False)
    reloaded.load_state_dict(torch.load(args.out, weights_only=True))
    record = {
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + sys.argv[1:]),
        "model": "zoo:digits-resnet",
        "params": sum(p.numel() for p in model.parameters()),
        "epochs": args.epochs, "seed": args.seed, "lr": args.lr, "batch": args.batch,
        "weight_decay": args.wd, "optimizer": "AdamW + OneCycleLR, label smoothing 0.05, +-1 px shifts",
        "train_size": len(train_set), "test_size": len(test_set),
        "final_train_loss": round(losses[-1], 5),
        "train_accuracy": round(evaluate(reloaded, train_set), 3),
        "test_accuracy": round(evaluate(reloaded, test_set), 3),
        "train_seconds": round(seconds, 1),
        "weights_file": str(args.out.resolve().relative_to(ROOT)) if args.out.resolve().is_relative_to(ROOT) else str(args.out),
        "weights_bytes": args.out.stat().st_size,
        # Hash of the tensors (the file itself embeds a per-save serialization id).
        "state_sha256": state_hash(state),
        "torch": torch.__version__, "python": platform.python_version(), "threads": 1,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
