"""Filter grafting (Meng et al., CVPR 2020) on torch.distributed: one rank per network.

N networks train at once, network i on rank i. After every epoch but the last, each rank
sends its *pre-graft* weights to its ring successor (rank + 1 mod N), receives those of its
predecessor M' (rank - 1 mod N) and grafts, layer by layer::

    H(W)  = - sum_i p_i ln p_i      p_i = count_i / n over 10 equal-width bins on [min, max]
    w     = a / pi * arctan(c * (H(W_M) - H(W_M'))) + 0.5          (a = 0.4, c = 500)
    W_M  <- w * W_M + (1 - w) * W_M'

Only conv weights have an entropy; every other floating tensor of the state (conv bias,
batch-norm weight/bias/running statistics, linear layers) takes the coefficient of the
conv that precedes it in module order (tensors before the first conv: the first conv's).
The exchange is point-to-point (isend/irecv) so it scales to ranks on several machines.
The last graft is skipped so that every network ends on trained, not freshly mixed, weights.

Diversity: each network gets its own initialisation (seed + rank) and batch order; with
``dlr`` network i in 1..N gets lr_i = lr * (1 + cos(pi * (N - i) / N)) / 2; ``cos`` anneals
every network's lr with a cosine over all steps.

Fault handling: every collective has a timeout; a rank that dies or hangs makes the others
fail with one line naming it. After each epoch (after grafting) every rank writes
``DIR/net{rank}.ckpt`` atomically (keeping the previous one as ``net{rank}.prev.ckpt``);
``resume=True`` restarts all ranks from the newest epoch that every rank has on disk.

Outputs in DIR: ``net{rank}.pth`` (the trained state_dict, loadable with ``--arch``),
``net{rank}.ckpt`` and ``graft.json`` (per network: lr, per-epoch accuracy before and after
grafting, mean coefficient, invalid filters at the end).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import KcompileError, UsageError

ENTROPY_BINS = 10


# ------------------------------------------------------------------------------------ math
def layer_entropy(w: torch.Tensor, bins: int = ENTROPY_BINS) -> float:
    """Entropy (natural log) of the values of ``w`` in ``bins`` equal-width bins over [min, max].

    The last bin is closed (it holds the maximum). A constant tensor has entropy 0.
    """
    x = w.detach().reshape(-1).double()
    if x.numel() == 0:
        return 0.0
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return 0.0
    idx = ((x - lo) / (hi - lo) * bins).floor().clamp_(0, bins - 1).long()
    p = torch.bincount(idx, minlength=bins).double() / x.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def graft_coefficient(h_self: float, h_peer: float, a: float = 0.4, c: float = 500.0) -> float:
    """w = a / pi * arctan(c * (h_self - h_peer)) + 0.5: the weight kept from the own network."""
    return a / math.pi * math.atan(c * (h_self - h_peer)) + 0.5


def dlr_lr(lr: float, i: int, n: int) -> float:
    """Initial lr of network i in 1..n under --dlr: lr * (1 + cos(pi * (n - i) / n)) / 2."""
    return lr * (1 + math.cos(math.pi * (n - i) / n)) / 2


def graft_plan(model: nn.Module) -> list[tuple[str, str | None]]:
    """(state key, owning conv weight key) for every floating state tensor, in state order.

    A conv weight owns itself; other tensors point at the conv weight that precedes them in
    module order (the first conv for tensors before it; None when the model has no conv).
    """
    owner: dict[str, str | None] = {}
    last: str | None = None
    pending: list[str] = []
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, nn.Conv2d):
            last = f"{prefix}weight"
            for k in pending:
                owner[k] = last
            pending = []
        for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t is None or not t.is_floating_point():
                continue
            key = f"{prefix}{pname}"
            if last is None:
                pending.append(key)
            else:
                owner[key] = last
    for k in pending:
        owner[k] = None
    return [(k, owner[k]) for k, t in model.state_dict().items() if k in owner]


def graft_states(own: dict, peer: dict, plan: list[tuple[str, str | None]], a: float = 0.4,
                 c: float = 500.0) -> tuple[dict, dict[str, float]]:
    """Graft ``peer`` into ``own`` (state dicts, not modified); returns (new state, {conv: w})."""
    coeff: dict[str, float] = {}
    for _, conv in plan:
        if conv is not None and conv not in coeff:
            coeff[conv] = graft_coefficient(layer_entropy(own[conv]), layer_entropy(peer[conv]), a, c)
    new = dict(own)
    for key, conv in plan:
        w = coeff[conv] if conv is not None else 0.5
        new[key] = (w * own[key].double() + (1 - w) * peer[key].double()).to(own[key].dtype)
    return new, coeff


# ---------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class GraftConfig:
    """One grafting run. ``out`` is the output folder; ``num`` the number of networks."""

    arch: str
    out: str
    data: str = "digits"
    num: int = 2
    epochs: int = 10
    a: float = 0.4
    c: float = 500.0
    dlr: bool = False
    cos: bool = False
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0
    graft: bool = True
    resume: bool = False
    timeout: float = 300.0
    threshold: float = 0.1
    subset: int = 0  # use only the first `subset` training images (0: all)
    arch_kwargs: dict = field(default_factory=dict)
    verbose: bool = True

    def check(self) -> None:
        if self.num < 1:
            raise UsageError(f"--num must be >= 1 (got {self.num})")
        if self.epochs < 1:
            raise UsageError(f"--epochs must be >= 1 (got {self.epochs})")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0 (got {self.lr})")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if not self.timeout > 0:
            raise UsageError(f"--timeout must be > 0 (got {self.timeout})")


# ---------------------------------------------------------------------------- checkpoints
def ckpt_paths(out: str | Path, rank: int) -> tuple[Path, Path]:
    """(latest, previous) checkpoint files of network ``rank``."""
    out = Path(out)
    return out / f"net{rank}.ckpt", out / f"net{rank}.prev.ckpt"


def save_checkpoint(out: str | Path, rank: int, obj: dict) -> None:
    """Write net{rank}.ckpt atomically; the one it replaces becomes net{rank}.prev.ckpt.

    A crash at any point leaves a complete latest or previous checkpoint on disk.
    """
    from .fileio import atomic_path

    latest, prev = ckpt_paths(out, rank)
    if latest.exists():
        os.replace(latest, prev)
    with atomic_path(latest) as tmp:
        torch.save(obj, tmp)


def load_checkpoints(out: str | Path, rank: int) -> dict[int, dict]:
    """{epoch: checkpoint} of network ``rank`` found on disk (latest and previous)."""
    found = {}
    for p in ckpt_paths(out, rank):
        if p.exists():
            try:
                obj = torch.load(p, map_location="cpu", weights_only=True)
            except Exception:  # a damaged file: the other one may still do
                continue
            found[int(obj["epoch"])] = obj
    return found


# --------------------------------------------------------------------------------- one rank
def _reinit(model: nn.Module, seed: int) -> None:
    """A network's own random initialisation: module defaults, Kaiming-normal convs, BN 1/0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def _float_keys(model: nn.Module) -> list[str]:
    return [k for k, t in model.state_dict().items() if t.is_floating_point()]


