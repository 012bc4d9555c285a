"""Tests of kcompile.kmeans: the shared k-means engine (fast, seeded)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kcompile import kmeans as km_mod
from kcompile.errors import UsageError
from kcompile.kmeans import KMeansResult, assign, d4_permutations, kmeans
from torch_threads import torch_threads


def blobs(n_per, centers, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.as_tensor(centers, dtype=torch.float32)
    x = c.repeat_interleave(n_per, 0) + sigma * torch.randn(len(c) * n_per, c.shape[1], generator=g)
    truth = torch.arange(len(c)).repeat_interleave(n_per)
    perm = torch.randperm(len(x), generator=g)
    return x[perm], truth[perm]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def check_consistent(r: KMeansResult, x: torch.Tensor, k):
    """Labels in range, no NaN, padding rows zero, inertia matches the labels."""
    x = x if x.dim() == 3 else x[None]
    assert torch.isfinite(r.centroids).all()
    B = x.shape[0]
    ks = [k] * B if isinstance(k, int) else list(k)
    for b in range(B):
        assert int(r.labels[b].max()) < ks[b] and int(r.labels[b].min()) >= 0
        assert (r.centroids[b, ks[b]:] == 0).all()
    c = r.centroids[torch.arange(B)[:, None], r.labels]
    if r.transform is not None:
        pass  # checked by the transform tests
    else:
        inertia = ((x.double() - c.double()) ** 2).sum((1, 2))
        torch.testing.assert_close(r.inertia, inertia, rtol=1e-10, atol=1e-10)


def test_result_shapes_and_types():
    x = torch.randn(100, 9, generator=torch.Generator().manual_seed(0))
    r = kmeans(x, 7)
    assert r.centroids.shape == (1, 7, 9) and r.centroids.dtype == torch.float32
    assert r.labels.shape == (1, 100) and r.labels.dtype == torch.int64
    assert r.inertia.shape == (1,) and r.inertia.dtype == torch.float64
    assert r.transform is None
    assert isinstance(r.iterations, int) and 1 <= r.iterations <= 50
    check_consistent(r, x, 7)


def test_well_separated_blobs_recovered_exactly():
    centers = 20.0 * torch.eye(9)[:6]
    x, truth = blobs(80, centers, 0.3, seed=1)
    r = kmeans(x, 6, seed=0)
    assert same_partition(r.labels[0], truth)
    for c in range(6):
        torch.testing.assert_close(r.centroids[0, c].double(), x[r.labels[0] == c].double().mean(0), atol=1e-5, rtol=0)
    check_consistent(r, x, 6)


def test_matches_plain_lloyd_from_same_init():
    """The bounds only skip work: same labels and centroids as a textbook Lloyd loop."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1500, 9, generator=g)
    init = x[torch.randperm(1500, generator=g)[:24]]
    C = init.double()
    for _ in range(15):
        lab = torch.cdist(x.double(), C).argmin(1)
        C = torch.stack([x[lab == c].double().mean(0) for c in range(24)])
    lab = torch.cdist(x.double(), C).argmin(1)
    r = kmeans(x, 24, init=init, iters=15, tol=0)
    assert r.iterations == 15
    assert torch.equal(r.labels[0], lab)
    torch.testing.assert_close(r.centroids[0].double(), C, atol=1e-5, rtol=0)


