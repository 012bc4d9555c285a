"""numba.cuda schedules of the shared-centroid forms (tested under NUMBA_ENABLE_CUDASIM=1).

Same phased, padded, wide input layout as :mod:`.numba_cpu` (built on the host), so output
position q of a tile reads ``xs[n, c, tapoff[t] + q]``.

- :func:`cta_kernel` (conv-then-add): one block per (spatial tile of ``TC`` positions, image,
  group); threads (TC, TY). Per channel chunk, stage 1 writes the chunk's distinct products
  for the tile into shared memory (``z``: ZCAP rows x TC), ``syncthreads``, then each thread
  accumulates its outputs (o = ty, ty+TY, ...) at its position; the partial sums live in a
  global scratch ``acc`` (N, O, ntiles*TC) owned by one thread each.
- :func:`atc_sum_kernel` + :func:`atc_conv_kernel` (add-then-conv): a[n, e] = sum_m s_m x[c_m]
  over the plane, then y[o] = sum_e conv(a[e], mu_e).
- :func:`dense_kernel`: direct conv (decode-then-dense, KSE full channels, and the distinct
  filters of the filter unit, whose outputs :func:`gather_kernel` then gathers).
Channels with more than ZCAP distinct products go to the dense part.
"""

from __future__ import annotations


import numpy as np
from numba import cuda

from . import plan as P
from .numba_cpu import Layout
from .plan import Geometry, ceil_div

TC = 32  # positions per block (a warp)
TY = 4  # output lanes per block
ZCAP = 128  # z rows in shared memory per chunk (ZCAP * TC * 4 B = 16 KB)


@cuda.jit
def cta_kernel(xs, tapoff, zk, zchan, zstart, chunks, uidx, uscale, upc, Ck, Og, Ho, Wo, Wq, bias, acc, out):
    z = cuda.shared.array(ZCAP * TC, dtype=np.float32)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tile = cuda.blockIdx.x
    O = out.shape[1]
    G = O // Og
    n = cuda.blockIdx.y // G
    g = cuda.blockIdx.y % G
    q = tile * TC + tx
    ntaps = tapoff.shape[0]
    for o in range(g * Og + ty, (g + 1) * Og, TY):
        acc[n, o, q] = 0.0
    for ch in range(chunks.shape[0]):
        if chunks[ch, 0] != g:
            continue
        k0 = chunks[ch, 1]
        k1 = chunks[ch, 2]
        r0 = zstart[g * Ck + k0]
        r1 = zstart[g * Ck + k1]
        cuda.syncthreads()  # the previous chunk's z is consumed
        for r in range(r0 + ty, r1, TY):  # stage 1 into shared memory
            c = zchan[r]
            v = 0.0
            for t in range(ntaps):
                v += zk[r, t] * xs[n, c, tapoff[t] + q]
            z[(r - r0) * TC + tx] = v
        cuda.syncthreads()
        for o in range(g * Og + ty, (g + 1) * Og, TY):  # stage 2
            a = acc[n, o, q]
            for j in range(k0 * upc, k1 * upc):
                a += uscale[o, j] * z[(uidx[o, j] - r0) * TC + tx]
            acc[n, o, q] = a
    oy = q // Wq
    ox = q - oy * Wq
    if oy < Ho and ox < Wo:
        for o in range(g * Og + ty, (g + 1) * Og, TY):
            out[n, o, oy, ox] = acc[n, o, q] + bias[o]


@cuda.jit
def atc_sum_kernel(xs, mptr, mchan, mscale, a):
    """a[n, e, p] = sum over members m of entry e of mscale[m] * xs[n, mchan[m], p]."""
    p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    e = cuda.blockIdx.y
    n = cuda.blockIdx.z
    if p < a.shape[2]:
        v = 0.0
        for m in range(mptr[e], mptr[e + 1]):
            v += mscale[m] * xs[n, mchan[m], p]
        a[n, e, p] = v