def exchange_ring(flat: torch.Tensor, rank: int, world: int, timeout: float) -> torch.Tensor:
    """Send ``flat`` to rank+1, receive the same-sized tensor from rank-1 (mod world)."""
    buf = torch.empty_like(flat)
    dst, src = (rank + 1) % world, (rank - 1) % world
    reqs = [dist.isend(flat, dst), dist.irecv(buf, src)]
    for r in reqs:
        r.wait(timedelta(seconds=timeout))
    return buf


def _log(cfg: GraftConfig, rank: int, msg: str) -> None:
    if cfg.verbose:
        print(f"[net{rank}] {msg}", flush=True)


def train_rank(rank: int, world: int, cfg: GraftConfig, hook: Callable[[int, int], None] | None = None) -> dict:
    """Train network ``rank`` of ``world`` with grafting (the group is initialised). Returns its summary.

    ``hook(rank, epoch)`` runs at the start of every epoch (tests use it to kill a rank).
    """
    from torch.utils.data import DataLoader, Subset

    from .data import evaluate, load_dataset
    from .distributed import describe_failure
    from .fileio import atomic_path
    from .invalid_filters import invalid_filters
    from .loading import build_arch

    out = Path(cfg.out)
    model = build_arch(cfg.arch, cfg.arch_kwargs)
    arch = model.kcompile_arch
    _reinit(model, cfg.seed * 1000 + rank)
    train, test = load_dataset(cfg.data)
    if cfg.subset:
        train = Subset(train, range(min(cfg.subset, len(train))))
    lr = dlr_lr(cfg.lr, rank + 1, world) if cfg.dlr else cfg.lr
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps) if cfg.cos else None
    history: list[dict] = []
    start = 0
    if cfg.resume:
        start, history = _resume(model, opt, sched, cfg, rank, world)
    plan = graft_plan(model)
    keys = _float_keys(model)
    grafting = cfg.graft and world > 1
    for epoch in range(start, cfg.epochs):
        if hook is not None:
            hook(rank, epoch)
        g = torch.Generator().manual_seed(cfg.seed + 7919 * rank + 104729 * epoch)
        model.train()
        total, n = 0.0, 0
        for x, y in DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=g):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        rec = {"epoch": epoch + 1, "loss": total / max(n, 1), "accuracy": evaluate(model, test),
               "lr": opt.param_groups[0]["lr"]}
        if grafting and epoch < cfg.epochs - 1:
            state = model.state_dict()
            flat = torch.cat([state[k].detach().reshape(-1).float() for k in keys])
            try:
                peer_flat = exchange_ring(flat, rank, world, cfg.timeout)
            except Exception as e:  # noqa: BLE001
                src, dst = (rank - 1) % world, (rank + 1) % world
                peer_name = f"net{src}" if src == dst else f"net{src} or net{dst}"
                raise KcompileError(describe_failure(e, rank, peer_name)
                                    + f"; last good checkpoints are in {out}, rerun with --resume") from None
            peer, off = {}, 0
            for k in keys:
                t = state[k]
                peer[k] = peer_flat[off:off + t.numel()].reshape(t.shape).to(t.dtype)
                off += t.numel()
            new, coeff = graft_states(state, peer, plan, cfg.a, cfg.c)
            model.load_state_dict(new)
            rec["graft_w_mean"] = sum(coeff.values()) / max(len(coeff), 1)
            rec["accuracy_after_graft"] = evaluate(model, test)
        history.append(rec)
        save_checkpoint(out, rank, {"epoch": epoch + 1, "rank": rank, "world": world, "state": model.state_dict(),
                                    "opt": opt.state_dict(), "sched": None if sched is None else sched.state_dict(),
                                    "history": history, "arch": arch, "config": _config_record(cfg)})
        _log(cfg, rank, f"epoch {epoch + 1}/{cfg.epochs} loss {rec['loss']:.4f} acc {rec['accuracy']:.2f} %"
             + (f" -> {rec['accuracy_after_graft']:.2f} % after graft (w {rec['graft_w_mean']:.3f})"
                if "accuracy_after_graft" in rec else ""))
    with atomic_path(out / f"net{rank}.pth") as tmp:
        torch.save(model.state_dict(), tmp)
    inv = invalid_filters(model, cfg.threshold)
    return {"rank": rank, "lr": lr, "history": history,
            "accuracy": history[-1]["accuracy"] if history else evaluate(model, test),
            "invalid_filters": inv["invalid"], "filters": inv["filters"],
            "invalid_per_layer": {k: v["invalid"] for k, v in inv["layers"].items()},
            "model": str(out / f"net{rank}.pth"), "arch": arch}


