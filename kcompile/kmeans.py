"""One k-means engine for every clustering method of kcompile (Son, KSE, Deep k-Means, filters).

Everything is torch (CPU, or the device of ``x``); B independent problems are solved at once
with batched tensor ops (KSE clusters each input channel of a layer on its own: B = C
problems of N = O points of D = kh*kw values, each with its own k).

Algorithm
---------
* Initialisation: greedy k-means++ as in scikit-learn (``n_local_trials = 2 + floor(ln k)``
  candidates per step, the one that lowers the potential most is kept). Candidates are drawn
  with probability proportional to the squared distance to the nearest chosen centre (two
  levels: a block of points, then a point in the block). Randomness comes from private
  ``torch.Generator`` objects derived from ``seed`` (the global RNG is never touched); step c
  of every problem draws from a generator seeded with (seed, c), so a problem gets the same
  centroids whether it is solved alone or inside a batch.
* Large problems are seeded on a sample: k-means++ sees ``init_size`` points drawn uniformly
  (seeded) from the valid points, by default max(65,536, 256 k); problems with fewer valid
  points use all of them (the idea of scikit-learn MiniBatchKMeans' ``init_size``; the size
  rule is kcompile's). k-means++ is k sequential passes over the points it sees; on
  ResNet-18's 1.2 M kernels with k = 256 the sample cuts seeding from ~1.8 s to ~0.3 s while
  the inertia after Lloyd stays within 0.02 % (benchmarks/results/kmeans_vs_sklearn.md).
  ``init_size="all"`` seeds on every point.
* Lloyd iterations (scikit-learn's "lloyd"): assign every point to its nearest centroid,
  then move every centroid to the mean of its points. Computed exactly, but Hamerly's
  bounds (one upper and one lower bound per point) skip the points whose centroid provably
  did not change; the others are checked in blocks with one matmul and one vectorised
  minimum (a point keeps its centroid unless another one is strictly nearer: ties keep it),
  and the few that moved get a full nearest search. Cluster sums are float64 and updated
  with the points that moved only.
* Stop per problem when no label changes, or when the squared centroid shift summed over
  the clusters is <= ``tol * mean per-dimension variance`` (scikit-learn's rule), or after
  ``iters`` iterations. The labels returned are those of the final centroids.
* Empty clusters are repaired at every iteration as scikit-learn does: the empty centroid
  takes the point that is farthest from its centroid (farthest-first, so that duplicated
  points are not taken twice; ties go to the lower index); a centroid never becomes NaN.
* Distances: ``||x||^2 - 2 x.c + ||c||^2`` in float32 by matmul, on data centred per
  problem (as scikit-learn does), in blocks of at most ``_BLOCK_ELEMS`` = 1 Mi distances
  (4 MB), so N = 1.3 M points and K = 256 never allocate more than that for distances (the
  data itself, centred and augmented, takes about 100 MB). Centroids are float64 means of
  the original points; the final inertia is computed in float64 from exact differences.
* Many clusters in few dimensions (K >= 4096, D <= 8, no transforms: Deep k-Means at low
  cluster rates) go to :mod:`kcompile.kmeans_tree`: the same Lloyd iterations with a k-d
  tree for the exact assignment, seeded from K distinct random points (k-means++ would need
  K sequential passes over the data).
* Transform-invariant clustering (Son et al.): with ``transforms`` (T permutations of the D
  dims) each point is matched to the nearest of the k*T transformed centroids and centroids
  are means of inverse-transformed members.

Determinism: the same input and seed give bit-identical results. The result does not depend
on torch's thread count either (tests/test_kmeans.py checks 1 vs 2 threads): the reductions
used are minima (exact), or sums with many outputs (each output summed by one thread in a
fixed order), or small enough to run serially; the matmuls have an inner dimension of D + 2
and MKL does not split it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UsageError
from .kmeans_tree import lloyd_tree, use_tree

__all__ = ["KMeansResult", "kmeans", "assign", "d4_permutations"]

_BIG = 1e30  # squared distance of padding centroids: never the nearest, finite (no inf - inf)
_BLOCK_ELEMS = 1 << 20  # distances computed per block in the assignment (4 MB of float32)
_PP_ELEMS = 1 << 20  # distances per block in k-means++ (4 MB)
_SLACK = 1.0 + 2.0**-14  # bounds are trusted only with this relative margin (float32 rounding)
_SEED_MIX = 0x9E3779B97F4A7C15  # to derive per-step generator seeds from (seed, step)
_SAMPLE_STEP = -1  # generator step of the k-means++ sample (k-means++ steps are 0 .. k-1)
_SAMPLE_MIN = 1 << 16  # default init_size: at least this many points ...
_SAMPLE_PER_CLUSTER = 256  # ... and at least this many per cluster


@dataclass(frozen=True)
class KMeansResult:
    """Result of :func:`kmeans` for B problems (B = 1 for a 2-D ``x``).

    Attributes:
        centroids: (B, Kmax, D) float32, Kmax = max(k); rows >= k[b] are zero padding.
        labels: (B, N) int64 in [0, k[b]); points outside ``valid`` get 0.
        transform: (B, N) int64 index into the ``transforms`` list (the point is
            ``centroids[b, labels[b, n]][transforms[transform[b, n]]]`` plus noise), or
            None when no transforms were given.
        inertia: (B,) float64, final sum of squared distances of the valid points to their
            (transformed) centroid.
        iterations: number of Lloyd iterations run (the maximum over the problems).
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    transform: torch.Tensor | None
    inertia: torch.Tensor
    iterations: int


# ----------------------------------------------------------------------------------------
# D4 transforms
# ----------------------------------------------------------------------------------------


def d4_permutations(kh: int, kw: int, size: int) -> torch.Tensor:
    """Permutations of the kh*kw flattened kernel positions for Son's transform-invariant
    clustering: a (size, kh*kw) int64 tensor; row p maps a flattened kernel v (row-major)
    to its transformed version ``v[p]``.

    Order of the rows (a prefix of the list is taken):
      0 identity, 1 horizontal flip (left-right mirror), 2 vertical flip (up-down mirror),
      3 rotation by 180, 4 transpose, 5 anti-transpose, 6 rotation by 90 counter-clockwise
      (``torch.rot90(k, 1)``), 7 rotation by 270 (``torch.rot90(k, 3)``, 90 clockwise).
    Sizes 1, 2, 4 and 8 (8 only for square kernels) are subgroups of D4.
    """
    if size not in (1, 2, 4, 8):
        raise UsageError(f"transforms must be 1, 2, 4 or 8, got {size}")
    if kh < 1 or kw < 1:
        raise UsageError(f"bad kernel size {kh}x{kw}")
    if size == 8 and kh != kw:
        raise UsageError(f"8 transforms need a square kernel, got {kh}x{kw} (use 1, 2 or 4)")
    g = torch.arange(kh * kw, dtype=torch.int64).view(kh, kw)
    ops = [
        g,
        g.flip(1),
        g.flip(0),
        g.flip(0).flip(1),
    ]
    if size == 8:
        ops += [g.t(), g.flip(0).flip(1).t(), torch.rot90(g, 1), torch.rot90(g, 3)]
    return torch.stack([o.reshape(-1) for o in ops[:size]]).contiguous()


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------