@cuda.jit
def atc_conv_kernel(a, tapoff, optr, ak, Ho, Wo, Wq, bias, out):
    """out[n, o] = sum over entries e of o of conv(a[n, e], ak[e]) (+ bias)."""
    q = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    o = cuda.blockIdx.y
    n = cuda.blockIdx.z
    oy = q // Wq
    ox = q - oy * Wq
    if oy < Ho and ox < Wo:
        v = 0.0
        for e in range(optr[o], optr[o + 1]):
            for t in range(tapoff.shape[0]):
                v += ak[e, t] * a[n, e, tapoff[t] + q]
        out[n, o, oy, ox] = v + bias[o]


@cuda.jit
def dense_kernel(xs, chans, tapoff, w, Og, Ho, Wo, Wq, bias, accumulate, out):
    """out[n, o] (+)= sum_c sum_t w[o, c, t] xs[n, chans[g*Cw + c], tapoff[t] + q] (+ bias).
    w (O, Cw, ntaps): Cw channels per group taken from ``chans``."""
    q = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    o = cuda.blockIdx.y
    n = cuda.blockIdx.z
    oy = q // Wq
    ox = q - oy * Wq
    if oy < Ho and ox < Wo:
        g = o // Og
        Cw = w.shape[1]
        v = 0.0
        for c in range(Cw):
            cin = chans[g * Cw + c]
            for t in range(tapoff.shape[0]):
                v += w[o, c, t] * xs[n, cin, tapoff[t] + q]
        if accumulate:
            out[n, o, oy, ox] += v
        else:
            out[n, o, oy, ox] = v + bias[o]


