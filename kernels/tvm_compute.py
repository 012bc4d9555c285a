"""TVM tensor-expression computes for clustered convolutions (what, not how).

Every compute here is target independent; ``tvm_schedule`` says how to run it on ``llvm``
or ``cuda``. Shapes are static (one compiled function per layer and input shape), layout
NCHW float32.

Forms (chosen per layer by :func:`choose_form`):

Layout ("wide" rows): every stage after padding works on a flat spatial axis ``p`` in
the padded input's width. With Wq = ceil(Wp / sw) columns per output row, the padded input
is split by row and column phase (row R = sh*a + ph, column X = sw*b + pc) and flattened to
``xf[n, c, ph, pc, a*Wq + b]`` (extra zero rows / columns). Output position (h, w) is
``p = h*Wq + w`` and tap (r, s) reads plane ``((r*dh) % sh, (s*dw) % sw)`` at
``p + ((r*dh) // sh)*Wq + (s*dw) // sw`` -- affine in p with unit stride for every stride
and dilation, so any run of p is a plain vector load. Columns w >= Wo are junk and p runs
to ``P`` (>= Ho*Wq, a multiple of the schedule's tile) so that tiles need not align with
rows; ``out`` keeps the valid ones.

``shared`` (kernel unit, conv-then-add; Son with scales + TIC, KSE per-channel books)::

    z[n, k, j, p]    = sum_{r,s} book[k, j, r, s] * xf[n, zchan[k], tap(p, r, s)]
                                                                        (N, Cz, q, P)
    acc[n, o, p]     = sum_{t<Ck} scale[o, t] * z[n, g(o)*Ck + t, lidx[t, o], p]
    dense[n, o, p]   = sum_{f,r,s} dweight[o, f, r, s] * xf[n, dchan[g(o)*F + f], ...]
                                                                  (KSE full channels only)
    out[n, o, h, w]  = acc[n, o, h*Wq + w] + dense[...] + bias[o]       (N, O, Ho, Wo)

  ``Cz = groups * Ck`` z-channels (kept input channels of every group), ``q`` = the largest
  number of distinct (centroid, transform) kernels of one channel (books padded with zero
  kernels; above 15 rounded up by :func:`pad_centroids` unless it has a divisor in 6..15);
  pruned channels are simply absent. Stage 1 computes each distinct centroid
  kernel once per input channel, stage 2 gathers and accumulates.

``filter`` (filter unit): a dense conv with the n distinct filters, then a gather of output
channels: ``out[n, o, h, w] = dense[n, gather[o], h*Wq + w] + bias[o]``.

``dense`` (row / scalar units, or when sharing does not pay): decode-then-dense.

Epilogue (every form, :class:`Epilogue` in ``meta["epilogue"]``): the ``out`` stage computes
``act(conv * oscale[o] + bias[o] + residual[n, o, h, w])`` -- an inference batch-norm's scale
(its shift folded into ``bias``), a ResNet shortcut and a ReLU applied where the output is
written, instead of one more elementwise pass over it in the model.

The tables (book, lidx, ...) are built once in NumPy by :func:`shared_arrays` from
``kcompile.kernels.plan`` and passed to the compiled function as constant tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kcompile.ir import ClusteredWeight

from .plan import Geometry, dense_tables, filter_tables, shared_tables, decoded_weight, channel_masks

FORMS = ("shared", "filter", "dense")


# ----------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ConvSpec:
    """Static shape of one conv call: x (N, C, H, W), weight (O, C/groups, kh, kw)."""

    N: int
    C: int
    H: int
    W: int
    O: int
    kh: int
    kw: int
    geom: Geometry

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.geom.out_hw(self.H, self.W, self.kh, self.kw)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.O, *self.out_hw)

    @property
    def wide(self) -> tuple[int, int]:
        """(Wq, Wx): output columns per wide row and the flat input's row length Wq*sw."""
        t, l, b, r = self.geom.padding
        sw = self.geom.stride[1]
        Wq = -(-(self.W + l + r) // sw)
        return Wq, Wq * sw

    @property
    def planes(self) -> tuple[int, int]:
        """(row, column) phase planes the taps read: tap (r, s) reads plane ((r*dh) % sh,
        (s*dw) % sw). A 1x1 stride-2 conv reads only plane (0, 0); the flat input holds
        planes 0 .. n-1 per dim when those residues are exactly that range, else all sh
        (sw) of them."""
        out = []
        for k, s, d in zip((self.kh, self.kw), self.geom.stride, self.geom.dilation):
            res = {(i * d) % s for i in range(k)}
            out.append(len(res) if res == set(range(len(res))) else s)
        return out[0], out[1]

    def wide_len(self, tile: int = 1) -> int:
        """P: Ho*Wq rounded up to a multiple of ``tile``."""
        Ho, _ = self.out_hw
        n = Ho * self.wide[0]
        return -(-n // tile) * tile

    def flat_rows(self, P: int) -> int:
        """Rows Ha per phase plane of the flat input so every read of p < P is in bounds."""
        Wq, _ = self.wide
        (sh, sw), (dh, dw) = self.geom.stride, self.geom.dilation
        t, l, b, r = self.geom.padding
        last = (P - 1) + ((self.kh - 1) * dh // sh) * Wq + ((self.kw - 1) * dw) // sw
        return max(-(-(last + 1) // Wq), -(-(self.H + t + b) // sh))

    @property
    def Og(self) -> int:
        return self.O // self.geom.groups

    @property
    def Cg(self) -> int:
        return self.C // self.geom.groups


@dataclass(frozen=True)
class Epilogue:
    """What the ``out`` stage applies: ``act(conv * oscale[o] + bias[o] + residual)``, then
    an optional max-pool.

    scale: an ``oscale`` (O,) table follows ``bias`` in the arrays; residual: the function
    takes a second input of the conv's output shape (N, O, Ho, Wo) right after ``x``; relu:
    ``max(., 0)``; pool: (kernel, stride, padding) of a square max-pool (dilation 1, floor
    mode, padding < kernel) applied last, so the function returns the pooled shape
    (:func:`epilogue_out_shape`)."""

    scale: bool = False
    residual: bool = False
    relu: bool = False
    pool: tuple[int, int, int] | None = None

    def __post_init__(self):
        if self.pool is not None:
            k, s, p = self.pool
            if not (k >= 1 and s >= 1 and 0 <= p < k):
                raise ValueError(f"max-pool (kernel, stride, padding) must have 0 <= padding < kernel, got {self.pool}")

    @property
    def tag(self) -> str:
        """Short name for function names / reports ("" when nothing is applied)."""
        return "_".join(n for n, on in (("bn", self.scale), ("res", self.residual), ("relu", self.relu),
                                        ("maxpool", self.pool is not None)) if on)


def epilogue_out_shape(spec: ConvSpec, ep: Epilogue | None) -> tuple[int, int, int, int]:
    """(N, O, Hp, Wp): the shape a layer with epilogue ``ep`` returns (the conv's
    ``spec.out_shape``, max-pooled when ``ep.pool``)."""
    if ep is None or ep.pool is None:
        return spec.out_shape
    k, s, p = ep.pool
    return (spec.N, spec.O, *Geometry.make(s, p).out_hw(*spec.out_hw, k, k))


@dataclass(frozen=True)
class ConvArrays:
    """The constant tensors of one clustered conv in a given form (NumPy, C-contiguous).

    ``arrays`` maps parameter name -> array in call order (after ``x``); ``meta`` holds the
    static sizes the compute needs (q, Ck, F, n_max, identity flags)."""

    form: str
    arrays: dict
    meta: dict


# ----------------------------------------------------------------------------- tables
def _i32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a), dtype=np.int32)


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a), dtype=np.float32)


def pad_centroids(q: int) -> int:
    """The book's centroid count per z-channel: q, or for q > 15 without a divisor in 6..15
    the next multiple of 8 (zero kernels), so that the llvm schedule's stage-1 register
    block (a divisor of q below 16 centroids) stays at least 6 wide."""
    q = max(int(q), 1)
    if q <= 15 or any(q % d == 0 for d in range(6, 16)):
        return q
    return -(-q // 8) * 8


def shared_arrays(cw: ClusteredWeight, groups: int, bias) -> ConvArrays:
    """Uniform conv-then-add tables (book padded to q per z-channel); see module doc.

    book (Cz, q, kh, kw); zchan (Cz,) int32; lidx (Ck, O) uint8 (uint16 above 256 centroids);
    scale (O, Ck), or (1, 1) when every scale is 1;
    dweight (O, F, kh, kw) + dchan (groups*F,) int32 when KSE keeps full channels; bias (O,).
    """
    O, Cg, kh, kw = cw.shape
    pruned, full = channel_masks(cw)
    t = shared_tables(cw, groups)
    if t.upc != 1:
        raise ValueError("the shared TVM form needs the kernel unit")
    Ck = t.Ck
    Cz = groups * Ck
    Og = O // groups
    counts = np.diff(t.zstart)
    q = pad_centroids(int(counts.max()) if counts.size else 1)
    book = np.zeros((max(Cz, 1), q, kh * kw), np.float32)
    zchan = np.zeros(max(Cz, 1), np.int64)
    for k in range(Cz):
        a, b = t.zstart[k], t.zstart[k + 1]
        book[k, : b - a] = t.zk[a:b]
        zchan[k] = t.zchan[a] if b > a else (k // max(Ck, 1)) * Cg + t.kept[k % max(Ck, 1)]
    lidx = np.zeros((O, max(Ck, 1)), np.int64)
    scale = np.zeros((O, max(Ck, 1)), np.float32)
    if Ck:
        g = np.arange(O) // Og
        base = t.zstart[:-1][(g[:, None] * Ck + np.arange(Ck)[None, :])]
        lidx[:, :Ck] = t.uidx - base
        scale[:, :Ck] = t.uscale
    unit_scale = bool(np.all(scale == 1.0))
    # lidx in the narrowest unsigned type, channel-major (a chunk of input channels reads one
    # contiguous block), and no scale table when every scale is 1 (KSE): the gather streams
    # lidx once per position tile, and a cold 1 MB int32 (O, Ck) table (resnet18's 512x512
    # layers) made a layer 2.5x slower inside the model than in a warm loop
    arrays = {"book": _f32(book.reshape(-1, q, kh, kw)), "zchan": _i32(zchan),
              "lidx": np.ascontiguousarray(lidx.T.astype(index_dtype(q))),
              "scale": np.ones((1, 1), np.float32) if unit_scale else _f32(scale)}
    full_local = np.flatnonzero(full)
    F = len(full_local)
    if F:
        d = dense_tables(cw, groups, full_local)
        arrays["dweight"] = _f32(d.weight)
        arrays["dchan"] = _i32(d.channels)
    arrays["bias"] = _f32(np.zeros(O) if bias is None else _np(bias))
    ident = Cz == groups * Cg and bool(np.all(zchan == np.arange(len(zchan))))
    meta = {"q": q, "Ck": Ck, "F": F, "zident": ident, "unit_scale": unit_scale}
    return ConvArrays("shared", arrays, meta)


def filter_arrays(cw: ClusteredWeight, groups: int, bias) -> ConvArrays:
    """Filter unit: weight (groups*n_max, Cg, kh, kw) distinct filters, gather (O,) int32."""
    ft = filter_tables(cw, groups)
    arrays = {"weight": _f32(ft.weight), "gather": _i32(ft.gather),
              "bias": _f32(np.zeros(cw.shape[0]) if bias is None else _np(bias))}
    return ConvArrays("filter", arrays, {"n_max": ft.n_max})


def dense_arrays(cw: ClusteredWeight | np.ndarray, groups: int, bias) -> ConvArrays:
    """Decode-then-dense: weight (O, Cg, kh, kw)."""
    w = cw if isinstance(cw, np.ndarray) else decoded_weight(cw)
    arrays = {"weight": _f32(w), "bias": _f32(np.zeros(w.shape[0]) if bias is None else _np(bias))}
    return ConvArrays("dense", arrays, {})


def with_epilogue(arrays: ConvArrays, scale=None, shift=None, residual: bool | None = None,
                  relu: bool | None = None, pool: tuple[int, int, int] | None = None) -> ConvArrays:
    """``arrays`` with an epilogue (see :class:`Epilogue`): ``scale`` / ``shift`` (O,) an
    affine map per output channel (``bias`` becomes bias * scale + shift and ``oscale`` the
    scale; composes with an affine map already there), ``residual`` / ``relu`` switched on or
    off (None: unchanged), ``pool`` (kernel, stride, padding) a max-pool set (None: unchanged)."""
    ep = arrays.meta.get("epilogue") or Epilogue()
    tables = dict(arrays.arrays)
    if scale is not None or shift is not None:
        O = len(tables["bias"])
        s = np.ones(O) if scale is None else np.asarray(scale, np.float64)
        t = np.zeros(O) if shift is None else np.asarray(shift, np.float64)
        tables["bias"] = _f32(tables["bias"].astype(np.float64) * s + t)
        tables.pop("oscale", None)
        old = arrays.arrays.get("oscale")
        tables["oscale"] = _f32(s if old is None else old.astype(np.float64) * s)
        ep = Epilogue(True, ep.residual, ep.relu, ep.pool)
    ep = Epilogue(ep.scale, ep.residual if residual is None else bool(residual), ep.relu if relu is None else bool(relu),
                  ep.pool if pool is None else tuple(int(v) for v in pool))
    return ConvArrays(arrays.form, tables, {**arrays.meta, "epilogue": ep})


def _np(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu().float().numpy()
    return np.asarray(t, np.float32)


# relative cost of one vector operation of each kind against one dense direct-conv FMA
# (llvm kernels, measured on this machine: the direct conv runs near the FMA peak; stage 1
# at ~70 %, the gather at ~55 % (one z load per add); both fall to ~40 % with q > 16: small
# register blocks, chunks of few channels)
STAGE1_WEIGHT, GATHER_WEIGHT, LARGE_Q_WEIGHT = 1.4, 1.8, 2.5


def choose_form(cw: ClusteredWeight, spec: ConvSpec) -> str:
    """The cheapest form by weighted operation count: kernel unit -> ``shared`` when
    conv-then-add (stage-1 FMAs x ``STAGE1_WEIGHT`` + gather adds x ``GATHER_WEIGHT``, both x
    ``LARGE_Q_WEIGHT`` / their weight for books above 16 centroids, with the padded book size
    q) beats the dense direct conv, filter unit -> ``filter``, row / scalar units -> ``dense``
    (decode-then-dense; their factorised forms need one sub-kernel per row / tap, which the
    stage-1 conv would compute at full kernel size)."""
    if cw.unit == "filter":
        return "filter"
    if cw.unit != "kernel":
        return "dense"
    Ho, Wo = spec.out_hw
    hw = Ho * Wo
    t = shared_tables(cw, spec.geom.groups)
    counts = np.diff(t.zstart)
    q = pad_centroids(int(counts.max())) if counts.size else 0
    pruned, full = channel_masks(cw)
    Cz = spec.geom.groups * t.Ck
    w1, w2 = (STAGE1_WEIGHT, GATHER_WEIGHT) if q <= 16 else (LARGE_Q_WEIGHT, LARGE_Q_WEIGHT)
    shared = w1 * Cz * q * spec.kh * spec.kw * hw + w2 * spec.O * t.Ck * hw
    shared += spec.O * int(full.sum()) * spec.kh * spec.kw * hw
    dense = spec.O * spec.Cg * spec.kh * spec.kw * hw
    return "shared" if shared < dense else "dense"


def make_arrays(cw: ClusteredWeight, spec: ConvSpec, bias, form: str | None = None) -> ConvArrays:
    """Tables of ``cw`` in ``form`` (default: :func:`choose_form`)."""
    form = form or choose_form(cw, spec)
    if form == "shared":
        return shared_arrays(cw, spec.geom.groups, bias)
    if form == "filter":
        return filter_arrays(cw, spec.geom.groups, bias)
    if form == "dense":
        return dense_arrays(cw, spec.geom.groups, bias)
    raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")


# ----------------------------------------------------------------------------- computes
def flat_input(x, spec: ConvSpec, P: int):
    """xf[n, c, ph, pc, a*Wq + b] = padded x at row sh*a + ph, column sw*b + pc (zeros
    outside x); stage ``xpad``. Shape (N, C, nph, npw, Ha*Wq) with (nph, npw) =
    ``spec.planes`` (the planes the taps read)."""
    from tvm import te, tirx

    t, l, b, r = spec.geom.padding
    sh, sw = spec.geom.stride
    Wq, _ = spec.wide
    Ha = spec.flat_rows(P)
    H, W = spec.H, spec.W

    def f(n, c, ph, pc, i):
        h, w = (i // Wq) * sh + ph - t, (i % Wq) * sw + pc - l
        inside = tirx.all(h >= 0, h < H, w >= 0, w < W)
        return tirx.if_then_else(inside, x[n, c, tirx.max(tirx.min(h, H - 1), 0),
                                           tirx.max(tirx.min(w, W - 1), 0)],
                                 tirx.const(0.0, "float32"))

    return te.compute((spec.N, spec.C, *spec.planes, Ha * Wq), f, name="xpad")


def _tap(spec: ConvSpec, p, r, s):
    """(row plane, column plane, flat index) read by tap (r, s) at wide position p."""
    Wq, _ = spec.wide
    (sh, sw), (dh, dw) = spec.geom.stride, spec.geom.dilation
    return (r * dh) % sh, (s * dw) % sw, p + ((r * dh) // sh) * Wq + (s * dw) // sw


def centroid_conv(xf, book, zchan, spec: ConvSpec, P: int, ident: bool):
    """Stage 1: z[n, k, j, p] = sum_{r,s} book[k, j, r, s] * xf[n, zchan[k], tap(p, r, s)]."""
    from tvm import te

    Cz, q = int(book.shape[0]), int(book.shape[1])
    r = te.reduce_axis((0, spec.kh), name="r")
    s = te.reduce_axis((0, spec.kw), name="s")

    def f(n, k, j, p):
        c = k if ident else zchan[k]
        return te.sum(book[k, j, r, s] * xf[n, c, *_tap(spec, p, r, s)], axis=[r, s])

    return te.compute((spec.N, Cz, q, P), f, name="z")


def index_dtype(q: int):
    """The narrowest unsigned NumPy dtype holding local indices 0..q-1."""
    return np.uint8 if q <= 1 << 8 else np.uint16 if q <= 1 << 16 else np.int32


def gather_accumulate(z, lidx, scale, spec: ConvSpec, Ck: int, P: int, unit_scale: bool = False):
    """Stage 2: acc[n, o, p] = sum_t scale[o, t] * z[n, g(o)*Ck + t, lidx[t, o], p]
    (``unit_scale``: every scale is 1 (KSE), a plain sum of the gathered rows)."""
    from tvm import te, tirx

    Og = spec.Og
    t = te.reduce_axis((0, Ck), name="t")

    q = int(z.shape[2])

    def f(n, o, p):
        k = t if spec.geom.groups == 1 else (o // Og) * Ck + t
        # j is data dependent: bounded to [0, q) so region analysis sees the whole (small)
        # centroid axis (tables are in range; a lone centroid needs no index)
        li = lidx[t, o].astype("int32")
        if q == 1:
            j = 0
        elif q & (q - 1) == 0:
            j = tirx.floormod(li, q)  # one `and`; bounded for the region analysis
        else:
            j = tirx.min(tirx.max(li, 0), q - 1)
        if unit_scale:
            return te.sum(z[n, k, j, p], axis=t)
        return te.sum(scale[o, t] * z[n, k, j, p], axis=t)

    return te.compute((spec.N, spec.O, P), f, name="acc")


def dense_conv(xf, weight, spec: ConvSpec, P: int, chan=None, name: str = "dense"):
    """conv[n, o, p] = sum_{f,r,s} weight[o, f, r, s] * xf[n, c(o, f), tap(p, r, s)] where
    c = g(o)*F + f (or chan[g(o)*F + f] with a channel table); weight (O', F, kh, kw)."""
    from tvm import te

    Oo, F = int(weight.shape[0]), int(weight.shape[1])
    Og = Oo // spec.geom.groups
    f_ = te.reduce_axis((0, F), name="f")
    r = te.reduce_axis((0, spec.kh), name="r")
    s = te.reduce_axis((0, spec.kw), name="s")

    def f(n, o, p):
        c = f_ if spec.geom.groups == 1 else (o // Og) * F + f_
        if chan is not None:
            c = chan[c]
        return te.sum(weight[o, f_, r, s] * xf[n, c, *_tap(spec, p, r, s)], axis=[f_, r, s])

    return te.compute((spec.N, Oo, P), f, name=name)


def _x(spec: ConvSpec):
    from tvm import te

    return te.placeholder((spec.N, spec.C, spec.H, spec.W), "float32", name="x")


def out_stage(spec: ConvSpec, meta: dict, params: list, conv, bias):
    """The ``out`` compute (N, O, Ho, Wo) = act(conv(n, o, h, w) * oscale[o] + bias[o] +
    residual[n, o, h, w]) with the :class:`Epilogue` of ``meta``; with a max-pool, ``out``
    (N, O, Hp, Wp) is the maximum of that over each window. Returns (params, out, inputs):
    params + the ``oscale`` placeholder when scaled, and the extra runtime inputs (the residual
    placeholder) that follow ``x``."""
    from tvm import te, tirx

    ep = meta.get("epilogue") or Epilogue()
    oscale = te.placeholder((spec.O,), "float32", name="oscale") if ep.scale else None
    res = te.placeholder(spec.out_shape, "float32", name="residual") if ep.residual else None

    def f(n, o, h, w):
        v = conv(n, o, h, w)
        if oscale is not None:
            v = v * oscale[o]
        v = v + bias[o]
        if res is not None:
            v = v + res[n, o, h, w]
        if ep.relu:
            v = tirx.max(v, tirx.const(0.0, "float32"))
        return v

    out = te.compute(spec.out_shape, f, name="out") if ep.pool is None else _max_pool(spec, ep, f)
    return params + ([oscale] if oscale is not None else []), out, ([res] if res is not None else [])


def _max_pool(spec: ConvSpec, ep: Epilogue, f):
    """``out`` (N, O, Hp, Wp): max of f(n, o, y, x) over each k x k window (stride s, padding
    p). Out-of-range coordinates are clamped instead of masked: with p < k every window
    overlaps the image, and a clamped coordinate lands inside its own window, so the maximum
    is the one over the window's valid positions (and no branch or out-of-bounds read)."""
    from tvm import te, tirx

    k, s, p = ep.pool
    Ho, Wo = spec.out_hw

    def g(n, o, h, w):
        best = None
        for i in range(k):
            y = tirx.max(tirx.min(h * s - p + i, Ho - 1), 0)
            for j in range(k):
                v = f(n, o, y, tirx.max(tirx.min(w * s - p + j, Wo - 1), 0))
                best = v if best is None else tirx.max(best, v)
        return best

    return te.compute(epilogue_out_shape(spec, ep), g, name="out")


def shared_conv(spec: ConvSpec, meta: dict, P: int):
    """TE graph of the ``shared`` form. Returns (params, out, inputs) (see :func:`out_stage`) with params in call order
    x, book, zchan, lidx, scale[, dweight, dchan], bias. ``meta["unit_scale"]``: stage 2
    without the (all-one, KSE) scales (the ``scale`` parameter stays in the signature, 1 x 1)."""
    from tvm import te

    q, Ck, F = meta["q"], meta["Ck"], meta["F"]
    Cz = max(spec.geom.groups * Ck, 1)
    Wq = spec.wide[0]
    x = _x(spec)
    book = te.placeholder((Cz, q, spec.kh, spec.kw), "float32", name="book")
    zchan = te.placeholder((Cz,), "int32", name="zchan")
    lidx = te.placeholder((max(Ck, 1), spec.O), np.dtype(index_dtype(q)).name, name="lidx")
    unit = meta.get("unit_scale", False)
    scale = te.placeholder((1, 1) if unit else (spec.O, max(Ck, 1)), "float32", name="scale")
    bias = te.placeholder((spec.O,), "float32", name="bias")
    params = [x, book, zchan, lidx, scale]
    xf = flat_input(x, spec, P)
    parts = []
    if Ck:
        z = centroid_conv(xf, book, zchan, spec, P, meta["zident"])
        parts.append(gather_accumulate(z, lidx, scale, spec, Ck, P, meta.get("unit_scale", False)))
    if F:
        dweight = te.placeholder((spec.O, F, spec.kh, spec.kw), "float32", name="dweight")
        dchan = te.placeholder((spec.geom.groups * F,), "int32", name="dchan")
        params += [dweight, dchan]
        parts.append(dense_conv(xf, dweight, spec, P, chan=dchan))
    params.append(bias)

    def conv(n, o, h, w):
        v = parts[0][n, o, h * Wq + w] if parts else 0.0
        for part in parts[1:]:
            v = v + part[n, o, h * Wq + w]
        return v

    return out_stage(spec, meta, params, conv, bias)


def filter_conv(spec: ConvSpec, meta: dict, P: int):
    """TE graph of the ``filter`` form: params x, weight, gather, bias."""
    from tvm import te

    n_max = meta["n_max"]
    Wq = spec.wide[0]
    x = _x(spec)
    weight = te.placeholder((spec.geom.groups * n_max, spec.Cg, spec.kh, spec.kw), "float32", name="weight")
    gather = te.placeholder((spec.O,), "int32", name="gather")
    bias = te.placeholder((spec.O,), "float32", name="bias")
    d = dense_conv(flat_input(x, spec, P), weight, spec, P, name="dense")
    return out_stage(spec, meta, [x, weight, gather, bias], lambda n, o, h, w: d[n, gather[o], h * Wq + w], bias)


def decoded_conv(spec: ConvSpec, meta: dict, P: int):
    """TE graph of the ``dense`` form: params x, weight, bias."""
    from tvm import te

    Wq = spec.wide[0]
    x = _x(spec)
    weight = te.placeholder((spec.O, spec.Cg, spec.kh, spec.kw), "float32", name="weight")
    bias = te.placeholder((spec.O,), "float32", name="bias")
    d = dense_conv(flat_input(x, spec, P), weight, spec, P, name="dense")
    return out_stage(spec, meta, [x, weight, bias], lambda n, o, h, w: d[n, o, h * Wq + w], bias)


COMPUTES = {"shared": shared_conv, "filter": filter_conv, "dense": decoded_conv}


def prim_func(spec: ConvSpec, arrays: ConvArrays, P: int | None = None, name: str = "main"):
    """An unscheduled TIR PrimFunc of the layer (params: x, [residual (N, O, Ho, Wo) with a
    residual epilogue], *arrays, out (N, O, Ho, Wo));
    ``P`` is the wide spatial length (default ``spec.wide_len()``; schedules pick a multiple
    of their tile)."""
    from tvm import te

    P = spec.wide_len() if P is None else P
    if P < spec.wide_len():
        raise ValueError(f"P={P} is shorter than the {spec.wide_len()} wide positions")
    params, out, inputs = COMPUTES[arrays.form](spec, arrays.meta, P)
    names = [p.op.name for p in params[1:]]
    if names != list(arrays.arrays):
        raise AssertionError(f"parameter order {names} != tables {list(arrays.arrays)}")
    return te.create_prim_func([params[0], *inputs, *params[1:], out]).with_attr("global_symbol", name)
