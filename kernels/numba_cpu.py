"""Numba CPU schedules of the shared-centroid forms (the math is in :mod:`.reference`).

Layout trick shared by every kernel here ("phased, padded, wide" input):

- the input is zero-padded and split into ``sh*sw`` stride phases, so that for every tap
  (i, j) the input of output (oy, ox) is ``xs[c, tapoff[t] + oy*Wq + ox]``: contiguous in ox;
- outputs are computed on a *wide* grid of Ho x Wq positions (Wq >= Wo, the extra columns are
  discarded), so a spatial tile of T consecutive wide positions reads T consecutive floats
  per tap: the inner loops are unit-stride and vectorise (LLVM picks 256-bit vectors on this
  Xeon, 8 lanes; forcing 512-bit was measured slower for these load-bound loops).

Fused conv-then-add (:func:`cta_kernel`), the blocking of kernel-design.md:
``prange`` over (image, spatial tile of T wide positions, group, output part); per work item,
over chunks of input channels whose z rows fit in L1: stage 1 computes the chunk's z rows for
the tile (``zb``: rows x T floats), stage 2 accumulates them into the item's output
accumulators (``acc``: outputs x T), eight input channels per pass so that an accumulator
vector is loaded and stored once per eight fused multiply-adds (stage 2 then costs ~1.1 L1
loads per add: the limit of this form).

Numba specifics that decide the speed (measured, see tests/test_kernels_numba.py): the hot
loops live in a serial ``@njit`` function called from the ``prange`` body (inside a parfor
body they did not vectorise); they index flat buffers with *unsigned* offsets (signed
indices get a negative-index wraparound select that blocks vectorisation); they never slice
arrays (a view costs an atomic reference-count update); the z-row offsets of stage 2 are
precomputed per input size (``uoff``).
"""

from __future__ import annotations

import os

import numba
import numpy as np
from numba import njit, prange, uint64

# Numba's default OpenMP pool spins after each parallel region and starves torch's own
# OpenMP pool in the same process (a 1.5 ms oneDNN conv measured at 110 ms on 2 cores):
# use the non-spinning workqueue layer unless the user chose one.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

from .plan import Geometry, ceil_div

FASTMATH = {"contract", "nsz", "arcp"}  # FMA contraction; no reassociation of sums needed
#: spatial tile of the fused kernel (wide output positions); a compile-time constant so that
#: the inner loops unroll fully (4 AVX-512 / 8 AVX2 vectors)
TILE = 64
#: z floats kept per channel chunk (rows x TILE): 24 KB of the 48 KB L1
L1_ROWS_X_TILE = 6144


# ----------------------------------------------------------------------------- input layout
class Layout:
    """Phased padded wide layout of an input for a given geometry and kernel size.

    Attributes: Hp, Wp (padded), P = sh*sw phases, Hq, Wq (phase plane size), Ho, Wo,
    tapoff (kh*kw,) int64, L (floats per channel incl. slack), T (tile), ntiles.
    """

    def __init__(self, H: int, W: int, kh: int, kw: int, geom: Geometry, T: int) -> None:
        t, l, b, r = geom.padding
        sh, sw = geom.stride
        dh, dw = geom.dilation
        self.Ho, self.Wo = geom.out_hw(H, W, kh, kw)
        self.Hp, self.Wp = H + t + b, W + l + r
        self.P = sh * sw
        self.Hq, self.Wq = ceil_div(self.Hp, sh), ceil_div(self.Wp, sw)
        taps = []
        for i in range(kh):
            for j in range(kw):
                a, ro = (i * dh) % sh, (i * dh) // sh
                bb, co = (j * dw) % sw, (j * dw) // sw
                taps.append((a * sw + bb) * self.Hq * self.Wq + ro * self.Wq + co)
        self.tapoff = np.asarray(taps, np.int64)
        self.T = T
        self.Qw = self.Ho * self.Wq
        self.ntiles = ceil_div(self.Qw, T)
        self.L = max(self.P * self.Hq * self.Wq, int(self.tapoff.max()) + self.ntiles * T) + 1
        self.pad = (t, l)
        self.stride = (sh, sw)