def _dsum(t: torch.Tensor) -> torch.Tensor:
    """Float64 sum over the last dim, in fixed-size blocks so that the result does not depend
    on the number of threads (each block is summed by one thread, the block sums serially)."""
    n = t.shape[-1]
    bs = 1024
    if n <= bs:
        return t.sum(-1, dtype=torch.float64)
    nb = -(-n // bs)
    if nb * bs != n:
        t = torch.nn.functional.pad(t, (0, nb * bs - n))
    return t.reshape(*t.shape[:-1], nb, bs).sum(-1, dtype=torch.float64).sum(-1)


def _dsum_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, D) float64 sums over N, thread-count independent like :func:`_dsum`
    (blocks of 1024 rows, each block summed by one thread in float32, then the block sums in
    float64 and the remainder in a fixed order); reads ``t`` in place (no transposed copy).
    Float32 block sums: torch's float64-accumulating reduction over a strided dim is ~20x
    slower, and a block sum's rounding (~1e-7 relative) is far below what the centring needs."""
    b, n, d = t.shape
    bs = 1024
    nb = n // bs
    s = t[:, : nb * bs].reshape(b, nb, bs, d).sum(2).to(torch.float64).sum(1)
    if nb * bs < n:
        s = s + t[:, nb * bs :].sum(1, dtype=torch.float64)
    return s


def _step_generator(seed: int, step: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * _SEED_MIX + step * 0x632BE59BD9B4E019 + 0x1234567) % (1 << 63))
    return g