def _config_record(cfg: GraftConfig) -> dict:
    d = asdict(cfg)
    d["arch_kwargs"] = json.dumps(cfg.arch_kwargs)
    return d


def _resume(model, opt, sched, cfg: GraftConfig, rank: int, world: int) -> tuple[int, list]:
    """Load the newest epoch every rank has on disk; returns (epochs done, history)."""
    found = load_checkpoints(cfg.out, rank)
    for ep, obj in found.items():
        if obj.get("world") != world:
            raise KcompileError(f"{ckpt_paths(cfg.out, rank)[0]}: written by a run with {obj.get('world')} networks, "
                                f"not {world}")
    mine = max(found) if found else 0
    target = mine
    if cfg.graft and world > 1:
        t = torch.tensor([mine], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        target = int(t)
    if target == 0:
        return 0, []
    if target not in found:
        raise KcompileError(f"net{rank}: no checkpoint for epoch {target} in {cfg.out} "
                            f"(have {sorted(found) or 'none'}); cannot resume consistently")
    obj = found[target]
    model.load_state_dict(obj["state"])
    opt.load_state_dict(obj["opt"])
    if sched is not None and obj.get("sched"):
        sched.load_state_dict(obj["sched"])
    _log(cfg, rank, f"resumed after epoch {target}")
    return target, list(obj["history"])


# --------------------------------------------------------------------------------- launcher
def _spawned(rank: int, world: int, cfg: GraftConfig) -> dict:
    return train_rank(rank, world, cfg)


def run_graft(cfg: GraftConfig, hook_fn: Callable | None = None) -> dict | None:
    """Run grafting: join torchrun's group if launched by it, else spawn ``cfg.num`` ranks.

    Returns the summary (also written to DIR/graft.json) on rank 0 / the launcher; None on
    other torchrun ranks. ``hook_fn`` replaces the spawned worker (tests).
    """
    from .distributed import env_world, init_from_env, spawn

    cfg.check()
    from .data import load_dataset
    from .loading import build_arch

    build_arch(cfg.arch, cfg.arch_kwargs)  # fail early and once on a bad --arch or --data
    load_dataset(cfg.data)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KcompileError(f"cannot create output folder {out}: {e.strerror}") from None
    t0 = time.time()
    env = env_world()
    if env is not None and env.world_size > 1:
        if env.world_size != cfg.num:
            raise UsageError(f"--num {cfg.num} but torchrun started {env.world_size} ranks")
        info = init_from_env(timeout=cfg.timeout)
        res = train_rank(info.rank, info.world_size, cfg)
        gathered: list = [None] * info.world_size
        dist.all_gather_object(gathered, res)
        results = gathered if info.rank == 0 else None
    else:
        results = spawn(hook_fn or _spawned, cfg.num, (cfg,), timeout=cfg.timeout)
    if results is None:
        return None
    summary = {"config": _config_record(cfg), "seconds": round(time.time() - t0, 1), "networks": results}
    from .fileio import atomic_path

    with atomic_path(out / "graft.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))
    return summary