@cuda.jit
def gather_kernel(src, gather, bias, out):
    """out[n, o, y, x] = src[n, gather[o], y, x] + bias[o]."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    o = cuda.blockIdx.y
    n = cuda.blockIdx.z
    H, W = out.shape[2], out.shape[3]
    if i < H * W:
        y = i // W
        x = i - y * W
        out[n, o, y, x] = src[n, gather[o], y, x] + bias[o]


def _phased(x: np.ndarray, lay: Layout) -> np.ndarray:
    """The phased padded wide layout, built on the host with NumPy (N, C, L)."""
    N, C, H, W = x.shape
    sh, sw = lay.stride
    t, l = lay.pad
    xp = np.zeros((N, C, lay.Hq * sh, lay.Wq * sw), np.float32)
    xp[:, :, t:t + H, l:l + W] = x
    planes = [xp[:, :, a::sh, b::sw] for a in range(sh) for b in range(sw)]
    xs = np.zeros((N, C, lay.L), np.float32)
    flat = np.concatenate([p.reshape(N, C, -1) for p in planes], axis=2)
    xs[:, :, :flat.shape[2]] = flat
    return xs


class _CudaConv:
    """Host side: tables on the device once; per call, layout, launches, copy back."""

    def __init__(self, cw, bias, geom: Geometry, form: str) -> None:
        O, Cg, kh, kw = cw.shape
        self.geom, self.form, self.O, self.Cg, self.kh, self.kw = geom, form, O, Cg, kh, kw
        self.Og = O // geom.groups
        self.bias = cuda.to_device(np.zeros(O, np.float32) if bias is None else bias)
        self.dense = None
        if form in ("conv-then-add", "add-then-conv"):
            pruned, full = P.channel_masks(cw)
            dense_local = full.copy()
            if form == "conv-then-add":
                t0 = P.shared_tables(cw, geom.groups)
                counts = np.diff(t0.zstart).reshape(geom.groups, t0.Ck).max(axis=0) if t0.Ck else np.zeros(0)
                big = np.zeros(Cg, bool)
                big[t0.kept[counts > ZCAP]] = True
                dense_local |= big
                self.t = P.shared_tables(cw, geom.groups, exclude=big)
                self.chunks = P.chunk_channels(self.t, ZCAP, multiple=1)
                self.dev = [cuda.to_device(a) for a in (self.t.zk, self.t.zchan, self.t.zstart, self.chunks,
                                                        self.t.uidx, self.t.uscale)]
            else:
                self.t = P.add_tables(cw, geom.groups)
                self.dev = [cuda.to_device(a) for a in (self.t.optr, self.t.ak, self.t.mptr, self.t.mchan, self.t.mscale)]
            chans = np.flatnonzero(dense_local)
            dt = P.dense_tables(cw, geom.groups, chans)
            if dt is not None:
                self.dense = (cuda.to_device(dt.channels), cuda.to_device(dt.weight.reshape(O, len(chans), -1)))
        elif form == "filter-gather":
            ft = P.filter_tables(cw, geom.groups)
            self.ft_gather = cuda.to_device(ft.gather)
            self.ft_n = ft.n_max
            self.w = cuda.to_device(ft.weight.reshape(ft.weight.shape[0], Cg, -1))
            self.chans = cuda.to_device(np.arange(Cg * geom.groups, dtype=np.int64))
        else:
            self.w = cuda.to_device(P.decoded_weight(cw).reshape(O, Cg, -1))
            self.chans = cuda.to_device(np.arange(Cg * geom.groups, dtype=np.int64))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        N, C, H, W = x.shape
        lay = Layout(H, W, self.kh, self.kw, self.geom, TC)
        xs = cuda.to_device(_phased(x, lay))
        tap = cuda.to_device(lay.tapoff)
        out = cuda.device_array((N, self.O, lay.Ho, lay.Wo), np.float32)
        nq = ceil_div(lay.Qw, TC)
        if self.form == "conv-then-add":
            t = self.t
            acc = cuda.device_array((N, self.O, nq * TC), np.float32)
            zk, zchan, zstart, chunks, uidx, uscale = self.dev
            if t.Ck == 0:
                out = cuda.to_device(np.broadcast_to(self.bias.copy_to_host().reshape(1, -1, 1, 1),
                                                     (N, self.O, lay.Ho, lay.Wo)).copy())
            else:
                cta_kernel[(nq, N * self.geom.groups), (TC, TY)](
                    xs, tap, zk, zchan, zstart, chunks, uidx, uscale, t.upc, t.Ck, self.Og,
                    lay.Ho, lay.Wo, lay.Wq, self.bias, acc, out)
            self._dense_part(xs, tap, lay, nq, out, N)
        elif self.form == "add-then-conv":
            optr, ak, mptr, mchan, mscale = self.dev
            E = max(1, ak.shape[0])
            a = cuda.device_array((N, E, lay.L), np.float32)
            if ak.shape[0]:
                atc_sum_kernel[(ceil_div(lay.L, TC), ak.shape[0], N), TC](xs, mptr, mchan, mscale, a)
            atc_conv_kernel[(nq, self.O, N), TC](a, tap, optr, ak, lay.Ho, lay.Wo, lay.Wq, self.bias, out)
            self._dense_part(xs, tap, lay, nq, out, N)
        elif self.form == "filter-gather":
            nd = self.w.shape[0]
            yd = cuda.device_array((N, nd, lay.Ho, lay.Wo), np.float32)
            zero = cuda.to_device(np.zeros(nd, np.float32))
            dense_kernel[(nq, nd, N), TC](xs, self.chans, tap, self.w, self.ft_n, lay.Ho, lay.Wo, lay.Wq, zero, False, yd)
            gather_kernel[(ceil_div(lay.Ho * lay.Wo, TC), self.O, N), TC](yd, self.ft_gather, self.bias, out)
        else:
            dense_kernel[(nq, self.O, N), TC](xs, self.chans, tap, self.w, self.Og, lay.Ho, lay.Wo, lay.Wq,
                                              self.bias, False, out)
        return out.copy_to_host()

    def _dense_part(self, xs, tap, lay, nq, out, N):
        if self.dense is not None:
            chans, w = self.dense
            dense_kernel[(nq, self.O, N), TC](xs, chans, tap, w, self.Og, lay.Ho, lay.Wo, lay.Wq, self.bias, True, out)


def build(cw, bias, geom: Geometry, form: str):
    """The numba.cuda implementation of ``form`` for one layer: a callable x -> y."""
    return _CudaConv(cw, bias, geom, form)


__all__ = ["build", "cta_kernel", "atc_sum_kernel", "atc_conv_kernel", "dense_kernel", "gather_kernel"]