def _pq(kc: int) -> tuple[int, int]:
    """Lay kc candidates out as P rows of Q (P*Q >= kc, P <= 16) for :func:`_nearest`."""
    p = max(1, min(16, math.ceil(math.sqrt(kc))))
    return p, -(-kc // p)


def _augment_centroids(c: torch.Tensor, real: torch.Tensor | None, kc_pad: int) -> torch.Tensor:
    """(B, Kc, D) -> (B, kc_pad, D + 2) rows [-2c, ||c||^2, 1] so that a matmul with
    augmented points gives squared distances; rows that are not ``real`` (or beyond Kc) give
    a distance of _BIG."""
    b, kc, d = c.shape
    out = torch.zeros(b, kc_pad, d + 2, dtype=torch.float32, device=c.device)
    out[:, :, d] = _BIG
    cc = torch.cat([-2.0 * c, (c * c).sum(-1, keepdim=True), torch.ones_like(c[..., :1])], -1)
    if real is not None:
        cc = torch.where(real[..., None], cc, out[:, :kc])
    out[:, :kc] = cc
    return out


def _argmin_small(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Index of the minimum of non-negative float32 ``t`` along a short ``dim``, with the
    index packed into the low mantissa bits and one integer min (much faster than
    ``torch.min(dim)``). Values closer than 2**(bits-23) relative may be mis-ordered: callers
    check the value they get."""
    n = t.shape[dim]
    if n == 1:
        return torch.zeros(t.shape[:dim] + t.shape[dim + 1 :], dtype=torch.int64, device=t.device)
    bits = (n - 1).bit_length()
    shape = [1] * t.dim()
    shape[dim] = n
    ar = torch.arange(n, dtype=torch.int32, device=t.device).view(shape)
    key = t.view(torch.int32).bitwise_and(~((1 << bits) - 1)).bitwise_or_(ar)
    return key.amin(dim).bitwise_and_((1 << bits) - 1).to(torch.int64)


def _nearest(dt: torch.Tensor, p: int, q: int):
    """Nearest and second nearest of (B, P*Q, M) squared distances over dim 1.

    ``torch.min(dim)`` is slow on CPU, so: two vectorised passes (minimum over the rows,
    minimum over the columns), the argmin of each small result by packed keys, and a check
    that the element found holds the minimum (an exact argmin where it does not; among exact
    ties one is chosen deterministically). The second nearest is the minimum over the other rows and the
    other columns. Returns (index, d1, d2).
    """
    b, _, m = dt.shape
    d4 = dt.view(b, p, q, m)
    g = d4.amin(1).clamp_(min=0)  # (B, Q, M)
    h = d4.amin(2).clamp_(min=0)  # (B, P, M)
    d1 = h.amin(1)
    pi = _argmin_small(h, 1)
    qi = _argmin_small(g, 1)
    idx = pi * q + qi
    v = dt.gather(1, idx.unsqueeze(1)).squeeze(1).clamp_(min=0)
    bad = v != d1
    if bool(bad.any()):  # near-ties mis-ordered by the packed keys, or exact ties
        bb, mm = bad.nonzero(as_tuple=True)
        i0 = dt[bb, :, mm].clamp(min=0).argmin(1)
        idx[bb, mm] = i0
        pi[bb, mm] = i0 // q
        qi[bb, mm] = i0 % q
    g.scatter_(1, qi.unsqueeze(1), _BIG)
    h.scatter_(1, pi.unsqueeze(1), _BIG)
    return idx, d1, torch.minimum(g.amin(1), h.amin(1))


def _known(d: torch.Tensor, old: torch.Tensor, out_v=None, out_d=None):
    """Row layout (B, M, Kc) squared distances of points whose candidate ``old`` (B, M) is
    known: the squared distance v to it and the nearest squared distance to the other
    candidates (one vectorised pass; ``d`` is overwritten). v <= that: ``old`` is still the
    nearest (ties keep it). With ``out_v`` / ``out_d`` ((B, M) contiguous), written there."""
    b, m, kc = d.shape
    flat = (torch.arange(0, b * m * kc, kc, device=d.device).view(b, m) + old).view(-1)
    d1 = d.view(-1)
    if out_v is None:
        v = d1.index_select(0, flat).view(b, m)  # (faster than gather / scatter_ here)
    else:
        v = torch.index_select(d1, 0, flat, out=out_v.view(-1)).view(b, m)
    d1.index_fill_(0, flat, _BIG)
    return v, torch.amin(d, 2, out=out_d) if out_d is not None else d.amin(2)


def _orbit_mean(m: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Average m (B, D) over the orbits of the dims under the permutations, giving a vector
    that every permutation leaves unchanged (so centring commutes with the transforms)."""
    d = m.shape[1]
    parent = list(range(d))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for row in perms.cpu().tolist():
        for i, j in enumerate(row):
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[ri] = rj
    root = torch.tensor([find(i) for i in range(d)], device=m.device)
    sums = torch.zeros_like(m).index_add_(1, root, m)
    cnt = torch.bincount(root, minlength=d).to(m.dtype)
    return (sums / cnt.clamp(min=1))[:, root]


# ----------------------------------------------------------------------------------------
# argument checking
# ----------------------------------------------------------------------------------------


def _as_points(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3:
        raise UsageError(f"x must be (N, D) or (B, N, D), got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)):
        raise UsageError(f"x must be a real tensor, got {x.dtype}")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise UsageError(f"x has no points or no dimensions (shape {tuple(x.shape)})")
    return x.to(torch.float32).contiguous()


def _as_perms(transforms, d: int, device) -> torch.Tensor | None:
    if transforms is None:
        return None
    p = torch.as_tensor(transforms)
    if p.dim() != 2 or p.shape[1] != d or p.shape[0] < 1:
        raise UsageError(f"transforms must be (T, {d}) permutations, got shape {tuple(p.shape)}")
    if p.is_floating_point():
        raise UsageError("transforms must be an integer tensor of permutations")
    p = p.to(torch.int64)
    ref = torch.arange(d, dtype=torch.int64)
    if not bool((p.cpu().sort(1).values == ref).all()):
        raise UsageError("every row of transforms must be a permutation of range(D)")
    return p.to(device)


def _as_k(k, b: int, nvalid: torch.Tensor) -> torch.Tensor:
    if isinstance(k, bool):
        raise UsageError(f"k must be an int or a sequence of ints, got {k!r}")
    if isinstance(k, int):
        kk = torch.full((b,), k, dtype=torch.int64)
    else:
        kt = torch.as_tensor(k)
        if kt.is_floating_point() or kt.dtype == torch.bool:
            raise UsageError(f"k must be integers, got {kt.dtype}")
        kk = kt.to(torch.int64).reshape(-1).cpu()
        if kk.numel() == 1 and b > 1 and kt.dim() == 0:
            kk = kk.expand(b).clone()
        if kk.numel() != b:
            raise UsageError(f"k has {kk.numel()} entries for {b} problems")
    nv = nvalid.cpu()
    bad = ((kk < 1) | (kk > nv)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        where = f" in problem {i}" if b > 1 else ""
        raise UsageError(f"cannot make K={int(kk[i])} clusters from {int(nv[i])} units{where} (need 1 <= K <= units)")
    return kk


# ----------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------


class _Problem:
    """Centred data and the candidate-centroid machinery shared by init and Lloyd."""

    def __init__(self, x: torch.Tensor, valid: torch.Tensor, kk: torch.Tensor, perms):
        self.dev = x.device
        b, n, d = x.shape
        self.B, self.N, self.D = b, n, d
        self.valid = valid
        self.k = kk.to(self.dev)
        self.kmax = int(kk.max())
        self.perms = perms
        self.T = 1 if perms is None else perms.shape[0]
        self.inv = None if perms is None else perms.argsort(1)  # inverse permutations
        all_valid = bool(valid.all())
        vf = None if all_valid else valid.to(torch.float32)[..., None]
        self.nvalid = valid.sum(1)
        nv = self.nvalid.to(torch.float64)
        true_mean = _dsum_rows(x if all_valid else x * vf) / nv[:, None]  # (B, D) float64
        mean = true_mean if perms is None else _orbit_mean(true_mean, perms)  # transform-invariant
        self.mean64 = mean
        self.mean32 = mean.to(torch.float32)
        self.x = x
        # points as rows [xc, 1, ||xc||^2] (a matmul with _augment_centroids' rows gives squared
        # distances), xc centred and written in place: a fresh 50 MB temporary costs ~25 ms of
        # page faults here
        self.xa = torch.empty(b, n, d + 2, dtype=torch.float32, device=x.device)  # (B, N, D + 2)
        self.xc = self.xa[..., :d]  # (B, N, D) view, invalid points -> 0
        torch.sub(x, self.mean32[:, None, :], out=self.xc)
        if not all_valid:
            self.xc.mul_(vf)
        self.xa[..., d] = 1.0
        sq = self.xc * self.xc
        torch.sum(sq, -1, out=self.xa[..., d + 1])
        var = _dsum_rows(sq) / nv[:, None] - (true_mean - mean) ** 2
        del sq
        self.tol_scale = var.mean(1)  # (B,) mean per-dim variance
        self.kc = self.kmax * self.T
        self.P, self.Q = _pq(self.kc)
        self.kc_pad = self.P * self.Q
        real = torch.arange(self.kmax, device=self.dev)[None, :] < self.k[:, None]  # (B, Kmax)
        self.real = real
        self.real_c = real.repeat(1, self.T)  # (B, Kc): candidate j = t*Kmax + c

    # candidates ---------------------------------------------------------------------------
    def candidates(self, c: torch.Tensor) -> torch.Tensor:
        """(B, K, D) centroids -> (B, T*K, D) transformed centroids, j = t*K + c."""
        if self.perms is None:
            return c
        b, k, d = c.shape
        ct = c[:, :, self.perms]  # (B, K, T, D): c[..., p_t]
        return ct.transpose(1, 2).reshape(b, self.T * k, d)

    def inverse_transformed(self, bi, ni, t) -> torch.Tensor:
        """Points (bi, ni) (original coordinates) mapped back to the centroid frame: x[q_t],
        as float64."""
        x = self.x.view(self.B * self.N, self.D).index_select(0, ni if self.B == 1 else bi * self.N + ni)
        if self.perms is not None:
            x = x.gather(1, self.inv[t])
        return x.to(torch.float64)

    # nearest candidates of a subset of points ----------------------------------------------
    def search(self, cand_aug: torch.Tensor, bi: torch.Tensor, ni: torch.Tensor, old=None):
        """Nearest candidates of the points (bi, ni) (sorted by problem): (index, d1, d2),
        their nearest candidate and the squared distances (float32) to the nearest and the
        second nearest. With ``old`` (their current candidates): (v, d), the squared
        distances to the current candidate and to the nearest other one."""
        m = bi.numel()
        dev = self.dev
        if m == 0:
            e = torch.empty(0, dtype=torch.float32, device=dev)
            return (bi.clone(), e, e.clone()) if old is None else (e, e.clone())
        # lay the points out per problem: (problems with points, most points per problem)
        if self.B == 1:
            probs = torch.zeros(1, dtype=torch.int64, device=dev)
            bp, mmax = 1, m
            pad = ni.view(1, m)
            pad_o = None if old is None else old.view(1, m)
        else:
            counts = torch.bincount(bi, minlength=self.B)
            has = counts > 0
            probs = has.nonzero().squeeze(1)
            bp = probs.numel()
            row = (torch.cumsum(has.to(torch.int64), 0) - 1)[bi]
            pos = torch.arange(m, device=dev) - (torch.cumsum(counts, 0) - counts)[bi]
            mmax = int(counts.max())
            pad = torch.zeros(bp, mmax, dtype=torch.int64, device=dev)
            pad[row, pos] = ni
            pad_o = None
            if old is not None:
                pad_o = torch.zeros(bp, mmax, dtype=torch.int64, device=dev)
                pad_o[row, pos] = old
        out_i = torch.empty(bp, mmax, dtype=torch.int64, device=dev) if old is None else None
        out_v = torch.empty(bp, mmax, dtype=torch.float32, device=dev)
        out_d = torch.empty_like(out_v)
        kc = self.kc_pad
        if kc * mmax <= _BLOCK_ELEMS:
            bstep, mstep = max(1, _BLOCK_ELEMS // (kc * mmax)), mmax
        else:
            bstep, mstep = 1, max(1, _BLOCK_ELEMS // kc)
        xa_flat = self.xa.view(self.B * self.N, self.D + 2)
        if self.B == 1:
            xbuf = torch.empty(min(mstep, mmax), self.D + 2, dtype=torch.float32, device=dev)
        if old is not None and self.B == 1:
            dbuf = torch.empty(1, min(mstep, mmax), kc, dtype=torch.float32, device=dev)
        for b0 in range(0, bp, bstep):
            b1 = min(bp, b0 + bstep)
            pb = probs[b0:b1]
            ca = cand_aug if b1 - b0 == self.B else cand_aug.index_select(0, pb)
            if old is not None:
                cat = ca.transpose(1, 2).contiguous()
            for m0 in range(0, mmax, mstep):
                m1 = min(mmax, m0 + mstep)
                ids = pad[b0:b1, m0:m1]
                if self.B == 1:
                    xs = torch.index_select(xa_flat, 0, ids.reshape(-1), out=xbuf[: ids.numel()])
                else:
                    xs = xa_flat.index_select(0, (pb[:, None] * self.N + ids).view(-1))
                xs = xs.view(b1 - b0, m1 - m0, self.D + 2)
                if old is None:
                    dt = torch.bmm(ca, xs.transpose(1, 2))  # (b, Kc_pad, m)
                    i, v, dn = _nearest(dt, self.P, self.Q)
                    out_i[b0:b1, m0:m1] = i
                    out_v[b0:b1, m0:m1] = v
                    out_d[b0:b1, m0:m1] = dn
                elif self.B == 1:  # results straight into the outputs (contiguous slices)
                    d = torch.bmm(xs, cat, out=dbuf[:, : m1 - m0])
                    _known(d, pad_o[:, m0:m1], out_v[:, m0:m1], out_d[:, m0:m1])
                else:
                    v, dn = _known(torch.bmm(xs, cat), pad_o[b0:b1, m0:m1])
                    out_v[b0:b1, m0:m1] = v
                    out_d[b0:b1, m0:m1] = dn
        outs = (out_v, out_d) if old is not None else (out_i, out_v, out_d)
        return tuple(o[0] for o in outs) if self.B == 1 else tuple(o[row, pos] for o in outs)

    # k-means++ ------------------------------------------------------------------------------
    def kmeanspp(self, seed: int, n_local_trials: int | None) -> torch.Tensor:
        """Greedy k-means++ (scikit-learn's variant): (B, Kmax) indices of the chosen points
        (rows >= k[b] are 0).

        Each step draws L candidates with probability proportional to the squared distance to
        the nearest chosen centre (two levels: blocks of points, then a point in the block)
        and keeps the one that lowers the potential most. The nearest-centre distances are
        updated with a step's winner during the next step's pass over the points, so every
        step reads the points once.
        """
        B, N, D, dev, T = self.B, self.N, self.D, self.dev, self.T
        kk = self.k
        if n_local_trials is None:
            lb = 2 + torch.floor(torch.log(kk.to(torch.float64))).to(torch.int64)
        else:
            if int(n_local_trials) < 1:
                raise UsageError(f"n_local_trials must be >= 1, got {n_local_trials}")
            lb = torch.full((B,), int(n_local_trials), dtype=torch.int64, device=dev)
        L = int(lb.max())
        trial_ok = torch.arange(L, device=dev)[None, :] < lb[:, None]  # (B, L)
        blk = N if N <= 4096 else 4096
        nblk = -(-N // blk)
        npad = nblk * blk
        bidx = torch.arange(B, device=dev)
        valid = self.valid
        first_valid = valid.to(torch.int64).argmax(1)
        # points as (B, D + 2, npad) columns; padding columns are 0 -> distance 0
        xat = torch.zeros(B, D + 2, npad, dtype=torch.float32, device=dev)
        xat[:, :, :N] = self.xa.transpose(1, 2)

        # first centre: uniform among the valid points
        u0 = torch.rand(1, generator=_step_generator(seed, 0), dtype=torch.float64).to(dev)
        r = torch.floor(u0 * self.nvalid.to(torch.float64)).to(torch.int64)
        r = torch.minimum(r, self.nvalid - 1)
        cv = torch.cumsum(valid.to(torch.int64), 1)
        first = torch.searchsorted(cv, (r + 1)[:, None]).squeeze(1)
        chosen = torch.zeros(B, self.kmax, dtype=torch.int64, device=dev)
        chosen[:, 0] = first
        c0 = self.xc[bidx, first]  # (B, D)
        ca0 = _augment_centroids(self.candidates(c0[:, None, :]), None, T)
        closest = torch.bmm(ca0, xat).amin(1).clamp_(min=0)  # (B, npad)
        closest[:, :N] *= valid
        bsum = closest.view(B, nblk, blk).sum(-1).to(torch.float64)  # (B, nblk)
        pot = bsum.sum(-1)
        pend = None  # centre chosen at the previous step, not yet folded into `closest`

        for c in range(1, self.kmax):
            act = kk > c
            if not bool(act.any()):
                break
            if pend is not None and nblk <= 8:
                # small problems: fold the pending centre in at once (cheaper than per block)
                dp = torch.bmm(pend, xat).amin(1)
                torch.minimum(closest, dp, out=closest)
                pend = None
            rnd = torch.rand(L, generator=_step_generator(seed, c), dtype=torch.float64).to(dev)
            rv = rnd[None, :] * pot[:, None]  # (B, L)
            cb = torch.cumsum(bsum, -1)
            bid = torch.searchsorted(cb, rv).clamp_(max=nblk - 1)
            rr = rv - (cb.gather(1, bid) - bsum.gather(1, bid))
            # (whole blocks by advanced indexing: a gather with an expanded index is ~10x slower)
            vals = closest.view(B, nblk, blk)[bidx[:, None], bid]  # (B, L, blk)
            if pend is not None:  # bring those blocks up to date with the pending centre
                xs = xat.view(B, D + 2, nblk, blk)[bidx[:, None], :, bid]  # (B, L, D + 2, blk)
                dp = torch.matmul(pend[:, None], xs).amin(2).clamp_(min=0)  # (B, L, blk)
                vals = torch.minimum(vals, dp)
            cw = torch.cumsum(vals.clamp(min=0), -1, dtype=torch.float64)
            off = torch.searchsorted(cw, rr[..., None]).squeeze(-1).clamp_(max=blk - 1)
            cand = bid * blk + off
            ok = (cand < N) & valid.gather(1, cand.clamp(max=N - 1))
            cand = torch.where(ok, cand, first_valid[:, None])
            cx = self.xc.gather(1, cand[..., None].expand(B, L, D))  # (B, L, D)
            rows = cx if pend is None else torch.cat([pend_x[:, None, :], cx], 1)
            R = rows.shape[1]
            ca = _augment_centroids(self.candidates(rows), None, R * T)  # j = t*R + r
            parts = []
            pstep = max(blk, (_PP_ELEMS // (B * R * T)) // blk * blk)
            for s in range(0, npad, pstep):
                e = min(npad, s + pstep)
                d = torch.bmm(ca, xat[:, :, s:e])  # (B, R*T, e - s)
                if T > 1:
                    d = d.view(B, T, R, e - s).amin(1)
                cl = closest[:, s:e]
                if pend is not None:  # (may leave float32 round-off below 0: clamped when sampling)
                    torch.minimum(cl, d[:, 0], out=cl)
                    d = d[:, 1:]
                torch.minimum(d, cl[:, None, :], out=d)
                parts.append(d.view(B, L, (e - s) // blk, blk).sum(-1))  # float32 per block
            part = torch.cat(parts, -1)  # (B, L, nblk)
            ppot = part.to(torch.float64).sum(-1)
            ppot = torch.where(trial_ok, ppot, torch.inf)
            best = ppot.argmin(1)  # first minimum, like numpy
            bsum = part[bidx, best].to(torch.float64).clamp_(min=0)
            pot = bsum.sum(-1)
            pend_x = cx[bidx, best]  # (B, D)
            pend = _augment_centroids(self.candidates(pend_x[:, None, :]), None, T)
            chosen[:, c] = torch.where(act, cand[bidx, best], 0)
        return chosen


def kmeans(
    x,
    k,
    *,
    iters: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    n_local_trials: int | None = None,
    transforms=None,
    valid=None,
    init=None,
    init_size: int | str = "auto",
) -> KMeansResult:
    """Cluster B problems at once with k-means (k-means++ init, Lloyd iterations).

    Args:
        x: (N, D) or (B, N, D) float tensor; a 2-D x is one problem (B = 1).
        k: int, or a sequence / tensor of B ints: clusters per problem,
            1 <= k[b] <= number of valid points of problem b (else UsageError).
        iters: maximum number of Lloyd iterations (0: k-means++ and one assignment).
        tol: stop a problem when the summed squared centroid shift is
            <= tol * mean over dims of the variance of its points (scikit-learn's rule).
        seed: seed of the private generators (global RNG untouched).
        n_local_trials: k-means++ candidates per step; default 2 + floor(ln k[b]).
        transforms: optional (T, D) int64 permutations (see :func:`d4_permutations`);
            permutation p turns a vector v into v[p]. Points are matched to the nearest of
            the k*T transformed centroids; centroids are means of inverse-transformed members.
        valid: optional (B, N) (or (N,)) bool mask of the points taking part; the others get
            label 0 and transform 0 and change nothing.
        init: optional (B, Kmax, D) (or (Kmax, D)) initial centroids instead of k-means++
            (rows >= k[b] ignored).
        init_size: points k-means++ looks at per problem, a seeded uniform sample of its
            valid points: "auto" (max(65536, 256 * k[b])), an int >= 1, or "all". Problems
            with at most that many valid points are seeded on all of them.

    Returns:
        KMeansResult (centroids (B, Kmax, D) float32, labels (B, N) int64, transform (B, N)
        int64 or None, inertia (B,) float64, iterations).
    """
    X = _as_points(x)
    B, N, D = X.shape
    dev = X.device
    if valid is None:
        V = torch.ones(B, N, dtype=torch.bool, device=dev)
    else:
        V = torch.as_tensor(valid, device=dev)
        if V.dim() == 1:
            V = V.unsqueeze(0)
        if V.shape != (B, N):
            raise UsageError(f"valid must be ({B}, {N}), got shape {tuple(V.shape)}")
        V = V.to(torch.bool)
    iters = int(iters)
    if iters < 0:
        raise UsageError(f"iters must be >= 0, got {iters}")
    if not (tol >= 0):
        raise UsageError(f"tol must be >= 0, got {tol}")
    if X.numel():
        lo, hi = torch.aminmax(X if bool(V.all()) else torch.where(V[..., None], X, 0.0))  # NaN propagates
    else:
        lo = hi = torch.zeros(())
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise UsageError("x contains NaN or infinite values")
    kk = _as_k(k, B, V.sum(1))
    perms = _as_perms(transforms, D, dev)
    c0 = _init_centroids(init, B, int(kk.max()), D, dev)
    sizes = _init_sizes(init_size, kk)
    if use_tree(int(kk.max()), D, perms is not None):
        return _kmeans_many(X, V, kk, iters, float(tol), seed, c0)
    return _kmeans_matmul(X, V, kk, perms, iters, float(tol), seed, n_local_trials, c0, sizes)


def _init_sizes(init_size, kk: torch.Tensor) -> torch.Tensor | None:
    """(B,) int64 k-means++ sample size per problem from ``init_size`` (None: all points)."""
    if isinstance(init_size, str):
        if init_size == "all":
            return None
        if init_size == "auto":
            return torch.clamp(kk * _SAMPLE_PER_CLUSTER, min=_SAMPLE_MIN)
    elif isinstance(init_size, int) and not isinstance(init_size, bool) and init_size >= 1:
        return torch.maximum(torch.full_like(kk, init_size), kk)
    raise UsageError(f'init_size must be "auto", "all" or an int >= 1, got {init_size!r}')


def _init_sample(V: torch.Tensor, sizes: torch.Tensor | None, seed: int):
    """Points k-means++ sees: None (all of them), or (rows, valid), (B, S) int64 positions
    in x and their (B, S) bool mask. A problem with more than sizes[b] valid points gets
    sizes[b] of them drawn uniformly without replacement by a generator of (seed, -1)
    (the same draw alone or in a batch), kept in their original order; the others keep
    their layout (positions 0 .. S-1; the positions past their last valid point are
    invalid)."""
    if sizes is None:
        return None
    nv = V.sum(1)
    take = nv > sizes
    if not bool(take.any()):
        return None
    B, N = V.shape
    ar = torch.arange(N, device=V.device)
    last = torch.where(V, ar, -1).amax(1) + 1  # layout length of the unsampled problems
    S = int(torch.where(take, sizes, last).max())
    rows = ar[:S].repeat(B, 1)
    vs = V[:, :S].clone()
    for b in take.nonzero().squeeze(1).tolist():
        n = int(sizes[b])
        pos = V[b].nonzero().squeeze(1)
        pick = torch.randperm(pos.numel(), generator=_step_generator(seed, _SAMPLE_STEP))[:n]
        rows[b, :n] = pos[pick.to(V.device).sort().values]
        rows[b, n:] = 0
        vs[b] = ar[:S] < n
    return rows, vs


def _kmeans_matmul(X, V, kk, perms, iters: int, tol: float, seed: int, n_local_trials, c0, sizes=None) -> KMeansResult:
    """The batched matmul engine on validated inputs (see :func:`kmeans`): X (B, N, D),
    V (B, N) bool, kk (B,) int64, perms (T, D) or None, c0 (B, Kmax, D) float64 or None,
    sizes (B,) k-means++ sample sizes or None (all points)."""
    B, _, D = X.shape
    dev = X.device
    pr = _Problem(X, V, kk, perms)
    Kmax = pr.kmax
    if c0 is not None:
        C64 = c0 * pr.real[..., None]
    else:
        sample = _init_sample(V, sizes, seed)
        if sample is None:
            idx = pr.kmeanspp(seed, n_local_trials)
        else:
            rows, vs = sample
            sub = _Problem(X.gather(1, rows[..., None].expand(-1, -1, D)), vs, kk, perms)
            idx = rows.gather(1, sub.kmeanspp(seed, n_local_trials))
        C64 = pr.x[torch.arange(B, device=dev)[:, None], idx].to(torch.float64) * pr.real[..., None]

    C64, a, iterations = _lloyd(pr, C64, iters, tol)

    labels = a % Kmax
    tr = a // Kmax
    labels = torch.where(V, labels, 0)
    tr = torch.where(V, tr, 0)
    centroids = (C64 * pr.real[..., None]).to(torch.float32)
    inertia = _inertia(X, V, centroids, labels, tr, perms)
    return KMeansResult(
        centroids=centroids,
        labels=labels,
        transform=tr if perms is not None else None,
        inertia=inertia,
        iterations=iterations,
    )


def _init_centroids(init, B: int, kmax: int, D: int, dev) -> torch.Tensor | None:
    """User-given initial centroids as (B, Kmax, D) float64, validated (None: not given)."""
    if init is None:
        return None
    c0 = torch.as_tensor(init, device=dev).to(torch.float64)
    if c0.dim() == 2:
        c0 = c0.unsqueeze(0)
    if c0.shape != (B, kmax, D):
        raise UsageError(f"init must be ({B}, {kmax}, {D}), got shape {tuple(c0.shape)}")
    if not bool(torch.isfinite(c0).all()):
        raise UsageError("init contains NaN or infinite values")
    return c0


def _kmeans_many(X, V, kk, iters: int, tol: float, seed: int, c0) -> KMeansResult:
    """k-means for many clusters in few dimensions (K >= TREE_MIN_K, D <= TREE_MAX_D, no
    transforms), one problem after the other through :func:`kcompile.kmeans_tree.lloyd_tree`.

    Initialisation: ``init`` or :func:`_two_level_init`, not k-means++ over all points:
    greedy k-means++ takes K sequential passes over the N points (K = 78,643 and N = 786,432
    for Deep k-Means at rate 0.1 on a ResNet-18 layer), which is hours here.
    """
    B, N, D = X.shape
    dev = X.device
    kmax = int(kk.max())
    centroids = torch.zeros(B, kmax, D, dtype=torch.float32, device=dev)
    labels = torch.zeros(B, N, dtype=torch.int64, device=dev)
    n_iter = 0
    workers = max(1, torch.get_num_threads())
    for b in range(B):
        k = int(kk[b])
        pos = V[b].nonzero().squeeze(1)
        xb = X[b, pos]
        start = c0[b, :k] if c0 is not None else _two_level_init(xb, k, seed)
        c, lab, it = lloyd_tree(xb.cpu().numpy(), start.cpu().numpy(), iters, tol, workers)
        centroids[b, :k] = torch.from_numpy(c).to(torch.float32)
        labels[b, pos] = torch.from_numpy(lab).to(dev)
        n_iter = max(n_iter, it)
    inertia = _inertia(X, V, centroids, labels, None, None)
    return KMeansResult(centroids=centroids, labels=labels, transform=None, inertia=inertia,
                        iterations=n_iter)


def _share_clusters(weight: torch.Tensor, cap: torch.Tensor, k: int) -> torch.Tensor:
    """Split k clusters over G groups in proportion to ``weight`` (G,), each group getting
    between 1 and ``cap`` (G,) clusters (sum(cap) >= k >= G); largest remainders first."""
    share = weight / weight.sum() * k
    kg = torch.minimum(share.floor().to(torch.int64).clamp_min(1), cap)
    while int(kg.sum()) != k:
        short = k - int(kg.sum())
        if short > 0:  # room left in groups below their cap, largest remainder first
            rem = torch.where(kg < cap, share - kg, -torch.inf)
            n = min(short, int((kg < cap).sum()))
            kg[rem.topk(n).indices] += 1
        else:
            rem = torch.where(kg > 1, share - kg, torch.inf)
            n = min(-short, int((kg > 1).sum()))
            kg[rem.topk(n, largest=False).indices] -= 1
    return kg


def _two_level_init(x: torch.Tensor, k: int, seed: int, per_group: int = 64) -> torch.Tensor:
    """Initial centroids (k, D) float64 for many clusters: k-means++ inside coarse groups.

    x: (N, D) points. A coarse k-means (G = k / ``per_group`` clusters, at most 1024, plain
    k-means++ seeding, 5 iterations) splits the points into groups; group g gets k_g
    clusters in proportion to its inertia I_g ** (D / (D + 2)) (the high-resolution
    quantiser's optimal cell density) and greedy k-means++ seeds all groups at once with the
    batched engine. On 60,000 ResNet-18 kernel rows (D = 3) and K = 5,000 the Lloyd result
    from this init has 1.2 % more inertia than from k-means++ over all points (0.3358 vs
    0.3319), against 31 % more from K random points, in 1/7 of the time.
    """
    n, d = x.shape
    g = max(1, min(1024, k // per_group))
    one = torch.ones(1, n, dtype=torch.bool)
    coarse = _kmeans_matmul(x[None], one, torch.tensor([g]), None, 5, 1e-4, seed, 1, None)
    lab = coarse.labels[0]
    sizes = torch.bincount(lab, minlength=g)
    d2 = (x.to(torch.float64) - coarse.centroids[0, lab].to(torch.float64)).pow(2).sum(1)
    inertia = torch.zeros(g, dtype=torch.float64).index_add_(0, lab, d2)
    keep = sizes > 0
    lab = (torch.cumsum(keep.to(torch.int64), 0) - 1)[lab]  # drop empty groups
    sizes, inertia = sizes[keep], inertia[keep]
    g = sizes.numel()
    kg = _share_clusters(inertia.clamp_min(1e-30) ** (d / (d + 2)), sizes, k)
    order = lab.argsort(stable=True)
    glab = lab[order]
    pos = torch.arange(n) - (torch.cumsum(sizes, 0) - sizes)[glab]
    xb = torch.zeros(g, int(sizes.max()), d, dtype=x.dtype)
    vb = torch.zeros(g, int(sizes.max()), dtype=torch.bool)
    xb[glab, pos] = x[order]
    vb[glab, pos] = True
    seeds = _kmeans_matmul(xb, vb, kg, None, 0, 0.0, seed, None, None)
    keep_rows = torch.arange(seeds.centroids.shape[1])[None, :] < kg[:, None]
    return seeds.centroids[keep_rows].to(torch.float64)


def _inertia(X, V, centroids, labels, tr, perms) -> torch.Tensor:
    B, N, D = X.shape
    out = torch.zeros(B, dtype=torch.float64, device=X.device)
    step = max(1, (1 << 20) // max(1, B * D))
    bidx = torch.arange(B, device=X.device)[:, None]
    for s in range(0, N, step):
        lab = labels[:, s : s + step]
        c = centroids[bidx, lab]  # (B, n, D)
        if perms is not None:
            c = c.gather(2, perms[tr[:, s : s + step]])
        diff = X[:, s : s + step].to(torch.float64) - c.to(torch.float64)
        d2 = (diff * diff).sum(-1) * V[:, s : s + step]
        out += _dsum(d2)
    return out


def _lloyd(pr: _Problem, C64: torch.Tensor, iters: int, tol: float):
    """Lloyd iterations with Hamerly's bounds. C64: (B, Kmax, D) float64 centroids (original
    coordinates); distances use float32 centred copies. Returns (C64, a, iterations) with
    a (B, N) the combined candidate index t*Kmax + c.

    The first assignment is a full nearest-candidate search. Afterwards each point has an
    upper bound u on the distance to its candidate (grows by that candidate's shifts) and a
    lower bound l on the distance to every other one (shrinks by the largest shift), kept
    against cumulative shift sums so an iteration only reads them. Only points with
    u > max(l, s[a]) (s: half the distance from the candidate to its nearest other one) are
    checked, in blocks, with one matmul and one vectorised minimum; a point keeps its
    candidate unless another one is strictly nearer (ties keep it), and the few that moved
    get a full search. Cluster sums are float64 and updated with the points that moved only.
    """
    B, N, D, dev = pr.B, pr.N, pr.D, pr.dev
    Kmax, T = pr.kmax, pr.T
    f32, f64 = torch.float32, torch.float64
    real = pr.real
    a = torch.zeros(B, N, dtype=torch.int64, device=dev)
    sums = torch.zeros(B * Kmax, D, dtype=f64, device=dev)
    counts = torch.zeros(B * Kmax, dtype=torch.int64, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    tol_b = tol * pr.tol_scale
    n_iter = torch.zeros(B, dtype=torch.int64, device=dev)
    kc = pr.kc_pad
    us = torch.zeros(B, N, dtype=f32, device=dev)  # u = us + Sc[a] (upper bound)
    ls = torch.zeros(B, N, dtype=f32, device=dev)  # l = ls - Smax (lower bound, others)
    Sc = torch.zeros(B, kc, dtype=f64, device=dev)  # cumulative shift of each candidate
    Smax = torch.zeros(B, dtype=f64, device=dev)  # cumulative largest shift
    rms = pr.tol_scale.mul(D).sqrt()  # (B,) typical norm of a centred point
    all_valid = bool(pr.valid.all())
    s_half = torch.zeros(B, kc, dtype=f32, device=dev)
    a_f, us_f, ls_f = a.view(-1), us.view(-1), ls.view(-1)

    def centred(C64):
        return (C64 - pr.mean64[:, None, :]).to(f32) * real[..., None]

    def estep(cand_aug, where, first):
        """Reassign the valid points of the problems in ``where``; returns the points that
        changed (bi, ni, old, new)."""
        if first:
            bi, ni = (pr.valid & where[:, None]).nonzero(as_tuple=True)
            j, d1, d2 = pr.search(cand_aug, bi, ni)
            a[bi, ni] = j
            us[bi, ni] = d1.sqrt_()
            ls[bi, ni] = d2.sqrt_()
            return bi, ni, j, j
        return estep_bounds(cand_aug, where)

    def estep_bounds(cand_aug, where):
        margin = ((rms + Smax) * 2.0**-18).to(f32)  # float32 rounding of the bound arithmetic
        sc32 = Sc.to(f32)
        smax32 = Smax.to(f32)
        u = sc32.gather(1, a).add_(us).mul_(_SLACK).add_(margin[:, None])
        z = torch.maximum(ls - smax32[:, None], s_half.gather(1, a))
        need = u > z
        del u, z
        if not (all_valid and bool(where.all())):
            need &= pr.valid & where[:, None]
        # flat indices: index_select / index_copy_ are much faster than a[bi, ni]
        flat = need.view(-1).nonzero().squeeze(1)
        bi, ni = (flat.new_zeros(flat.shape), flat) if B == 1 else (flat // N, flat % N)
        old = a_f.index_select(0, flat)
        v, dn = pr.search(cand_aug, bi, ni, old)
        mv = (v > dn).nonzero().squeeze(1)
        cflat = old if B == 1 else bi * kc + old
        us_f.index_copy_(0, flat, v.clamp_(min=0).sqrt_().sub_(sc32.view(-1).index_select(0, cflat)))
        ls_f.index_copy_(0, flat, dn.clamp_(min=0).sqrt_().add_(smax32.index_select(0, bi)))
        flat, bi, ni, old = flat[mv], bi[mv], ni[mv], old[mv]
        j, d1, d2 = pr.search(cand_aug, bi, ni)
        a_f.index_copy_(0, flat, j)
        cflat = j if B == 1 else bi * kc + j
        us_f.index_copy_(0, flat, d1.sqrt_().sub_(sc32.view(-1).index_select(0, cflat)))
        ls_f.index_copy_(0, flat, d2.sqrt_().add_(smax32.index_select(0, bi)))
        ch = j != old
        return bi[ch], ni[ch], old[ch], j[ch]

    def refresh(C):
        cand = pr.candidates(C)
        s_half[:, : pr.kc] = _half_sep(cand, pr.real_c)
        return _augment_centroids(cand, pr.real_c, kc)

    C = centred(C64)
    cand_aug = refresh(C)
    first = True
    for it in range(iters):
        if not bool(active.any()):
            break
        bi, ni, old, new = estep(cand_aug, active, first)
        # M-step: incremental float64 cluster sums
        if bi.numel():
            fn = bi * Kmax + new % Kmax
            xn = pr.inverse_transformed(bi, ni, new // Kmax)
            if first:
                _add_rows(sums, counts, fn, xn)
            else:
                fo = bi * Kmax + old % Kmax
                xo = pr.inverse_transformed(bi, ni, old // Kmax)
                _add_rows(sums, counts, torch.cat([fn, fo]), torch.cat([xn, xo.neg_()]), bi.numel())
        if not first:
            nmoved = bi.new_full((1,), bi.numel()) if B == 1 else torch.bincount(bi, minlength=B)
            strict = active & (nmoved == 0)
            n_iter = torch.where(strict, it + 1, n_iter)
            active = active & ~strict
        first = False
        if not bool(active.any()):
            break
        n_iter = torch.where(active, it + 1, n_iter)
        C64 = _new_centroids(pr, C64, sums, counts, a, active)
        C_new = centred(C64)
        delta = (C_new.to(f64) - C.to(f64)).pow(2).sum(-1)  # (B, Kmax)
        shift2 = delta.sum(1)
        C = C_new
        active = active & ~(shift2 <= tol_b)
        # cumulative shifts for the bounds (a shift is a distance: exact under permutations)
        dc = (delta.sqrt() * _SLACK).repeat(1, T)  # (B, Kc)
        Sc[:, : pr.kc] += dc
        Smax += dc.amax(1)
        cand_aug = refresh(C)
    # final assignment against the final centroids (a no-op where nothing moved)
    estep(cand_aug, torch.ones(B, dtype=torch.bool, device=dev), first)
    return C64, a, int(n_iter.max()) if B else 0


def _add_rows(sums: torch.Tensor, counts: torch.Tensor, idx: torch.Tensor, x: torch.Tensor, n_plus: int | None = None) -> None:
    """sums[idx[i]] += x[i] and counts[idx[i]] += 1 (-1 for the rows from ``n_plus`` on, whose x
    the caller has negated). sums (G, D) float64, counts (G,) int64, idx (M,) int64, x (M, D).

    One serial float64 ``bincount`` per dimension over contiguous columns: several times faster
    than ``index_add_`` on CPU, and the summation order is fixed.
    """
    g, d = sums.shape
    cols = torch.empty(d, idx.numel(), dtype=torch.float64, device=idx.device)
    cols.copy_(x.t())
    for k in range(d):
        sums[:, k] += torch.bincount(idx, weights=cols[k], minlength=g)
    if n_plus is None:
        counts += torch.bincount(idx, minlength=g)
    else:
        counts += torch.bincount(idx[:n_plus], minlength=g) - torch.bincount(idx[n_plus:], minlength=g)


def _half_sep(cand: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Half the distance of each candidate centroid to its nearest other candidate (B, Kc),
    from exact differences and rounded down; 0 where it is not worth computing (the other
    bound still prunes)."""
    B, kc, D = cand.shape
    if kc < 2 or B * kc * kc > 4 * _BLOCK_ELEMS:
        return torch.zeros(B, kc, dtype=torch.float32, device=cand.device)
    out = torch.empty(B, kc, dtype=torch.float32, device=cand.device)
    step = max(1, _BLOCK_ELEMS // (kc * kc))
    eye = torch.eye(kc, dtype=torch.bool, device=cand.device)
    for b0 in range(0, B, step):
        c = cand[b0 : b0 + step]
        r = real[b0 : b0 + step]
        d = torch.cdist(c, c, compute_mode="donot_use_mm_for_euclid_dist")
        d.masked_fill_(eye | ~r[:, None, :], _BIG)
        out[b0 : b0 + step] = d.amin(2).mul_(0.5 / _SLACK)
    return out


def _new_centroids(pr: _Problem, C64, sums, counts, a, active) -> torch.Tensor:
    """Means of the clusters (float64 sums, original coordinates); only problems in
    ``active`` change.

    Empty clusters are repaired as scikit-learn does (the empty centroid takes the point
    farthest from its centroid, and that point's weight leaves its old cluster), measured
    against the new means and farthest-first: once a point has been taken, the distances are
    updated with it, so duplicates of a point are not taken twice and, whenever the data
    allow it, every cluster gets a distinct centroid.
    """
    B, N, D, Kmax, T = pr.B, pr.N, pr.D, pr.kmax, pr.T
    s = sums.view(B, Kmax, D)
    n = counts.view(B, Kmax)
    empty = (n == 0) & pr.real & active[:, None]
    if bool(empty.any()):
        nemp = empty.sum(1)
        probs = (nemp > 0).nonzero().squeeze(1)
        m = int(nemp.max())
        bp = probs.numel()
        sp, np_ = s[probs], n[probs]
        mean = torch.where((np_ > 0)[..., None], sp / np_.clamp(min=1)[..., None], C64[probs])
        cm = ((mean - pr.mean64[probs][:, None, :]).to(torch.float32)) * pr.real[probs][..., None]
        cand = pr.candidates(cm)  # (b', Kc, D)
        xp = pr.xc[probs]  # (b', N, D)
        ap = a[probs]
        diff = xp - cand.gather(1, ap[..., None].expand(-1, -1, D))
        dist = (diff * diff).sum(-1)
        dist = torch.where(pr.valid[probs], dist, -1.0)
        eorder = torch.where(empty[probs], torch.arange(Kmax, device=pr.dev), Kmax).sort(1).values
        rows = torch.arange(bp, device=pr.dev)
        picked_b, picked_p, picked_e = [], [], []
        for r in range(m):
            has = nemp[probs] > r
            p = dist.argmax(1)  # farthest point (first one on ties)
            picked_b.append(rows[has])
            picked_p.append(p[has])
            picked_e.append(eorder[has, r])
            if r + 1 < m:
                newc = xp[rows, p]  # (b', D)
                nc = pr.candidates(newc[:, None, :])  # (b', T, D)
                ca = _augment_centroids(nc, None, T)
                dn = torch.bmm(ca, pr.xa[probs].transpose(1, 2)).amin(1).clamp_(min=0)  # (b', N)
                dist = torch.where(has[:, None], torch.minimum(dist, dn), dist)
        eb = torch.cat(picked_b)
        pts = torch.cat(picked_p)
        ec = torch.cat(picked_e)
        gb = probs[eb]
        # the point leaves its cluster and becomes the empty cluster's only member
        s = s.reshape(B * Kmax, D).clone()
        n = n.reshape(B * Kmax).clone()
        jo = a[gb, pts]
        xo = pr.inverse_transformed(gb, pts, jo // Kmax)
        fo = gb * Kmax + jo % Kmax
        s.index_add_(0, fo, xo, alpha=-1)
        n.index_add_(0, fo, torch.ones_like(fo), alpha=-1)
        fe = gb * Kmax + ec
        s[fe] = pr.x[gb, pts].to(torch.float64)
        n[fe] = 1
        s = s.view(B, Kmax, D)
        n = n.view(B, Kmax)
    mean = s / n.clamp(min=1)[..., None].to(torch.float64)
    upd = (n > 0) & active[:, None]
    return torch.where(upd[..., None], mean, C64)


def assign(x, centroids, transforms=None, k=None):
    """Nearest centroid of every point (re-assignment with fixed centroids).

    Args:
        x: (N, D) or (B, N, D) points.
        centroids: (K, D) or (B, K, D) centroids.
        transforms: optional (T, D) permutations (as in :func:`kmeans`).
        k: optional int or B ints: only the first k[b] centroids are candidates.

    Returns:
        (labels, transform): int64 tensors shaped like x without its last dim ((N,) or
        (B, N)); transform is None without transforms.
    """
    two_d = torch.as_tensor(x).dim() == 2
    X = _as_points(x)
    B, N, D = X.shape
    c = torch.as_tensor(centroids, device=X.device).to(torch.float32)
    if c.dim() == 2:
        c = c.unsqueeze(0).expand(B, -1, -1)
    if c.dim() != 3 or c.shape[0] != B or c.shape[2] != D or c.shape[1] < 1:
        raise UsageError(f"centroids must be (K, {D}) or ({B}, K, {D}), got shape {tuple(c.shape)}")
    K = c.shape[1]
    if k is None:
        kk = torch.full((B,), K, dtype=torch.int64)
    else:
        kk = _as_k(k, B, torch.full((B,), K, dtype=torch.int64))
    perms = _as_perms(transforms, D, X.device)
    V = torch.ones(B, N, dtype=torch.bool, device=X.device)
    pr = _Problem(X, V, kk, perms)
    pr.kmax = K
    pr.kc = K * pr.T
    pr.P, pr.Q = _pq(pr.kc)
    pr.kc_pad = pr.P * pr.Q
    real = torch.arange(K, device=X.device)[None, :] < pr.k[:, None]
    pr.real, pr.real_c = real, real.repeat(1, pr.T)
    C = (c.to(torch.float64) - pr.mean64[:, None, :]).to(torch.float32)
    cand = pr.candidates(C)
    cand_aug = _augment_centroids(cand, pr.real_c, pr.kc_pad)
    bi, ni = V.nonzero(as_tuple=True)
    j, _, _ = pr.search(cand_aug, bi, ni)
    a = j.view(B, N)
    labels, tr = a % K, a // K
    if two_d:
        labels, tr = labels[0], tr[0]
    return labels, (tr if perms is not None else None)