def test_batched_equals_per_problem_with_per_problem_k_and_masks():
    g = torch.Generator().manual_seed(5)
    B, N, D = 6, 64, 9
    x = torch.randn(B, N, D, generator=g) * torch.linspace(0.1, 3.0, B)[:, None, None]
    ks = [1, 2, 5, 16, 40, 64]
    nvalid = [64, 50, 64, 33, 64, 64]
    valid = torch.arange(N)[None, :] < torch.tensor(nvalid)[:, None]
    r = kmeans(x, ks, valid=valid, seed=3)
    assert r.centroids.shape == (B, 64, D)
    for b in range(B):
        n = nvalid[b]
        rb = kmeans(x[b, :n], ks[b], seed=3)
        assert torch.equal(r.labels[b, :n], rb.labels[0]), b
        assert (r.labels[b, n:] == 0).all()
        torch.testing.assert_close(r.centroids[b, : ks[b]], rb.centroids[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(r.inertia[b], rb.inertia[0], rtol=1e-6, atol=1e-9)
        assert (r.centroids[b, ks[b]:] == 0).all()
        # every problem gets k[b] non-empty clusters
        assert len(torch.unique(r.labels[b, :n])) == ks[b]
    # k == number of points: every point its own cluster
    assert r.inertia[5] == 0


def test_masked_points_change_nothing():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 9, generator=g)
    junk = 1e3 * torch.randn(40, 9, generator=g)
    xm = torch.cat([x[:150], junk, x[150:]])
    valid = torch.ones(340, dtype=torch.bool)
    valid[150:190] = False
    r = kmeans(x, 10, seed=2)
    rm = kmeans(xm, 10, seed=2, valid=valid)
    assert torch.equal(rm.labels[0, valid], r.labels[0])
    assert (rm.labels[0, ~valid] == 0).all()
    torch.testing.assert_close(rm.centroids, r.centroids, atol=1e-6, rtol=0)
    torch.testing.assert_close(rm.inertia, r.inertia, rtol=1e-6, atol=0)


def test_empty_cluster_repair_no_nan_and_distinct_clusters():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(12, 9, generator=g)
    x = base.repeat(4, 1)  # 48 points, 12 distinct values
    # a bad start: all centroids on the same few points -> empty clusters at once
    init = torch.cat([base[:3]] * 4)
    r = kmeans(x, 12, init=init, iters=50)
    assert torch.isfinite(r.centroids).all()
    assert len(torch.unique(r.labels[0])) == 12
    assert float(r.inertia[0]) == pytest.approx(0.0, abs=1e-9)
    # k close to N with distinct points
    y = torch.randn(20, 9, generator=g)
    r = kmeans(y, 19, seed=1)
    assert len(torch.unique(r.labels[0])) == 19 and torch.isfinite(r.centroids).all()
    # more clusters than distinct values: no NaN, as many distinct clusters as values
    r = kmeans(x, 15, seed=0)
    assert torch.isfinite(r.centroids).all() and len(torch.unique(r.labels[0])) == 12
    assert float(r.inertia[0]) == pytest.approx(0.0, abs=1e-9)
    # all points identical
    r = kmeans(torch.ones(10, 9), 3)
    assert torch.isfinite(r.centroids).all() and float(r.inertia[0]) == 0.0


def test_k_out_of_range_raises_usage_error():
    x = torch.randn(10, 9)
    with pytest.raises(UsageError, match=r"K=11.*10 units"):
        kmeans(x, 11)
    with pytest.raises(UsageError, match="K=0"):
        kmeans(x, 0)
    with pytest.raises(UsageError, match=r"K=4.*3 units.*problem 1"):
        valid = torch.ones(2, 10, dtype=torch.bool)
        valid[1, 3:] = False
        kmeans(torch.randn(2, 10, 9), [4, 4], valid=valid)
    with pytest.raises(UsageError):
        kmeans(torch.randn(2, 10, 9), [4, 4, 4])
    with pytest.raises(UsageError):
        kmeans(torch.full((5, 3), float("nan")), 2)
    # the message is one line
    try:
        kmeans(x, 11)
    except UsageError as e:
        assert "\n" not in str(e)


def test_deterministic_and_private_rng():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2000, 9, generator=g)
    state = torch.get_rng_state()
    r1 = kmeans(x, 24, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    r2 = kmeans(x, 24, seed=4)
    assert torch.equal(r1.centroids, r2.centroids) and torch.equal(r1.labels, r2.labels)
    assert torch.equal(r1.inertia, r2.inertia) and r1.iterations == r2.iterations
    r3 = kmeans(x, 24, seed=5)
    assert not torch.equal(r1.centroids, r3.centroids)


def test_thread_count_does_not_change_result():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(10000, 9, generator=g)
    with torch_threads(1):
        r1 = kmeans(x, 64, seed=0, iters=6)
    with torch_threads(2):
        r2 = kmeans(x, 64, seed=0, iters=6)
    assert torch.equal(r1.centroids, r2.centroids) and torch.equal(r1.labels, r2.labels)
    assert torch.equal(r1.inertia, r2.inertia)


def test_block_size_does_not_change_result(monkeypatch):
    """The chunked distance loops give the same answer as one big block."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3000, 9, generator=g)
    r1 = kmeans(x, [12, 20], seed=1, iters=5)
    monkeypatch.setattr(km_mod, "_BLOCK_ELEMS", 5000)
    monkeypatch.setattr(km_mod, "_PP_ELEMS", 5000)
    r2 = kmeans(x, [12, 20], seed=1, iters=5)
    assert torch.equal(r1.labels, r2.labels)
    torch.testing.assert_close(r1.centroids, r2.centroids, atol=1e-6, rtol=0)


def test_d4_permutations():
    v = torch.arange(9.0).view(3, 3)
    p = d4_permutations(3, 3, 8)
    assert p.shape == (8, 9) and p.dtype == torch.int64
    expect = [v, v.flip(1), v.flip(0), v.flip(0).flip(1), v.t(), v.flip(0).flip(1).t(), torch.rot90(v, 1), torch.rot90(v, 3)]
    for row, e in zip(p, expect):
        assert torch.equal(v.reshape(-1)[row], e.reshape(-1))
    # a group: closed under composition
    rows = {tuple(r.tolist()) for r in p}
    for a, b in itertools.product(p, p):
        assert tuple(a[b].tolist()) in rows
    assert torch.equal(d4_permutations(3, 3, 4), p[:4])
    assert torch.equal(d4_permutations(3, 3, 1), torch.arange(9)[None])
    r = d4_permutations(3, 5, 4)
    assert r.shape == (4, 15) and torch.equal(torch.arange(15.0)[r[1]], torch.arange(15.0).view(3, 5).flip(1).reshape(-1))
    with pytest.raises(UsageError):
        d4_permutations(3, 5, 8)
    with pytest.raises(UsageError):
        d4_permutations(3, 3, 3)


def test_transform_invariant_clustering():
    g = torch.Generator().manual_seed(11)
    perms = d4_permutations(3, 3, 8)
    bases = torch.randn(3, 9, generator=g)  # generic: no symmetry
    which = torch.arange(3).repeat_interleave(40)
    t_true = torch.randint(0, 8, (120,), generator=g)
    x = torch.stack([bases[w][perms[t]] for w, t in zip(which, t_true)])
    r = kmeans(x, 3, transforms=perms, seed=0)
    assert r.transform is not None and r.transform.shape == (1, 120)
    assert float(r.inertia[0]) < 1e-9
    assert same_partition(r.labels[0], which)
    # every point is its centroid under the returned transform
    rec = torch.stack([r.centroids[0, c][perms[t]] for c, t in zip(r.labels[0], r.transform[0])])
    torch.testing.assert_close(rec, x, atol=1e-6, rtol=0)
    # each centroid is one of the transformed bases, and the ids are the right group elements
    for c in range(3):
        members = r.labels[0] == c
        w = int(which[members][0])
        matches = [t for t in range(8) if torch.allclose(bases[w][perms[t]], r.centroids[0, c], atol=1e-6)]
        assert len(matches) == 1
        g0 = perms[matches[0]]  # centroid = base[g0]; point = centroid[p_t] = base[g0[p_t]]
        for t_found, t_gen in zip(r.transform[0, members], t_true[members]):
            assert torch.equal(g0[perms[t_found]], perms[t_gen])
    # without transforms the same data needs many more clusters
    plain = kmeans(x, 3, seed=0)
    assert float(plain.inertia[0]) > 1.0


def test_transforms_batched_and_assign():
    g = torch.Generator().manual_seed(12)
    perms = d4_permutations(3, 3, 4)
    x = torch.randn(3, 200, 9, generator=g)
    r = kmeans(x, [4, 7, 2], transforms=perms, seed=0)
    for b, k in enumerate([4, 7, 2]):
        rb = kmeans(x[b], k, transforms=perms, seed=0)
        assert torch.equal(r.labels[b], rb.labels[0]) and torch.equal(r.transform[b], rb.transform[0])
        # assignment = brute force over the k*T transformed centroids
        cand = r.centroids[b, :k][:, perms]  # (k, T, D)
        d = ((x[b][:, None, None, :] - cand[None]) ** 2).sum(-1).reshape(200, -1)
        best = d.argmin(1)
        lab, tr = assign(x[b], r.centroids[b, :k], transforms=perms)
        assert torch.equal(lab, best // 4) and torch.equal(tr, best % 4)
        assert torch.equal(lab, r.labels[b]) and torch.equal(tr, r.transform[b])
        inertia = d.min(1).values.double().sum()
        torch.testing.assert_close(r.inertia[b], inertia, rtol=1e-5, atol=0)


def test_assign_matches_brute_force():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(700, 9, generator=g)
    c = torch.randn(37, 9, generator=g)
    lab, tr = assign(x, c)
    assert tr is None and lab.shape == (700,)
    assert torch.equal(lab, torch.cdist(x.double(), c.double()).argmin(1))
    lab2, _ = assign(x[None].expand(2, -1, -1), torch.stack([c, c.flip(0)]), k=[37, 10])
    assert torch.equal(lab2[0], lab)
    assert torch.equal(lab2[1], torch.cdist(x.double(), c.flip(0)[:10].double()).argmin(1))


def test_iters_and_tol():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2000, 9, generator=g)
    r0 = kmeans(x, 8, iters=0)
    assert r0.iterations == 0
    r3 = kmeans(x, 8, iters=3, tol=0)
    assert r3.iterations == 3 and r3.inertia[0] <= r0.inertia[0]
    r = kmeans(x, 8, iters=500, tol=0)
    assert r.iterations < 500  # stops when no label changes
    for c in range(8):  # converged: centroids are the means of their members
        torch.testing.assert_close(r.centroids[0, c].double(), x[r.labels[0] == c].double().mean(0), atol=1e-5, rtol=0)


def test_inertia_close_to_sklearn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    g = torch.Generator().manual_seed(15)
    # kernel-like data: Gaussian with a few scales
    x = torch.cat([s * torch.randn(1500, 9, generator=g) for s in (0.02, 0.05, 0.1)])
    ours = float(kmeans(x, 32, seed=0).inertia[0])
    ref = [
        sklearn_cluster.KMeans(32, init="k-means++", n_init=1, max_iter=50, random_state=s, algorithm="lloyd").fit(x.numpy()).inertia_
        for s in range(2)
    ]
    assert abs(ours - np.mean(ref)) / np.mean(ref) < 0.03, (ours, ref)


# k-means++ on a sample (init_size) ------------------------------------------------------------


def test_init_size_covering_all_points_equals_all():
    x, _ = blobs(300, [[0, 0], [5, 0], [0, 5], [5, 5]], 1.0, seed=3)  # 1200 points
    full = kmeans(x, 6, iters=5, seed=1, init_size="all")
    same = kmeans(x, 6, iters=5, seed=1, init_size=1200)
    assert torch.equal(full.centroids, same.centroids) and torch.equal(full.labels, same.labels)
    # the default (max(65536, 256 k)) does not sample a problem this small
    dflt = kmeans(x, 6, iters=5, seed=1)
    assert torch.equal(full.centroids, dflt.centroids)


def test_init_size_seeds_from_valid_sample_and_is_batch_invariant():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2000, 3, generator=g)
    valid = torch.rand(2000, generator=g) < 0.5
    x_valid = {tuple(r) for r in x[valid].tolist()}
    seeds = kmeans(x, 8, iters=0, seed=2, valid=valid, init_size=100)
    assert all(tuple(c) in x_valid for c in seeds.centroids[0].tolist())  # only valid points
    assert not torch.equal(seeds.centroids, kmeans(x, 8, iters=0, seed=2, valid=valid, init_size="all").centroids)
    # inside a batch, next to a problem that is not sampled (its own result unchanged too)
    y = torch.randn(2000, 3, generator=g)
    vy = torch.arange(2000) < 90
    both = kmeans(torch.stack([y, x]), [5, 8], iters=0, seed=2, valid=torch.stack([vy, valid]), init_size=100)
    assert torch.equal(both.centroids[1], seeds.centroids[0])
    alone_y = kmeans(y[:90], 5, iters=0, seed=2)
    assert torch.equal(both.centroids[0, :5], alone_y.centroids[0])


def test_init_size_sample_keeps_quality():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40_000, 4, generator=g)
    full = kmeans(x, 16, iters=30, seed=0, init_size="all")
    sampled = kmeans(x, 16, iters=30, seed=0, init_size=16 * 256)
    assert float(sampled.inertia[0]) <= 1.01 * float(full.inertia[0])


@pytest.mark.parametrize("bad", [0, -3, "some", 2.5, True])
def test_init_size_rejects_bad_values(bad):
    with pytest.raises(UsageError, match="init_size"):
        kmeans(torch.randn(50, 2), 3, init_size=bad)