@njit(parallel=True, cache=True)
def _phase(x, top, left, sh, sw, Hq, Wq, L, xs):
    """xs[n, c, (a*sw+b)*Hq*Wq + u*Wq + v] = xpad[n, c, u*sh + a, v*sw + b] (zero elsewhere)."""
    N, C, H, W = x.shape
    plane = Hq * Wq
    xf = x.reshape(-1)
    xsf = xs.reshape(-1)
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        xs[n, c, :] = 0.0
        for y in range(H):
            yp = y + top
            a = yp % sh
            u = yp // sh
            for b in range(sw):
                # columns xx with (xx + left) % sw == b, i.e. v = (xx + left) // sw
                x0 = (b - left) % sw
                if x0 >= W:
                    continue
                cnt = uint64((W - x0 + sw - 1) // sw)
                dst = uint64((n * C + c) * L + (a * sw + b) * plane + u * Wq + (x0 + left) // sw)
                src = uint64(((n * C + c) * H + y) * W + x0)
                if sw == 1:
                    for i in range(cnt):
                        xsf[dst + i] = xf[src + i]
                else:
                    step = uint64(sw)
                    for i in range(cnt):
                        xsf[dst + i] = xf[src + i * step]


def phase_input(x: np.ndarray, lay: Layout) -> np.ndarray:
    """x (N, C, H, W) float32 -> xs (N, C, L) float32 in the layout ``lay``."""
    N, C = x.shape[:2]
    xs = np.empty((N, C, lay.L), np.float32)
    _phase(x, lay.pad[0], lay.pad[1], lay.stride[0], lay.stride[1], lay.Hq, lay.Wq, lay.L, xs)
    return xs


# ----------------------------------------------------------------------------- conv-then-add
@njit(cache=True, fastmath=FASTMATH)
def _cta_item(xs, tapoff, zk, zchan, zstart, chunks, uoff, uscale, upc, Ck, T, Ho, Wo, Wq, maxrows,
              bias, out, n, tile, g, oa, ob):
    """One work item of :func:`cta_kernel`: image n, spatial tile, group g, outputs oa..ob-1.
    (A separate serial function: inside a parfor body LLVM does not vectorise these loops.)"""
    ntaps = tapoff.shape[0]
    T = TILE
    Tu = uint64(TILE)
    O = out.shape[1]
    outf = out.reshape(-1)  # flat view: unsigned offsets, vectorised stores
    q0 = tile * T
    acc = np.zeros((ob - oa) * T, np.float32)
    zb = np.empty(maxrows * T, np.float32)
    for ch in range(chunks.shape[0]):
        if chunks[ch, 0] != g:
            continue
        k0 = chunks[ch, 1]
        k1 = chunks[ch, 2]
        r0 = zstart[g * Ck + k0]
        r1 = zstart[g * Ck + k1]
        # stage 1: the chunk's distinct products for this tile
        for r in range(r0, r1):
            c = zchan[r]
            zo = uint64((r - r0) * T)
            t = 0
            if ntaps == 9:  # 3x3: one chain of nine FMAs per vector, z written once
                w0 = zk[r, 0]
                w1 = zk[r, 1]
                w2 = zk[r, 2]
                w3 = zk[r, 3]
                w4 = zk[r, 4]
                w5 = zk[r, 5]
                w6 = zk[r, 6]
                w7 = zk[r, 7]
                w8 = zk[r, 8]
                b0 = uint64(tapoff[0] + q0)
                b1 = uint64(tapoff[1] + q0)
                b2 = uint64(tapoff[2] + q0)
                b3 = uint64(tapoff[3] + q0)
                b4 = uint64(tapoff[4] + q0)
                b5 = uint64(tapoff[5] + q0)
                b6 = uint64(tapoff[6] + q0)
                b7 = uint64(tapoff[7] + q0)
                b8 = uint64(tapoff[8] + q0)
                for k in range(Tu):
                    zb[zo + k] = (w0 * xs[n, c, b0 + k] + w1 * xs[n, c, b1 + k] + w2 * xs[n, c, b2 + k]
                                  + w3 * xs[n, c, b3 + k] + w4 * xs[n, c, b4 + k] + w5 * xs[n, c, b5 + k]
                                  + w6 * xs[n, c, b6 + k] + w7 * xs[n, c, b7 + k] + w8 * xs[n, c, b8 + k])
                t = 9
            else:
                for k in range(Tu):
                    zb[zo + k] = 0.0
            while t + 3 <= ntaps:
                w0 = zk[r, t]
                w1 = zk[r, t + 1]
                w2 = zk[r, t + 2]
                if w0 != 0.0 or w1 != 0.0 or w2 != 0.0:
                    b0 = uint64(tapoff[t] + q0)
                    b1 = uint64(tapoff[t + 1] + q0)
                    b2 = uint64(tapoff[t + 2] + q0)
                    for k in range(Tu):
                        zb[zo + k] = zb[zo + k] + w0 * xs[n, c, b0 + k] + w1 * xs[n, c, b1 + k] + w2 * xs[n, c, b2 + k]
                t += 3
            while t < ntaps:
                w0 = zk[r, t]
                if w0 != 0.0:
                    b0 = uint64(tapoff[t] + q0)
                    for k in range(Tu):
                        zb[zo + k] += w0 * xs[n, c, b0 + k]
                t += 1
        # stage 2: acc[o] += s[o, j] * z[idx[o, j]], four units per pass
        j0 = k0 * upc
        j1 = k1 * upc
        for o in range(oa, ob):
            ao = uint64((o - oa) * T)
            j = j0
            while j + 8 <= j1:
                z0 = uoff[o, j]
                z1 = uoff[o, j + 1]
                z2 = uoff[o, j + 2]
                z3 = uoff[o, j + 3]
                z4 = uoff[o, j + 4]
                z5 = uoff[o, j + 5]
                z6 = uoff[o, j + 6]
                z7 = uoff[o, j + 7]
                s0 = uscale[o, j]
                s1 = uscale[o, j + 1]
                s2 = uscale[o, j + 2]
                s3 = uscale[o, j + 3]
                s4 = uscale[o, j + 4]
                s5 = uscale[o, j + 5]
                s6 = uscale[o, j + 6]
                s7 = uscale[o, j + 7]
                for k in range(Tu):
                    # left to right: a chain of eight FMAs on the accumulator
                    acc[ao + k] = (acc[ao + k] + s0 * zb[z0 + k] + s1 * zb[z1 + k] + s2 * zb[z2 + k]
                                   + s3 * zb[z3 + k] + s4 * zb[z4 + k] + s5 * zb[z5 + k] + s6 * zb[z6 + k]
                                   + s7 * zb[z7 + k])
                j += 8
            while j < j1:
                za = uoff[o, j]
                s0 = uscale[o, j]
                for k in range(Tu):
                    acc[ao + k] = acc[ao + k] + s0 * zb[za + k]
                j += 1
    # write the valid positions of the tile, one output row segment at a time
    q = q0
    qend = min(q0 + T, Ho * Wq)
    while q < qend:
        oy = q // Wq
        ox = q - oy * Wq
        seg = min(qend - q, Wq - ox)
        if ox < Wo:
            m = uint64(min(seg, Wo - ox))
            for o in range(oa, ob):
                base = uint64((o - oa) * T + (q - q0))
                dst = uint64(((n * O + o) * Ho + oy) * Wo + ox)
                bo = bias[o]
                for i in range(m):
                    outf[dst + i] = acc[base + i] + bo
        q += seg


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def cta_kernel(xs, tapoff, zk, zchan, zstart, chunks, uoff, uscale, upc, Ck, Og, osplit,
               T, Ho, Wo, Wq, maxrows, bias, out):
    """Fused conv-then-add. Shapes: xs (N, C, L); tapoff (ntaps,); zk (Z, ntaps);
    zchan (Z,); zstart (G*Ck+1,); chunks (nch, 3) rows (g, k0, k1); uoff (O, Ck*upc) uint32 offset
    of unit j's z row in the chunk buffer ((uidx - first row of the chunk) * T); uscale (O, Ck*upc);
    bias (O,); out (N, O, Ho, Wo) (overwritten).

    Inner loops index flat buffers with *unsigned* offsets: Numba then emits no negative-index
    wraparound and LLVM vectorises them; no array views are made inside loops (a view costs
    an atomic reference-count update)."""
    N = xs.shape[0]
    O = out.shape[1]
    G = O // Og
    ntiles = (Ho * Wq + T - 1) // T
    per = (Og + osplit - 1) // osplit
    total = N * ntiles * G * osplit
    for item in prange(total):
        part = item % osplit
        rest = item // osplit
        g = rest % G
        rest = rest // G
        tile = rest % ntiles
        n = rest // ntiles
        oa = g * Og + part * per
        ob = min(oa + per, (g + 1) * Og)
        if oa < ob:
            _cta_item(xs, tapoff, zk, zchan, zstart, chunks, uoff, uscale, upc, Ck, T, Ho, Wo, Wq, maxrows,
                      bias, out, n, tile, g, oa, ob)


# ----------------------------------------------------------------------------- add-then-conv
@njit(cache=True, fastmath=FASTMATH)
def _atc_item(xs, tapoff, optr, ak, mptr, mchan, mscale, Ho, Wo, Wq, bias, out, n, o):
    """Output channel o of image n (serial; called from :func:`atc_kernel`)."""
    L = uint64(xs.shape[2])
    C = xs.shape[1]
    ntaps = tapoff.shape[0]
    Qw = uint64(Ho * Wq)
    xsf = xs.reshape(-1)
    a = np.empty(xs.shape[2], np.float32)
    acc = np.zeros(Ho * Wq, np.float32)
    for e in range(optr[o], optr[o + 1]):
        for p in range(L):
            a[p] = 0.0
        for m in range(mptr[e], mptr[e + 1]):
            base = uint64((n * C + mchan[m]) * xs.shape[2])
            s = mscale[m]
            for p in range(L):
                a[p] = a[p] + s * xsf[base + p]
        for t in range(ntaps):
            w = ak[e, t]
            if w != 0.0:
                off = uint64(tapoff[t])
                for q in range(Qw):
                    acc[q] = acc[q] + w * a[off + q]
    for oy in range(Ho):
        for ox in range(Wo):
            out[n, o, oy, ox] = acc[oy * Wq + ox] + bias[o]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def atc_kernel(xs, tapoff, optr, ak, mptr, mchan, mscale, Ho, Wo, Wq, bias, out):
    """Add-then-conv: per output o and distinct centroid e, a = sum_m s_m x[c_m] over the whole
    phased plane, then acc += conv(a, ak[e]). xs (N, C, L); out (N, O, Ho, Wo)."""
    N = xs.shape[0]
    O = out.shape[1]
    for item in prange(N * O):
        _atc_item(xs, tapoff, optr, ak, mptr, mchan, mscale, Ho, Wo, Wq, bias, out, item // O, item % O)


# ----------------------------------------------------------------------------- host side
def _threads() -> int:
    import numba
    return numba.get_num_threads()


class _CTA:
    """Conv-then-add on the Numba CPU kernels; per input size, the layout and the work split
    (tile T, output split) are chosen once and cached."""

    def __init__(self, cw, bias, geom: Geometry) -> None:
        from . import plan as P
        O, Cg, kh, kw = cw.shape
        self.geom, self.O, self.kh, self.kw = geom, O, kh, kw
        self.t = P.shared_tables(cw, geom.groups)
        _, full = P.channel_masks(cw)
        self.dense = P.dense_tables(cw, geom.groups, np.flatnonzero(full))
        self.bias = np.zeros(O, np.float32) if bias is None else bias
        self.Og = O // geom.groups
        self._plans: dict = {}

    def _plan(self, H: int, W: int, N: int):
        key = (H, W, N)
        if key not in self._plans:
            from . import plan as P
            Ho, Wo = self.geom.out_hw(H, W, self.kh, self.kw)
            Wq = ceil_div(W + self.geom.padding[1] + self.geom.padding[3], self.geom.stride[1])
            # one work item per thread at least; splitting the outputs recomputes stage 1
            T = TILE
            items = N * ceil_div(Ho * Wq, T) * self.geom.groups
            osplit = max(1, min(max(1, self.Og // 32), ceil_div(_threads(), items)))
            lay = Layout(H, W, self.kh, self.kw, self.geom, T)
            # z rows of a chunk: ~24 KB (L1) but at least eight channels' worth (stage 2 takes
            # eight units per pass; fewer would reload the accumulators for every channel)
            rows8 = int(np.diff(self.t.zstart).max(initial=1)) * 8
            budget = max(L1_ROWS_X_TILE // T, rows8)
            chunks = P.chunk_channels(self.t, budget)
            zs = self.t.zstart
            Ck = self.t.Ck
            maxrows = 1
            for g, k0, k1 in chunks:
                maxrows = max(maxrows, int(zs[g * Ck + k1] - zs[g * Ck + k0]))
            uoff = np.zeros(self.t.uidx.shape, np.uint32)
            upc = self.t.upc
            for g, k0, k1 in chunks:
                osl = slice(g * self.Og, (g + 1) * self.Og)
                jsl = slice(k0 * upc, k1 * upc)
                uoff[osl, jsl] = (self.t.uidx[osl, jsl] - zs[g * Ck + k0]) * T
            self._plans[key] = (lay, osplit, chunks, maxrows, uoff)
        return self._plans[key]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        N, C, H, W = x.shape
        lay, osplit, chunks, maxrows, uoff = self._plan(H, W, N)
        out = np.empty((N, self.O, lay.Ho, lay.Wo), np.float32)
        t = self.t
        if t.Ck == 0:
            out[:] = self.bias.reshape(1, -1, 1, 1)
        else:
            xs = phase_input(x, lay)
            cta_kernel(xs, lay.tapoff, t.zk, t.zchan, t.zstart, chunks, uoff, t.uscale, t.upc, t.Ck,
                       self.Og, osplit, lay.T, lay.Ho, lay.Wo, lay.Wq, maxrows, self.bias, out)
        if self.dense is not None:
            from .api import torch_conv
            out += torch_conv(np.ascontiguousarray(x[:, self.dense.channels]), self.dense.weight, None, self.geom)
        return out


class _ATC:
    """Add-then-conv on the Numba CPU kernel (+ KSE full channels densely)."""

    def __init__(self, cw, bias, geom: Geometry) -> None:
        from . import plan as P
        O, Cg, kh, kw = cw.shape
        self.geom, self.O, self.kh, self.kw = geom, O, kh, kw
        self.t = P.add_tables(cw, geom.groups)
        _, full = P.channel_masks(cw)
        self.dense = P.dense_tables(cw, geom.groups, np.flatnonzero(full))
        self.bias = np.zeros(O, np.float32) if bias is None else bias
        self._lays: dict = {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        N, C, H, W = x.shape
        if (H, W) not in self._lays:
            self._lays[(H, W)] = Layout(H, W, self.kh, self.kw, self.geom, 16)
        lay = self._lays[(H, W)]
        out = np.empty((N, self.O, lay.Ho, lay.Wo), np.float32)
        xs = phase_input(x, lay)
        t = self.t
        atc_kernel(xs, lay.tapoff, t.optr, t.ak, t.mptr, t.mchan, t.mscale, lay.Ho, lay.Wo, lay.Wq, self.bias, out)
        if self.dense is not None:
            from .api import torch_conv
            out += torch_conv(np.ascontiguousarray(x[:, self.dense.channels]), self.dense.weight, None, self.geom)
        return out


@njit(parallel=True, cache=True)
def gather_bias(yd, gather, bias, out):
    """out[n, o] = yd[n, gather[o]] + bias[o] (one pass, contiguous planes)."""
    N, O, H, W = out.shape
    HW = uint64(H * W)
    src = yd.reshape(-1)
    dst = out.reshape(-1)
    nd = yd.shape[1]
    for no in prange(N * O):
        n = no // O
        o = no % O
        so = uint64((n * nd + gather[o]) * H * W)
        do = uint64(no * H * W)
        b = bias[o]
        for i in range(HW):
            dst[do + i] = src[so + i] + b


class _Filter:
    """Filter unit: dense conv (torch/oneDNN) with the distinct filters, then a gather."""

    def __init__(self, cw, bias, geom: Geometry) -> None:
        from . import plan as P
        self.geom, self.ft = geom, P.filter_tables(cw, geom.groups)
        self.bias = np.zeros(len(self.ft.gather), np.float32) if bias is None else bias

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from .api import torch_conv
        yd = np.ascontiguousarray(torch_conv(x, self.ft.weight, None, self.geom))
        out = np.empty((yd.shape[0], len(self.ft.gather)) + yd.shape[2:], np.float32)
        gather_bias(yd, self.ft.gather, self.bias, out)
        return out


class _Dense:
    """Decode once, dense conv through torch (oneDNN)."""

    def __init__(self, cw, bias, geom: Geometry) -> None:
        from . import plan as P
        self.geom, self.w, self.bias = geom, P.decoded_weight(cw), bias

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from .api import torch_conv
        return torch_conv(x, self.w, self.bias, self.geom)


def build(cw, bias, geom: Geometry, form: str):
    """The Numba CPU implementation of ``form`` for one layer: a callable x -> y."""
    return {"conv-then-add": _CTA, "add-then-conv": _ATC, "filter-gather": _Filter, "dense": _Dense}[form](cw, bias, geom)
