"""Hand-written TIR schedules (how) for the computes of ``tvm_compute`` (what).

All computes work on the wide flat spatial axis p (see ``tvm_compute``), so a register tile
is any run of lanes*nv positions, whatever the row length.

``llvm`` (x86; vector width, register count and L1d size from :mod:`.cpu_isa`, so that a
register block sized for AVX-512's 32 zmm does not spill on AVX2's 16 ymm), ``shared``
form -- the blocking of a GEMM applied to a gather:

- the output is tiled into TL = lanes*nv positions (lanes: 16 AVX-512, 8 AVX2); the parallel loop runs over batch x
  (output-channel groups og, only when there are fewer than ``OG_TASKS`` tiles per
  thread; z is then recomputed per group) x tiles, never over input channels;
- for each tile, the input channels are processed in chunks of CC whose stage-1 result
  (``z``, CC x q x TL) fits L1 (``ZCHUNK_L1_SHARE``; for large q, L2 when that saves
  enough accumulator reloads: ``Z_L2``), computed by ``compute_at`` just before
  the chunk is consumed (fused: z never reaches DRAM);
- stage 2 for a chunk: OB outputs x nv vectors of accumulators in registers across the
  chunk's channels (loaded / stored once per chunk from the tile's acc rows), one z vector
  load per add, per (o, t) one index load + mask + multiply (``lidx % q`` for power-of-two
  q: one ``and``); KSE's all-one scales are dropped (``meta["unit_scale"]``: plain adds);
- stage 1 for a chunk: a register block of zj centroids x zv position vectors, kept in a
  small ``cache_write`` buffer that LLVM promotes to registers (it must stay a stack
  alloca, < 1 KB: larger "global" / any "local" buffers become heap workspaces and every
  FMA goes through memory -- the old reduction-into-z form also paid a zero-store pass);
  taps unrolled, one broadcast weight per tap feeds zv FMAs;
- tile sizes: :func:`llvm_tiles` minimises :func:`shared_tile_cost` (padding of P, gather
  scalar overhead ~1/nv, accumulator reloads ~2/CC, z rows that split cache lines,
  stage-1 recomputation, balance of the parallel tasks over the threads) within the ISA's
  accumulator budget (:func:`acc_budget`); ``tvm_tune.search_tiles`` can time alternatives;
- ``xpad`` (flat padded input) and ``out`` (valid columns + bias, and the layer's epilogue:
  batch-norm scale, residual add, ReLU, max-pool) are separate parallel, vectorised passes
  (a pooled ``out`` is left to LLVM's vectoriser: :func:`_schedule_out_llvm`).

``llvm``, ``filter`` / ``dense`` forms (and KSE's full channels): a direct conv with OB
outputs x nv vectors of accumulators (up to ``DIRECT_REG_SHARE`` of the registers), the input vector of a tap
shared by the OB outputs, the weight broadcast shared by the nv vectors
(:func:`direct_tiles`); parallel tasks position-major (:func:`_schedule_direct_block`).

``cuda``: a thread block owns (n, OB outputs, TP positions), one thread per position with
OB register accumulators; stage 1 for a chunk of CC input channels is computed
cooperatively into shared memory (``z`` in ``shared`` scope) before the chunk's gather.
Depthwise layers (one channel per group) compute z per thread in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

from .cpu_isa import VectorIsa, host_isa
from .tvm_compute import ConvArrays, ConvSpec

# register and cache budgets are fractions of the host's (``cpu_isa``; measured on AVX-512:
# 16 of 32 zmm for the shared form's accumulators, 24 for a direct conv's, a z chunk of
# 32 KB of the 48 KB L1d)
# accumulator vectors of the shared form's gather (OB * nv), by ISA. The gather's index
# arithmetic needs registers too (LLVM vectorises a block's uint8 index loads and address
# math into up to ~10 xmm registers). AVX-512's half of 32 zmm was measured on the Xeon of
# the first stops. On AVX2 (16 ymm; znver3, 2 threads, interleaved tile searches) blocks of
# 6-8 accumulators lost to blocks of 4 on most KSE layers. The heuristic's tiles with this
# budget (and SPLIT_ROW, STAGE1_TAP_REGS below) against the ones with 8, on resnet18's seven
# shapes at q=8 and q=O/4: faster on 9 of 12 that changed (128@28 q=8 0.80 -> 0.59 ms, 128@28
# q=32 1.28 -> 1.06 ms), slower on 256->512@14/2 q=8 (0.39 -> 0.43 ms) and 64@56 q=16
# (1.19 -> 1.34 ms), even on 512@7 q=8
ACC_REG_SHARE = {"avx512": 0.5, "avx2": 0.25, "sse": 0.25}
DIRECT_REG_SHARE = 0.75  # accumulator vectors of a direct conv (the rest: inputs, a weight)
ZCHUNK_L1_SHARE = 2 / 3  # z chunk (CC channels x q x TL floats) per L1d


@dataclass(frozen=True)
class LlvmTiles:
    """Tile sizes of the llvm schedules (positions are on the wide flat axis p):

    og: output-channel groups in the parallel loop; OB: outputs per register block;
    nv: vectors per register block (TL = vec*nv positions); ZT: positions per z
    tile (a multiple of TL); P: the padded wide length (a multiple of ZT)."""

    og: int
    OB: int
    nv: int
    ZT: int
    P: int
    CC: int = 0  # input channels per z chunk (0: all channels at once)
    zv: int = 0  # stage 1: position vectors per register block (0: auto)
    zj: int = 0  # stage 1: centroids per register block (0: auto)
    vec: int = 16  # float lanes per vector (the ISA's: 16 AVX-512, 8 AVX2)

    @property
    def TL(self) -> int:
        return self.vec * self.nv


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# cost model of the llvm shared schedule (fitted to measurements on this machine, KSE q=8
# resnet18 shapes, 1 thread): per (output, input channel) the gather pays a few scalar
# instructions (index load, mask, multiply) amortised over nv vector adds (GATHER_SCALAR/nv),
# each z chunk of CC channels reloads/stores the tile's accumulators (~ACC_RELOAD*2/CC), and
# (AVX-512) stage 1 is fastest with 3-vector register blocks (nv a multiple of 3)
GATHER_SCALAR = 0.6
ACC_RELOAD = 0.5
# stage 1 without a 3-vector register block (see _stage1_block), where the 27 tap vectors of
# a 3x3 kernel fit the register file (32 registers: AVX-512); with 16 registers they do not
# and nv = 4 beat nv = 3 (above)
STAGE1_NOT3 = 1.3
STAGE1_TAP_REGS = 32
# a z row of TL floats that is not a whole number of cache lines (AVX2 with odd nv: 8-float
# vectors, 64-byte lines) makes every other gather load a split load. Measured on AVX2 at 2
# threads, KSE q=8, CC=16: nv=3 took 0.92 / 0.35 / 0.66 ms where nv=4 took 0.72 / 0.20 /
# 0.41 ms (256@14, 128->256@28/2, 128@28)
SPLIT_ROW = 0.5
CACHE_LINE = 64
# with fewer than OG_TASKS parallel tasks per thread the output channels are split over the
# threads too (og > 1; each group recomputes its tile's z). Measured at 2 threads on the
# resnet18 shapes with at most 3 position tiles (256@14, 512@7 and both stride-2 convs
# into them): 1.17-1.39x faster than one task per thread, although the split repeats
# stage 1 -- counted at OG_RECOMPUTE of its operations (its z tile stays in L1)
OG_TASKS = 2
OG_RECOMPUTE = 0.5
# a z chunk may outgrow L1 (up to ZCHUNK_L2_SHARE of L2) when that saves enough accumulator
# reloads: every gather load then comes from L2, counted at Z_L2 of an add. Fitted on
# AVX2 (znver3, 2 threads) to KSE q=128 at 512@7, nv=2: CC=2 (z in L1) 1.74 ms, CC=4 1.54,
# CC=8 (64 KB, L2) 1.38, CC=16 (128 KB) 1.62; q=64 at 256@14 ran fastest with CC=8 (64 KB)
Z_L2 = 0.35
ZCHUNK_L2_SHARE = 0.125
# outputs per gather register block, by ISA: on AVX2 (znver3) 4 outputs lost to 2 or 1 on
# every large-q shape tried (q=128 at 512@7, nv=2, CC=8: OB=4 1.57 ms, OB=2 1.38, OB=1 1.39;
# the stride-2 convs alike); AVX-512's 4 was measured on the Xeon of the first stops
GATHER_OB = {"avx512": (4, 2, 1), "avx2": (2, 1), "sse": (2, 1)}


# strided direct convs take at most 4 outputs per register block: every stride-2 shape measured
# (resnet18's 3x3 s2 convs dense and with O/4 filters, the 7x7 stem, 1x1 s2 downsamples; 2
# threads, interleaved rounds) ran 1.17-1.46x slower with 8 outputs x nv vectors than with
# 4 x nv, and no 4-output block lost to an 8-output one
DIRECT_OB_STRIDED = (4, 3, 2, 1)


def direct_tiles(spec: ConvSpec, Oo: int, threads: int = 2, isa: VectorIsa | None = None) -> LlvmTiles:
    """Register block of a direct conv with Oo outputs (``filter`` / ``dense`` forms): OB
    outputs x nv vectors, per tap nv input loads + OB weight broadcasts feed OB*nv FMAs;
    minimises (padding of P) x (loads per FMA) / (balance of the parallel tasks); OB <= 4
    for strided convs (``DIRECT_OB_STRIDED``); at most ``DIRECT_REG_SHARE`` of the ISA's
    registers hold accumulators."""
    isa = isa or host_isa()
    VEC, regs = isa.lanes, int(isa.regs * DIRECT_REG_SHARE)
    Og = Oo // spec.geom.groups
    base = spec.wide_len()
    best = None
    strided = max(spec.geom.stride) > 1
    for OB in DIRECT_OB_STRIDED if strided else (8, 6, 4, 3, 2, 1):
        if Og % OB:
            continue
        for nv in range(1, regs // OB + 1):
            P = spec.wide_len(VEC * nv)
            tasks = spec.N * (Oo // OB) * (P // (VEC * nv))
            balance = tasks / (threads * -(-tasks // threads))
            score = P / base * (1 + 0.5 * (nv + OB) / (OB * nv)) / balance
            if best is None or score < best[0] - 1e-9:
                best = (score, OB, nv, P)
    _, OB, nv, P = best
    return LlvmTiles(1, OB, nv, VEC * nv, P, vec=VEC)


STAGE1_CHAINS = 6  # stage 1: independent accumulators wanted (9-FMA chains, 4-cycle latency)


def _stage1_block(nzv: int, q: int, tl: LlvmTiles) -> tuple[int, int]:
    """(zv, zj): stage 1's register block, zj centroids x zv position vectors (zv | nzv,
    zj | q). Long position rows first (one broadcast weight per tap feeds zv FMAs; measured
    ~10 % faster than 8 centroids x 1 vector; 3 vectors -- the 27 tap vectors of a 3x3
    kernel stay in registers for every centroid -- ~25 % faster again), then the fewest
    centroids giving ``STAGE1_CHAINS`` accumulators. The block must stay a stack alloca
    (< 1 KB) -- larger buffers become heap workspaces and every FMA goes through memory."""
    def fits(zv, zj):
        return zv * zj * tl.vec * 4 < 1024

    if not tl.zv and nzv % 3 == 0:
        zv = 3  # 27 tap vectors stay in registers across the centroids (measured best)
    else:
        zv = max(d for d in _divisors(nzv) if d <= (tl.zv or 8) and fits(d, 1))
    if tl.zj:
        zj = max(d for d in _divisors(q) if d <= tl.zj and fits(zv, d))
    else:
        ok = [d for d in _divisors(q) if fits(zv, d)]
        zj = next((d for d in ok if d * zv >= STAGE1_CHAINS), ok[-1])
    return zv, zj


def _reload(CC: int) -> float:
    """Accumulator loads + stores per gather add with CC channels per chunk (0: all): 2/CC,
    and below ~4 channels per chunk the store port saturates (measured: q=64 at CC=1 is
    2.6x slower than at CC=4)."""
    return ACC_RELOAD * (2 / CC) * (1 + 2 / CC) if CC else 0.0


def _chunk(Ck: int, q: int, TL: int, groups: int, isa: VectorIsa) -> tuple[int, float]:
    """(CC, gather cost factor): input channels per z chunk (0: all channels at once, or a
    grouped conv: no chunking) and the gather's relative cost 1 + reloads (+ ``Z_L2`` when
    the chunk's z, CC x q x TL floats, lives in L2 rather than L1). The cheapest chunk of at
    most ``ZCHUNK_L2_SHARE`` of L2."""
    if groups != 1 or Ck <= 1:
        return 0, 1.0
    l1, l2 = isa.l1d * ZCHUNK_L1_SHARE, isa.l2 * ZCHUNK_L2_SHARE
    best = None
    for d in _divisors(Ck):
        z = d * q * TL * 4
        if z > l2 and d > 1:
            break
        cc = 0 if d == Ck else d
        cost = 1 + _reload(cc) + (Z_L2 if z > l1 else 0.0)
        if best is None or cost < best[1] - 1e-9:
            best = (cc, cost)
    return best


def shared_tile_cost(spec: ConvSpec, meta: dict, nv: int, threads: int = 2,
                     isa: VectorIsa | None = None) -> tuple[float, LlvmTiles]:
    """(relative cost, tiles) of the shared schedule with nv vectors per register row: the
    padding of P, stage 1 (recomputed per output group og), the gather overheads (see
    ``GATHER_SCALAR`` / ``ACC_RELOAD``) and the balance of the parallel tasks over threads.
    nv must be at most the accumulator budget (:func:`acc_budget`)."""
    isa = isa or host_isa()
    budget = acc_budget(isa)
    if not 1 <= nv <= budget:
        raise ValueError(f"nv={nv} outside 1..{budget} accumulator vectors")
    Ck, q = max(meta.get("Ck", 1), 1), max(meta.get("q", 1), 1)
    Cz = spec.geom.groups * Ck
    TL = isa.lanes * nv
    P = spec.wide_len(TL)
    tiles = spec.N * (P // TL)
    OB = next(ob for ob in GATHER_OB[isa.name] if spec.Og % ob == 0 and ob * nv <= budget)
    og = threads if tiles < OG_TASKS * threads and (spec.O // OB) % threads == 0 and spec.geom.groups == 1 else 1
    tasks = tiles * og
    balance = tasks / (threads * -(-tasks // threads))
    CC, gather = _chunk(Ck, q, TL, spec.geom.groups, isa)
    s1 = Cz * q * spec.kh * spec.kw
    s2 = spec.O * Ck
    not3 = STAGE1_NOT3 if nv % 3 and isa.regs >= STAGE1_TAP_REGS else 1.0
    work = s1 * (1 + OG_RECOMPUTE * (og - 1)) * not3 \
        + s2 * (1 + GATHER_SCALAR / nv) * gather * (1 + SPLIT_ROW * (TL * 4 % CACHE_LINE != 0))
    cost = P / spec.wide_len() * work / (s1 + s2) / balance
    return cost, LlvmTiles(og, OB, nv, TL, P, CC, vec=isa.lanes)


def acc_budget(isa: VectorIsa | None = None) -> int:
    """Accumulator vectors of one gather register block (OB * nv) on ``isa``:
    ``ACC_REG_SHARE`` of its registers."""
    isa = isa or host_isa()
    return int(isa.regs * ACC_REG_SHARE[isa.name])


def nv_range(isa: VectorIsa | None = None) -> range:
    """Register row lengths (vectors) the shared schedule considers: 1..8 within the
    accumulator budget."""
    isa = isa or host_isa()
    return range(1, min(8, acc_budget(isa)) + 1)


def llvm_tiles(spec: ConvSpec, meta: dict, threads: int = 2, isa: VectorIsa | None = None) -> LlvmTiles:
    """Pick tile sizes for ``spec`` (see module doc); deterministic, shape driven: the
    register row length nv (1..8 vectors) minimising :func:`shared_tile_cost`. The z tile
    is one register tile; its channels are processed in chunks of CC whose z fits L1; with
    fewer than ``OG_TASKS`` tiles per thread the output channels are split too (z
    recomputed). Direct
    convs (``filter`` / ``dense`` forms, no stage 1): :func:`direct_tiles`."""
    isa = isa or host_isa()
    if not meta.get("Ck"):
        Oo = spec.geom.groups * meta["n_max"] if "n_max" in meta else spec.O
        return direct_tiles(spec, Oo, threads, isa)
    cands = [shared_tile_cost(spec, meta, nv, threads, isa) for nv in nv_range(isa)]
    return min(cands, key=lambda c: c[0] - 1e-9 * c[1].nv)[1]


# ----------------------------------------------------------------------------- helpers
def iter_loops(sch, block, depth: int) -> list:
    """For each iteration variable of ``block``, the loop (at nesting depth >= ``depth``)
    that binds it, or None (unit extent, or bound only by outer loops). Loops created by
    ``compute_at`` bind one iteration variable each; this finds them by variable."""
    import tvm

    loops = sch.get_loops(block)[depth:]
    if not loops:
        return [None] * len(sch.get(block).iter_vars)
    realize = sch.get(loops[-1]).body
    while not hasattr(realize, "iter_values"):
        realize = realize.body if hasattr(realize, "body") else realize.seq[0]
    var_of = {sch.get(lp).loop_var: lp for lp in loops}
    found = []
    for value in realize.iter_values:
        hit = [var_of[v] for v in tvm.tirx.analysis.undefined_vars(value) if v in var_of]
        found.append(hit[0] if hit else None)
    return found


def _present(*loops):
    return [lp for lp in loops if lp is not None]

# ----------------------------------------------------------------------------- llvm
def _schedule_pad_llvm(sch, spec: ConvSpec) -> None:
    """xpad (N, C, nph, npw, Ha*Wq): planes in parallel, each row one vectorised select."""
    blk = sch.get_sblock("xpad")
    n, c, ph, pc, i = sch.get_loops(blk)
    h, w = sch.split(i, [None, spec.wide[0]])
    sch.parallel(sch.fuse(n, c))
    sch.vectorize(w)


def _schedule_out_llvm(sch, meta: dict | None = None) -> None:
    """out (N, O, Ho, Wo): the valid columns of the wide rows (+ bias), vectorised rows.
    With a max-pool epilogue the columns are read at stride s: TVM would gather each lane
    with a scalar load, so the row loop is left to LLVM's vectoriser (the stem of resnet18
    with its 3x3/2 max-pool: 2.02 ms plain loop, 2.45 ms TVM-vectorised, against 1.98 ms for
    the unpooled kernel; 2 threads)."""
    blk = sch.get_sblock("out")
    n, o, h, w = sch.get_loops(blk)
    sch.parallel(sch.fuse(n, o))
    ep = (meta or {}).get("epilogue")
    if ep is None or ep.pool is None:
        sch.vectorize(w)


def schedule_shared_llvm(sch, spec: ConvSpec, meta: dict, tl: LlvmTiles) -> None:
    """The blocked, fused schedule of the ``shared`` form (module doc)."""
    _schedule_pad_llvm(sch, spec)
    _schedule_out_llvm(sch, meta)
    if meta["Ck"]:
        acc = sch.get_sblock("acc")
        n, o, p, t = sch.get_loops(acc)
        og, oo, oi = sch.split(o, [tl.og, None, tl.OB])
        VEC = tl.vec
        zt, pt, pv, pl = sch.split(p, [None, tl.ZT // tl.TL, tl.nv, VEC])
        chunked = 0 < tl.CC < meta["Ck"] and spec.geom.groups == 1
        if chunked:
            # z of CC channels (L1) per chunk; the accumulators of the tile live in the acc
            # buffer (L1/L2) across chunks and in registers within one
            tc, ti = sch.split(t, [None, tl.CC])
            sch.reorder(n, og, zt, pt, tc, oo, ti, oi, pv, pl)
        else:
            sch.reorder(n, og, zt, oo, pt, t, oi, pv, pl)
        outer = sch.fuse(n, og, zt)
        sch.parallel(outer)
        sch.vectorize(pl)
        sch.unroll(pv)
        sch.unroll(oi)
        sch.decompose_reduction(acc, tc if chunked else t)
        z = sch.get_sblock("z")
        at = tc if chunked else outer
        sch.compute_at(z, at)
        zdepth = 1 + next(i for i, lp in enumerate(sch.get_loops(z)) if sch.get(lp).same_as(sch.get(at)))
        _, zk, zj, zp, zr, zs = iter_loops(sch, z, zdepth)
        nzv = sch.get(zp).extent.value // VEC
        # register block of stage 1: ji centroids x zv position vectors (_stage1_block)
        q = meta["q"] if zj is not None else 1
        zv, ji = _stage1_block(nzv, q, tl)
        zpo, zpv, zpi = sch.split(zp, [None, zv, VEC])
        taps = _present(zr, zs)
        if zj is not None:
            jo, jj = sch.split(zj, [None, ji])
            sch.reorder(*_present(zk, zpo, jo, *taps, jj, zpv, zpi))
            anchor = jo
            sch.unroll(jj)
        else:
            sch.reorder(*_present(zk, zpo, *taps, zpv, zpi))
            anchor = zpo
        # per tap: zv input vectors and ji broadcast weights feed ji*zv FMAs
        wb = sch.cache_write(z, 0, "global")  # "global": a stack alloca when < 1 KB
        sch.reverse_compute_at(wb, anchor)
        wl = sch.get_loops(wb)
        wp = wl[-1]
        wpv, wpi = sch.split(wp, [None, VEC])
        if zj is not None:
            sch.unroll(wl[-2])
        sch.unroll(wpv)
        sch.vectorize(wpi)
        sch.unroll(zpv)
        sch.vectorize(zpi)
        for lp in taps:
            sch.unroll(lp)
        if taps:
            sch.decompose_reduction(z, taps[0])
    if meta["F"]:
        _schedule_direct_block(sch, spec, "dense", tl)


def _schedule_direct_block(sch, spec: ConvSpec, name: str, tl: LlvmTiles) -> None:
    """A direct conv block (N, O', P) with reductions (f, r, s): OB outputs x nv vectors
    of accumulators, the input vector of a tap shared by the OB outputs.

    Parallel tasks are (position tile, output block), position-major: consecutive tasks of a
    thread reuse one tile's input rows (L1/L2) for every output block and stream the weights,
    which are small or L2-resident. Output-block-major order re-read the whole input from L3
    for every output block: measured on the AVX2 host at 2 threads (interleaved, median of 5
    rounds), position-major was 1.0-1.7x faster on every direct conv of resnet18 -- the 7x7
    stem, the 1x1 stride-2 downsamples, and all seven O/4-filter 3x3 shapes (64->128@56/2:
    0.90 -> 0.54 ms; 512@7: 0.92 -> 0.61 ms) -- and slower on none."""
    d = sch.get_sblock(name)
    n, o, p, f, r, s_ = sch.get_loops(d)
    Oo = sch.get(o).extent.value
    OB = next(ob for ob in (tl.OB, 4, 2, 1) if Oo % ob == 0)
    oo, oi = sch.split(o, [None, OB])
    pt, pv, pl = sch.split(p, [None, tl.nv, tl.vec])
    sch.reorder(n, pt, oo, f, r, s_, oi, pv, pl)
    sch.parallel(sch.fuse(n, pt, oo))
    sch.vectorize(pl)
    sch.unroll(pv)
    sch.unroll(oi)
    sch.decompose_reduction(d, f)


def schedule_direct_llvm(sch, spec: ConvSpec, tl: LlvmTiles, meta: dict | None = None) -> None:
    """Direct conv (``filter`` / ``dense`` forms) + the gather / bias epilogue."""
    _schedule_pad_llvm(sch, spec)
    _schedule_out_llvm(sch, meta)
    _schedule_direct_block(sch, spec, "dense", tl)


# ----------------------------------------------------------------------------- cuda
@dataclass(frozen=True)
class CudaTiles:
    """CUDA tiles: TP positions (threads) per block, OB outputs per thread, CC channels per
    shared-memory z chunk; P the padded wide length (a multiple of TP)."""

    TP: int
    OB: int
    CC: int
    P: int


SHARED_BYTES = 40 * 1024


def cuda_tiles(spec: ConvSpec, meta: dict) -> CudaTiles:
    base = spec.wide_len()
    TP = 32 if base <= 32 else 64 if base <= 1024 else 128
    OB = next(ob for ob in (8, 4, 2, 1) if spec.Og % ob == 0)
    Ck = max(meta.get("Ck", 1), 1)
    q = meta.get("q", 1)
    CC = max([d for d in _divisors(Ck) if d * q * TP * 4 * OB <= SHARED_BYTES] or [1])
    return CudaTiles(TP, OB, CC, spec.wide_len(TP))


def _bind_elementwise_cuda(sch, name: str, threads: int = 128) -> None:
    blk = sch.get_sblock(name)
    f = sch.fuse(*sch.get_loops(blk))
    bx, tx = sch.split(f, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def _local_accumulator_cuda(sch, name: str, tl: CudaTiles):
    """Block ``name`` (N, O', P) + reductions: thread block = (n, OB outputs, TP positions),
    one thread per position keeping OB accumulators in registers. Returns (acc_local block,
    the reduction loops under the thread loop)."""
    loc = sch.get_sblock(name)  # keeps the reduction, now into a local buffer
    back = sch.cache_write(loc, 0, "local")  # the write-back block
    n, o, p = sch.get_loops(back)
    Oo = sch.get(o).extent.value
    OB = next(ob for ob in (tl.OB, 4, 2, 1) if Oo % ob == 0)
    oo, oi = sch.split(o, [None, OB])
    pt, pl = sch.split(p, [None, tl.TP])
    sch.reorder(n, oo, pt, pl, oi)
    sch.bind(sch.fuse(n, oo, pt), "blockIdx.x")
    sch.bind(pl, "threadIdx.x")
    sch.compute_at(loc, pl)
    return loc, pl


def schedule_shared_cuda(sch, spec: ConvSpec, meta: dict, tl: CudaTiles) -> None:
    """Shared form on CUDA: a thread block owns (n, OB outputs, TP positions); for each
    chunk of CC input channels the block computes z (CC x q x TP) cooperatively into shared
    memory, then every thread adds its OB outputs' gathered z values in registers."""
    _bind_elementwise_cuda(sch, "xpad")
    _bind_elementwise_cuda(sch, "out")
    if meta["Ck"]:
        loc, pl = _local_accumulator_cuda(sch, "acc", tl)
        lo = iter_loops(sch, loc, 2)
        ao, at = lo[1], lo[3]
        z = sch.get_sblock("z")
        if at is None:  # one channel per group (depthwise): nothing to share across threads
            sch.set_scope(z, 0, "local")
            sch.compute_at(z, pl)
        else:
            ato, ati = sch.split(at, [None, tl.CC])
            sch.reorder(*_present(ato, ati, ao))
            sch.decompose_reduction(loc, ato)
            sch.set_scope(z, 0, "shared")  # before compute_at: the region spans the block's threads
            sch.compute_at(z, ato)
            _, zk, zj, zp, zr, zs = iter_loops(sch, z, 3)
            f = sch.fuse(*_present(zk, zj, zp))
            fo, fi = sch.split(f, [None, tl.TP])
            sch.bind(fi, "threadIdx.x")
            for lp in _present(zr, zs):
                sch.unroll(lp)
    if meta["F"]:
        dl, _ = _local_accumulator_cuda(sch, "dense", tl)
        sch.decompose_reduction(dl, _present(*iter_loops(sch, dl, 2)[3:])[0])


def schedule_direct_cuda(sch, spec: ConvSpec, tl: CudaTiles) -> None:
    """Direct conv on CUDA: a thread per (output position) x OB outputs, registers for the
    accumulators, the gather / bias epilogue elementwise."""
    _bind_elementwise_cuda(sch, "xpad")
    _bind_elementwise_cuda(sch, "out")
    dl, _ = _local_accumulator_cuda(sch, "dense", tl)
    sch.decompose_reduction(dl, _present(*iter_loops(sch, dl, 2)[3:])[0])


# ----------------------------------------------------------------------------- entry
def plan_tiles(spec: ConvSpec, arrays: ConvArrays, target_kind: str, threads: int = 2):
    """Tiles for ``target_kind``; their ``P`` is the wide length the compute must use."""
    if target_kind == "llvm":
        return llvm_tiles(spec, arrays.meta, threads)
    if target_kind == "cuda":
        return cuda_tiles(spec, arrays.meta)
    raise ValueError(f"no schedule for target {target_kind!r}")


def schedule(func, spec: ConvSpec, arrays: ConvArrays, target_kind: str, tiles):
    """A scheduled IRModule of ``func`` (``tvm_compute.prim_func(spec, arrays, tiles.P)``)
    for ``target_kind`` in {"llvm", "cuda"}."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    if target_kind == "llvm":
        if arrays.form == "shared":
            schedule_shared_llvm(sch, spec, arrays.meta, tiles)
        else:
            schedule_direct_llvm(sch, spec, tiles, arrays.meta)
    elif target_kind == "cuda":
        if arrays.form == "shared":
            schedule_shared_cuda(sch, spec, arrays.meta, tiles)
        else:
            schedule_direct_cuda(sch, spec, tiles)
    else:
        raise ValueError(f"no schedule for target {target_kind!r}")
    return sch.mod


# ----------------------------------------------------------------------------- build
def make_target(kind: str, threads: int | None = None):
    """A ``tvm.target.Target`` for ``kind`` ("llvm": this host's CPU; "cuda": sm_80 by default,
    buildable without a GPU)."""
    import tvm

    if kind == "llvm":
        cfg = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
        if threads:
            cfg["num-cores"] = int(threads)
        return tvm.target.Target(cfg)
    if kind == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host=make_target("llvm"))
    raise ValueError(f"unknown target {kind!r}; expected llvm or cuda")


@dataclass(frozen=True)
class LayerModule:
    """A scheduled layer: ``mod`` (IRModule with one PrimFunc ``name``), the constant
    ``arrays`` it takes after x, and its ``tiles``."""

    mod: object
    spec: ConvSpec
    arrays: ConvArrays
    tiles: object
    name: str


def layer_module(spec: ConvSpec, arrays: ConvArrays, target_kind: str, threads: int = 2,
                 name: str = "main", tiles=None) -> LayerModule:
    """Compute (``tvm_compute.prim_func``) + schedule for one layer (``tiles``: override
    the heuristic :func:`plan_tiles`, e.g. from tuning)."""
    from .tvm_compute import prim_func

    tiles = plan_tiles(spec, arrays, target_kind, threads) if tiles is None else tiles
    func = prim_func(spec, arrays, tiles.P, name=name)
    mod = schedule(func, spec, arrays, target_kind, tiles)
    if name != "main":
        import tvm

        mod = tvm.IRModule({name: mod["main"].with_attr("global_symbol", name)})
    return LayerModule(mod, spec, arrays, tiles, name)


class CompiledConv:
    """One clustered conv compiled by TVM for a fixed input shape (llvm: runnable here).

    ``y = conv(x)``: x (N, C, H, W) float32 numpy -> y (N, O, Ho, Wo). Attributes: ``form``
    ("shared" / "filter" / "dense"), ``tiles``, ``layer`` (the :class:`LayerModule`),
    ``executable`` (the built module)."""

    def __init__(self, cw, bias=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups: int = 1,
                 input_shape=None, target: str = "llvm", form: str | None = None, threads: int = 2,
                 tiles=None) -> None:
        import tvm

        from kcompile.errors import UsageError

        from .plan import Geometry
        from .tvm_compute import make_arrays

        geom = Geometry.make(stride, padding, dilation, groups)
        if input_shape is None or len(input_shape) != 4:
            raise UsageError(f"input_shape must be (N, C, H, W), got {input_shape}")
        N, C, H, W = (int(v) for v in input_shape)
        O, Cg, kh, kw = cw.shape
        if C != Cg * geom.groups:
            raise UsageError(f"input has {C} channels, the weight expects {Cg * geom.groups}")
        spec = ConvSpec(N, C, H, W, O, kh, kw, geom)
        spec.out_hw  # validates the size
        self.spec = spec
        self.arrays = make_arrays(cw.detached(), spec, bias, form)
        self.form = self.arrays.form
        self.layer = layer_module(spec, self.arrays, target, threads, tiles=tiles)
        self.tiles = self.layer.tiles
        self.target = target
        self.executable = tvm.compile(self.layer.mod, target=make_target(target, threads))
        if target == "llvm":
            dev = tvm.cpu()
            self._dev = dev
            self._consts = [tvm.runtime.tensor(a, dev) for a in self.arrays.arrays.values()]
            self._fn = self.executable["main"]

    def __call__(self, x):
        import numpy as np
        import tvm

        from kcompile.errors import UsageError

        if self.target != "llvm":
            raise UsageError(f"a {self.target} module cannot run on this machine (no device)")
        x = np.ascontiguousarray(x, dtype=np.float32)
        want = (self.spec.N, self.spec.C, self.spec.H, self.spec.W)
        if x.shape != want:
            raise UsageError(f"x must have shape {want}, got {x.shape}")
        out = tvm.runtime.empty(self.spec.out_shape, "float32", self._dev)
        self._fn(tvm.runtime.tensor(x, self._dev), *self._consts, out)
        return out.numpy()
