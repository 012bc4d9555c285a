"""kcompile.kmeans_tree and the many-cluster path of kcompile.kmeans."""

import numpy as np
import pytest
import torch

import kcompile.kmeans_tree as kt
from kcompile.errors import UsageError
from kcompile.kmeans import kmeans
from torch_threads import torch_threads


def _blobs(n: int, d: int, centres: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g) * 4
    lab = torch.randint(0, centres, (n,), generator=g)
    return c[lab] + torch.randn(n, d, generator=g)


@pytest.fixture
def tree_from(monkeypatch):
    """Route problems with at least ``k`` clusters to the tree path."""

    def set_min(k: int) -> None:
        monkeypatch.setattr(kt, "TREE_MIN_K", k)

    return set_min


def test_use_tree_rules():
    assert kt.use_tree(kt.TREE_MIN_K, 3, False)
    assert not kt.use_tree(kt.TREE_MIN_K - 1, 3, False)
    assert not kt.use_tree(kt.TREE_MIN_K, kt.TREE_MAX_D + 1, False)
    assert not kt.use_tree(kt.TREE_MIN_K, 3, True)  # transforms stay on the matmul engine


def test_tree_lloyd_matches_matmul_engine_from_same_init(tree_from):
    x = _blobs(3000, 3, 40)
    init = x[torch.randperm(3000, generator=torch.Generator().manual_seed(1))[:60]]
    ref = kmeans(x, 60, iters=30, tol=0.0, init=init)
    tree_from(1)
    got = kmeans(x, 60, iters=30, tol=0.0, init=init)
    assert got.iterations == ref.iterations
    assert torch.equal(got.labels, ref.labels)
    torch.testing.assert_close(got.centroids, ref.centroids, rtol=1e-5, atol=1e-5)
    assert float(got.inertia[0]) == pytest.approx(float(ref.inertia[0]), rel=1e-6)


def test_labels_are_nearest_final_centroid(tree_from):
    tree_from(1)
    x = _blobs(2000, 4, 25, seed=3)
    r = kmeans(x, 200, iters=10, seed=0)
    d = torch.cdist(x.double(), r.centroids[0].double())
    best = d.min(1).values
    mine = d.gather(1, r.labels[0][:, None]).squeeze(1)
    assert torch.all(mine <= best + 1e-6)


def test_two_level_init_close_to_kmeanspp(tree_from):
    x = _blobs(20000, 3, 300, seed=2)
    ref = kmeans(x, 600, iters=50, seed=0)  # matmul engine, greedy k-means++ over all points
    tree_from(500)
    got = kmeans(x, 600, iters=50, seed=0)  # tree: two-level k-means++ init
    rel = float(got.inertia[0]) / float(ref.inertia[0])
    assert rel < 1.05, rel
    # and clearly better than K random points followed by the same Lloyd iterations
    pick = torch.randperm(20000, generator=torch.Generator().manual_seed(0))[:600]
    rand = kmeans(x, 600, iters=50, seed=0, init=x[pick])
    assert float(got.inertia[0]) < float(rand.inertia[0])


def test_deterministic_and_thread_independent(tree_from):
    tree_from(100)
    x = _blobs(5000, 3, 50, seed=4)
    with torch_threads(1):
        a = kmeans(x, 300, iters=20, seed=7)
    with torch_threads(2):
        b = kmeans(x, 300, iters=20, seed=7)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.centroids, b.centroids)


def test_empty_clusters_repaired_with_duplicate_init(tree_from):
    tree_from(1)
    x = _blobs(1000, 3, 10, seed=5)
    init = x[:20].clone()
    init[10:] = init[:10]  # ten duplicated centroids: half the clusters start empty
    r = kmeans(x, 20, iters=15, init=init)
    counts = torch.bincount(r.labels[0], minlength=20)
    assert int((counts == 0).sum()) == 0
    assert torch.unique(r.centroids[0], dim=0).shape[0] == 20
    assert bool(torch.isfinite(r.centroids).all())


def test_batched_problems_and_valid_mask(tree_from):
    tree_from(30)
    x = torch.stack([_blobs(800, 3, 8, seed=s) for s in range(3)])
    valid = torch.ones(3, 800, dtype=torch.bool)
    valid[1, 600:] = False
    r = kmeans(x, [40, 30, 50], iters=10, seed=0, valid=valid)
    assert r.centroids.shape == (3, 50, 3)
    assert int(r.labels[0].max()) < 40 and int(r.labels[1].max()) < 30
    assert torch.all(r.labels[1, 600:] == 0)
    assert torch.all(r.centroids[0, 40:] == 0)
    single = kmeans(x[2], 50, iters=10, seed=0)
    assert torch.equal(single.labels[0], r.labels[2])


def test_k_larger_than_units_still_refused(tree_from):
    tree_from(1)
    with pytest.raises(UsageError, match="cannot make K=11 clusters from 10 units"):
        kmeans(torch.randn(10, 3), 11)


def test_lloyd_tree_zero_iterations_is_one_assignment():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    c, lab, it = kt.lloyd_tree(x, np.array([[0.0, 0.0], [9.0, 0.0]]), iters=0, tol=0.0)
    assert it == 0
    assert lab.tolist() == [0, 0, 1]
    assert np.array_equal(c, [[0.0, 0.0], [9.0, 0.0]])
