"""Deep k-Means re-training (Wu et al., ICML 2018): the spectrally relaxed k-means regulariser.

Every conv's weight (O, C, kh, kw) is viewed as W in R^{s x N}: its N = O*C*kh rows of
length s = kw are the columns (1x1 convs: s = 1, N scalars), exactly the IR's row unit.
During re-training the loss gets

    (lambda / 2) * [Tr(W^T W) - Tr(F^T W^T W F)],  F in R^{N x K}, F^T F = I

whose gradient is lambda * W (I - F F^T). F is held fixed between refreshes, every
``svd_every`` epochs (and before the first), as

* ``relax="spectral"`` (the paper): the top-K right singular vectors of W (truncated SVD).
  W has rank <= s, so only min(K, s) of them are non-trivial; for K >= s the columns of F
  span W's whole row space, W F F^T = W and the term is exactly zero. (On the usual
  3-wide rows it acts only on layers with K < 3.)
* ``relax="hard"``: F is the normalised indicator of the current k-means assignment
  (F_{n,k} = 1/sqrt(|cluster k|) for n in cluster k), the matrix the spectral relaxation
  relaxes. Then W F F^T replaces every row by its centroid and the gradient is
  lambda * (row - centroid): the same k-means objective, without the rank collapse.

Sparsity p: at each refresh the fraction p of rows with the smallest L2 norm form one
cluster fixed at zero (gradient lambda * row), and F is computed from the others with K - 1.
After re-training one k-means per layer gives the shared rows:
``kcompile.cluster(model, "dkm", rate=..., k=..., sparsity=...)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .errors import UsageError


# ------------------------------------------------------------------------------------ math
def row_matrix(w: torch.Tensor) -> torch.Tensor:
    """Conv weight (O, C, kh, kw) -> W (s, N): the IR's rows (length kw) as columns."""
    return w.reshape(-1, w.shape[-1]).t()


def penalty(W: torch.Tensor, F: torch.Tensor, lam: float) -> torch.Tensor:
    """(lam / 2) * (Tr(W^T W) - Tr(F^T W^T W F)) for W (s, N), F (N, K) with F^T F = I."""
    return 0.5 * lam * ((W * W).sum() - ((W @ F) ** 2).sum())


