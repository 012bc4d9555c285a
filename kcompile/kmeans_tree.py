"""Lloyd's k-means for many clusters in few dimensions, with a k-d tree for the assignment.

The batched engine in :mod:`kcompile.kmeans` finds nearest centroids by matmul, which costs
N*K*D per iteration: fine for K = 256, hopeless for Deep k-Means at cluster rate 0.1 on a
ResNet-18 layer (N = 786,432 rows of 3 values, K = 78,643: 185 GFLOP per iteration). In
D <= 8 dimensions a k-d tree over the centroids (scipy's ``cKDTree``) answers the same exact
nearest-centroid query in about log K steps per point.

Semantics are those of the matmul engine where they can be (scikit-learn's Lloyd): exact
assignment, means in float64, empty clusters repaired with the points farthest from their
centroid (each point taken once), stop when no label changes or when the summed squared
centroid shift is <= ``tol`` * mean per-dimension variance, labels of the final centroids.
Ties between equidistant centroids go to whichever the tree returns (deterministic for a
given input, not necessarily the lowest index).
"""

from __future__ import annotations

import numpy as np

__all__ = ["TREE_MIN_K", "TREE_MAX_D", "use_tree", "lloyd_tree"]

TREE_MIN_K = 4096  # from here on the tree beats the blocked matmul for D <= 8 (see tests)
TREE_MAX_D = 8  # k-d trees lose their edge in more dimensions


def use_tree(kmax: int, d: int, transformed: bool) -> bool:
    """True when a problem with ``kmax`` clusters of ``d``-dim points (``transformed``: Son's
    transform-invariant matching) goes to :func:`lloyd_tree`."""
    return not transformed and kmax >= TREE_MIN_K and d <= TREE_MAX_D


def _nearest(x: np.ndarray, c: np.ndarray, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,) int64, squared distances (N,) float64) of x (N, D) to centroids c (K, D)."""
    from scipy.spatial import cKDTree

    d, lab = cKDTree(c, balanced_tree=False, compact_nodes=False).query(x, k=1, workers=workers)
    return lab.astype(np.int64, copy=False), d * d


def _sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float64 sums (K, D) and counts (K,) of the points x (N, D)."""
    counts = np.bincount(labels, minlength=k)
    sums = np.stack([np.bincount(labels, weights=x[:, j], minlength=k) for j in range(x.shape[1])], 1)
    return sums, counts


def _repair_empty(x, labels, d2, sums, counts) -> None:
    """Give every empty cluster one of the points farthest from their centroid (in place).

    The point leaves its old cluster (unless that would empty it) and becomes the empty
    cluster's only member, as scikit-learn's ``_relocate_empty_clusters`` does.
    """
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0:
        return
    order = np.argsort(-d2, kind="stable")
    taken = 0
    for e in empty:
        while taken < order.size and counts[labels[order[taken]]] <= 1:
            taken += 1  # never empty another cluster
        if taken == order.size:
            return
        p = order[taken]
        taken += 1
        old = labels[p]
        sums[old] -= x[p]
        counts[old] -= 1
        sums[e] = x[p]
        counts[e] = 1


def lloyd_tree(x: np.ndarray, init: np.ndarray, iters: int, tol: float, workers: int = 1):
    """Lloyd iterations with k-d-tree assignment.

    Args:
        x: (N, D) points (float64 is used internally).
        init: (K, D) initial centroids.
        iters: maximum number of iterations (0: one assignment to ``init``).
        tol: relative shift tolerance (scikit-learn's rule, see the module docstring).
        workers: threads for the tree queries (results do not depend on it).

    Returns:
        (centroids (K, D) float64, labels (N,) int64, iterations run).
    """
    x = np.ascontiguousarray(x, dtype=np.float64)
    c = np.array(init, dtype=np.float64)
    k = c.shape[0]
    tol_abs = tol * float(x.var(0).mean()) if x.shape[0] else 0.0
    labels = None
    n_iter = 0
    for it in range(iters):
        lab, d2 = _nearest(x, c, workers)
        if labels is not None and np.array_equal(lab, labels):
            n_iter = it + 1  # converged: this assignment moved nothing (counted, as sklearn does)
            return c, lab, n_iter  # lab is already the assignment to the final centroids
        labels = lab
        sums, counts = _sums(x, labels, k)
        _repair_empty(x, labels, d2, sums, counts)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], c)
        shift = float(((new - c) ** 2).sum())
        c = new
        n_iter = it + 1
        if shift <= tol_abs:
            break
    labels, _ = _nearest(x, c, workers)
    return c, labels, n_iter
