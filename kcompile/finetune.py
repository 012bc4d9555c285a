"""Fine-tuning a clustered model with its indices fixed (centroids, scales, BN, dense layers train).

The index/transform/offset tensors are buffers, so plain autograd trains exactly what the
methods prescribe: a shared centroid's gradient is the sum of its members' gradients
(across layers too, for a network-wide codebook).

Distributed: when a torch.distributed group is initialised, or when the process was
launched by ``torchrun`` (WORLD_SIZE / RANK / LOCAL_RANK in the environment; the group is
then joined here, gloo on CPU, NCCL on CUDA), the model is wrapped in
DistributedDataParallel and every rank reads its own shard of ``train`` through a
DistributedSampler. ``cfg.batch_size`` is the *global* batch: each of the R ranks takes
ceil(batch_size / R) samples per step, so R ranks follow the same schedule (steps, lr,
effective batch) as one process. DDP averages the ranks' gradients; since each rank's loss
is the mean over its share of the batch, the result is the gradient of the whole batch --
for a codebook shared by several layers too (the parameter appears once in the model, its
local gradient already sums every member of every layer, and the all-reduce then combines
the ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .progress import progress


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    batch_size: int = 64  # global batch (split across ranks when distributed)
    seed: int = 0


def finetune(model: nn.Module, train: Dataset, cfg: FinetuneConfig = FinetuneConfig(),
             show_progress: bool = True, sampler=None, *, on_epoch: Callable[[int], None] | None = None,
             after_backward: Callable[[], None] | None = None, label: str = "fine-tune") -> list[float]:
    """Train ``model`` in place with SGD (momentum, weight decay) and cross-entropy.

    ``train`` yields (x (C, H, W) float, y int). Returns the mean training loss per epoch
    (over all ranks when distributed). ``sampler`` (e.g. a DistributedSampler) replaces the
    seeded shuffle. Under torch.distributed (see the module docstring) the model is wrapped
    in DistributedDataParallel; parameters end up identical on every rank.
    Hooks (used by the DKM re-training): ``on_epoch(epoch)`` runs before each epoch,
    ``after_backward()`` after each backward pass (gradients already all-reduced), before
    the optimiser step; both must act identically on every rank.
    """
    from .distributed import current, env_world, init_from_env

    info = init_from_env() if env_world() is not None else current()
    world = info.world_size if dist.is_available() and dist.is_initialized() else 1
    device = torch.device("cpu")
    home = next((p.device for p in model.parameters()), device)
    if world > 1 and info.backend == "nccl":
        device = torch.device("cuda", info.local_rank)
        model.to(device)
    batch = cfg.batch_size
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        from torch.utils.data.distributed import DistributedSampler

        _sync_integer_buffers(model)
        if sampler is None:
            sampler = DistributedSampler(train, num_replicas=world, rank=info.rank, shuffle=True, seed=cfg.seed)
        batch = max(1, math.ceil(cfg.batch_size / world))
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train, batch_size=batch, shuffle=sampler is None, generator=g, sampler=sampler)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                          momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * len(loader)))
    losses = []
    model.train()
    with progress(show_progress and info.rank == 0) as bar:
        task = bar.add_task(label + (f" ({world} ranks)" if world > 1 else ""),
                            total=cfg.epochs * len(loader), info="")
        for epoch in range(cfg.epochs):
            if sampler is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            if on_epoch is not None:
                on_epoch(epoch)
            total = torch.zeros(2, dtype=torch.float64)
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(net(x), y)
                loss.backward()
                if after_backward is not None:
                    after_backward()
                opt.step()
                sched.step()
                total += torch.tensor([float(loss.detach()) * len(y), len(y)], dtype=torch.float64)
                bar.update(task, advance=1, info=f"epoch {epoch + 1} loss {total[0] / total[1]:.4f}")
            if world > 1:
                total = total.to(device)
                dist.all_reduce(total)
                total = total.cpu()
            losses.append(float(total[0] / total[1].clamp_min(1)))
    if world > 1:  # DDP syncs buffers at each forward: the last step's BN statistics differ per rank
        with torch.no_grad():
            for buf in model.buffers():
                if buf is not None and buf.is_floating_point():
                    dist.broadcast(buf, src=0)
    if device != home:
        model.to(home)
    model.eval()
    return losses


def _sync_integer_buffers(model: nn.Module) -> None:
    """Broadcast rank 0's integer buffers (cluster indices...) and hide them from DDP.

    DDP broadcasts floating state itself; narrow unsigned index types are not supported by
    every backend, so they travel here as int64 and are excluded from DDP's own syncing.
    """
    names = []
    for name, buf in model.named_buffers():
        if buf is None or buf.is_floating_point():
            continue
        t = buf.to(torch.int64)
        dist.broadcast(t, src=0)
        buf.copy_(t.to(buf.dtype))
        names.append(name)
    if names:
        from torch.nn.parallel import DistributedDataParallel as DDP

        DDP._set_params_and_buffers_to_ignore_for_model(model, names)