def penalty_grad(W: torch.Tensor, F: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * W (I - F F^T), the gradient of ``penalty`` in W (F fixed). (s, N)."""
    return lam * (W - (W @ F) @ F.t())


def top_right_singular(W: torch.Tensor, k: int) -> torch.Tensor:
    """F (N, min(k, s, N)): the top right singular vectors of W (s, N)."""
    _, _, vh = torch.linalg.svd(W.double(), full_matrices=False)
    return vh[: min(k, vh.shape[0])].t().to(W.dtype).contiguous()


def indicator(labels: torch.Tensor, k: int, dtype=torch.float32) -> torch.Tensor:
    """Normalised cluster indicator F (N, k): 1/sqrt(|cluster j|) where labels == j, else 0."""
    F = torch.zeros(labels.numel(), k, dtype=dtype)
    F[torch.arange(labels.numel()), labels] = 1.0
    return F / F.sum(0).clamp_min(1).sqrt()


@dataclass
class _LayerState:
    k: int
    zero: torch.Tensor | None = None  # (N,) bool: rows in the zero cluster
    F: torch.Tensor | None = None  # spectral: (N_rest, r)
    labels: torch.Tensor | None = None  # hard: (N_rest,)


class KMeansRegularizer:
    """Adds lambda * W (I - F F^T) to the gradient of every (non-skipped) conv weight.

    ``refresh()`` recomputes F (and the zero cluster) from the current weights;
    ``add_grad()`` adds the term to ``.grad`` (call it after backward, before the step).
    """

    def __init__(self, model: nn.Module, rate: float = 0.1, k: int | None = None, lam: float = 1e-4,
                 sparsity: float = 0.0, relax: str = "spectral", skip=(), seed: int = 0, iters: int = 20):
        if relax not in ("spectral", "hard"):
            raise UsageError(f"relax must be 'spectral' or 'hard' (got {relax!r})")
        if k is None and not 0 < rate <= 1:
            raise UsageError(f"--rate must be in (0, 1] (got {rate})")
        if not 0 <= sparsity < 1:
            raise UsageError(f"--sparsity must be in [0, 1) (got {sparsity})")
        if lam < 0:
            raise UsageError(f"lambda must be >= 0 (got {lam})")
        self.lam, self.sparsity, self.relax, self.seed, self.iters = lam, sparsity, relax, seed, iters
        skip = set(skip.split(",") if isinstance(skip, str) else skip)
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in skip]
        if not self.layers:
            raise UsageError("model has no conv layers to re-train with the k-means regulariser")
        self.state: dict[str, _LayerState] = {}
        for name, mod in self.layers:
            n = mod.weight[..., 0].numel()
            kk = k if k is not None else max(1, round(rate * n))
            if not 1 <= kk <= n:
                raise UsageError(f"layer {name}: K={kk} outside 1..{n} rows")
            self.state[name] = _LayerState(k=kk)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the zero cluster and F of every layer from its current weight."""
        from .kmeans import kmeans

        for name, mod in self.layers:
            st = self.state[name]
            W = row_matrix(mod.weight.detach().float())
            k = st.k
            st.zero = None
            if self.sparsity > 0:
                n_zero = int(round(self.sparsity * W.shape[1]))
                order = W.norm(dim=0).argsort(stable=True)
                st.zero = torch.zeros(W.shape[1], dtype=torch.bool)
                st.zero[order[:n_zero]] = True
                k = max(1, k - 1)
                W = W[:, ~st.zero]
            k = min(k, W.shape[1])
            if self.relax == "spectral":
                st.F = top_right_singular(W, k)
            else:
                res = kmeans(W.t().contiguous(), k, iters=self.iters, seed=self.seed)
                st.labels = res.labels[0].clone()

    def layer_grad(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The regulariser's gradient for layer ``name``, shaped like ``weight``."""
        st = self.state[name]
        W = row_matrix(weight.detach())
        G = torch.empty_like(W)
        rest = slice(None) if st.zero is None else ~st.zero
        if st.zero is not None:
            G[:, st.zero] = self.lam * W[:, st.zero]
        Wr = W[:, rest]
        if self.relax == "spectral":
            G[:, rest] = penalty_grad(Wr, st.F.to(W.dtype), self.lam)
        else:
            k = int(st.labels.max()) + 1
            sums = torch.zeros(k, W.shape[0], dtype=W.dtype).index_add_(0, st.labels, Wr.t())
            counts = torch.bincount(st.labels, minlength=k).clamp_min(1).to(W.dtype)
            G[:, rest] = self.lam * (Wr - (sums / counts[:, None])[st.labels].t())
        return G.t().reshape(weight.shape)

    def add_grad(self) -> None:
        for name, mod in self.layers:
            g = self.layer_grad(name, mod.weight)
            if mod.weight.grad is None:
                mod.weight.grad = g
            else:
                mod.weight.grad.add_(g)

    @torch.no_grad()
    def value(self) -> float:
        """Current value of the summed regulariser (lambda/2 * relaxed k-means energy)."""
        total = 0.0
        for name, mod in self.layers:
            g = self.layer_grad(name, mod.weight)
            total += 0.5 * float((g * mod.weight).sum())  # <lam W (I - FF^T), W> / 2
        return total


# -------------------------------------------------------------------------------- training
@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Dataset, batch_size: int = 256) -> nn.Module:
    """Re-estimate every BatchNorm's running mean/var on ``data`` (no gradients), in place.

    Clustering moves the conv outputs away from the statistics BN stored for the dense
    weights; one pass over training images with a cumulative average fixes that.
    Returns ``model`` (in eval mode).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for x, _ in DataLoader(data, batch_size=batch_size, shuffle=False):
            model(x)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
    return model


def retrain_dkm(model: nn.Module, train: Dataset, rate: float = 0.1, k: int | None = None, epochs: int = 10,
                lam: float = 1e-4, svd_every: int = 5, sparsity: float = 0.0, lr: float = 0.01, seed: int = 0,
                batch_size: int = 64, momentum: float = 0.9, weight_decay: float = 1e-5, relax: str = "spectral",
                skip=(), iters: int = 50, show_progress: bool = True) -> nn.Module:
    """Re-train a copy of dense ``model`` with the k-means regulariser, then row-cluster it.

    ``train`` yields (x (C, H, W), y). The training loop is ``kcompile.finetune.finetune``
    (SGD with momentum and weight decay, cosine lr over all steps, cross-entropy), so under
    torchrun / an initialised process group it runs DistributedDataParallel with the global
    batch ``batch_size``; the regulariser's gradient is added after the all-reduce, identically
    on every rank. F is refreshed every ``svd_every`` epochs. Returns the clustered model
    (``kcompile.cluster(..., "dkm", rate/k, sparsity, seed)``); ``model`` is not modified.
    The result's ``kcompile_method`` records the re-training settings under "retrain".
    """
    from .cluster import cluster
    from .finetune import FinetuneConfig, finetune
    from .layers import clustered_layers

    if clustered_layers(model):
        raise UsageError("model is already clustered; re-train the dense model instead")
    if epochs < 0:
        raise UsageError(f"--retrain-epochs must be >= 0 (got {epochs})")
    if svd_every < 1:
        raise UsageError(f"--svd-every must be >= 1 (got {svd_every})")
    skip = tuple(x for x in (skip.split(",") if isinstance(skip, str) else skip) if x)
    m = copy.deepcopy(model)
    reg = KMeansRegularizer(m, rate=rate, k=k, lam=lam, sparsity=sparsity, relax=relax, skip=skip, seed=seed)
    values: list[float] = []

    def on_epoch(epoch: int) -> None:
        if epoch % svd_every == 0:
            reg.refresh()
        values.append(reg.value())

    cfg = FinetuneConfig(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                         batch_size=batch_size, seed=seed)
    losses = finetune(m, train, cfg, show_progress=show_progress, on_epoch=on_epoch,
                      after_backward=reg.add_grad, label="dkm re-train")
    history = [{"epoch": i + 1, "loss": loss, "regulariser_at_start": v}
               for i, (loss, v) in enumerate(zip(losses, values))]
    m.eval()
    cm = cluster(m, "dkm", rate=rate, k=k, sparsity=sparsity, seed=seed, skip=skip, iters=iters)
    cm.kcompile_method = dict(cm.kcompile_method)
    cm.kcompile_method["retrain"] = {"epochs": epochs, "lam": lam, "svd_every": svd_every, "lr": lr,
                                     "relax": relax, "batch_size": batch_size, "history": history}
    return cm


__all__ = ["KMeansRegularizer", "indicator", "penalty", "penalty_grad", "recalibrate_bn", "retrain_dkm", "row_matrix",
           "top_right_singular"]
