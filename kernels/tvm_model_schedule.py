"""Default llvm (x86) schedules for the PrimFuncs that TVM's own Relax operators legalise to.

In a compiled model every conv is a hand-scheduled kernel (``tvm_schedule``); everything
else (batch-norm epilogues, ReLU, residual adds, max / average pooling, the classifier's
matmul) is legalised by ``LegalizeOps`` and fused by ``FuseOps`` / ``FuseTIR`` into PrimFuncs
that carry no schedule: run as written they are single-threaded scalar loop nests. This
module gives each such PrimFunc a simple, shape-driven schedule:

- every injective producer is inlined into its consumer (``compute_inline``; pads into
  pools, bias / scale / ReLU chains into one block) and every injective epilogue of a
  reduction into the reduction (``reverse_compute_inline``), so a fused function is
  usually one block;
- injective block, loops (d0, ..., dk): the leading loops (batch x channels for NCHW) are
  fused and run in parallel, the trailing two (H x W) are fused and vectorised in chunks of
  ``VEC`` floats (or whole, when short);
- reduction block (pool windows, matmul's k, a global mean), spatial loops (s0, ..., sj)
  and reduction loops (r...): when every read is unit-stride in sj (matmul), sj is split
  into a vector chunk ``sj_i`` and ``sj_o``; (s0, ..., s(j-1), sj_o) are fused and parallel;
  order (parallel, r..., sj_i) with ``sj_i`` vectorised, the reduction's init hoisted.
  Otherwise (stride-2 pool windows, where vector gathers measured 2-3x slower than scalar
  code) (s0, ..., s(j-1)) are fused and parallel, sj stays a serial loop and windows of up
  to ``MAX_UNROLL`` taps are unrolled.

Tiny loop nests (less than ``MIN_PARALLEL`` iterations of work) are not parallelised: the thread
pool's wake-up costs more than the work. A PrimFunc whose blocks do not fit these shapes
is left as it is (it still runs, unscheduled). Depends on TVM only.
"""

from __future__ import annotations

VEC = 16             # floats per AVX-512 vector
MAX_WHOLE_VEC = 64   # an inner loop this short is vectorised whole (LLVM splits it)
MIN_PARALLEL = 4096  # fewer loop iterations than this run on one thread
MAX_UNROLL = 64      # reduction windows up to this size are unrolled


def _extent(sch, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext.value) if hasattr(ext, "value") else None


def _vector_split(sch, loop):
    """Split ``loop`` into (outer, vector) with a vector chunk of VEC (or 8 / 4) floats
    dividing its extent, or return (None, loop) when the whole loop is short enough to be
    one vector loop; (loop, None) when it cannot be vectorised cleanly."""
    n = _extent(sch, loop)
    if n is None:
        return loop, None
    for v in (VEC, 8):
        if n % v == 0 and n > v:
            outer, inner = sch.split(loop, [None, v])
            return outer, inner
    if n <= MAX_WHOLE_VEC:
        return None, loop
    if n % 4 == 0:
        return tuple(sch.split(loop, [None, 4]))
    return loop, None


def _block_iters(sch, block) -> tuple[list, list]:
    """(spatial loops, reduction loops) of a block whose loops map 1:1 to its iter vars."""
    loops = sch.get_loops(block)
    ivs = sch.get(block).iter_vars
    if len(loops) != len(ivs):
        raise ValueError("loops do not map 1:1 to iteration variables")
    spatial = [lp for lp, iv in zip(loops, ivs) if iv.iter_type == 0]
    reduce_ = [lp for lp, iv in zip(loops, ivs) if iv.iter_type == 2]
    if len(spatial) + len(reduce_) != len(loops) or loops[: len(spatial)] != spatial:
        raise ValueError("expected spatial loops then reduction loops")
    return spatial, reduce_


def _iterations(sch, loops) -> int:
    total = 1
    for lp in loops:
        total *= _extent(sch, lp) or 1
    return total


def schedule_injective(sch, block) -> None:
    """Leading loops fused + parallel, trailing (H, W) fused + vectorised (module doc)."""
    spatial, reduce_ = _block_iters(sch, block)
    if reduce_:
        raise ValueError("not an injective block")
    if not spatial:
        return
    total = _iterations(sch, spatial)
    k = len(spatial)
    inner_loops = spatial[-2:] if k >= 3 else spatial[-1:]
    outer_loops = spatial[: k - len(inner_loops)]
    inner = sch.fuse(*inner_loops) if len(inner_loops) > 1 else inner_loops[0]
    vo, vi = _vector_split(sch, inner)
    par = [*outer_loops, *([vo] if vo is not None else [])]
    if par and total >= MIN_PARALLEL:
        sch.parallel(sch.fuse(*par) if len(par) > 1 else par[0])
    if vi is not None:
        sch.vectorize(vi)


def _unit_stride_reads(sch, block, var_index: int) -> bool:
    """Whether every region the block reads depends on iteration variable ``var_index``
    only through its last dimension, as ``var + c`` with extent 1 (so a vector of it is one
    contiguous or broadcast load; pools' stride-2 windows are not)."""
    from tvm.sym.pattern import detect_linear_equation
    from tvm.tirx.analysis import undefined_vars

    blk = sch.get(block)
    var = blk.iter_vars[var_index].var
    for region in blk.reads:
        dims = list(region.region)
        for i, rng in enumerate(dims):
            if not any(v.same_as(var) for v in undefined_vars(rng.min)):
                continue
            coef = detect_linear_equation(rng.min, [var])
            if (i != len(dims) - 1 or not coef or getattr(coef[0], "value", None) != 1
                    or getattr(rng.extent, "value", None) != 1):
                return False
    return True


def schedule_reduction(sch, block) -> None:
    """Spatial loops parallel, reductions inside; the last spatial loop's vector chunk
    innermost and vectorised when its reads are unit-stride, otherwise (pooling windows with
    a stride, a reduction to one value per row) scalar with short windows unrolled."""
    spatial, reduce_ = _block_iters(sch, block)
    if not reduce_ or not spatial:
        raise ValueError("not a reduction block with spatial loops")
    work = _iterations(sch, spatial) * _iterations(sch, reduce_)
    last = len(spatial) - 1
    vectorise = (_extent(sch, spatial[-1]) or 1) >= 4 and _unit_stride_reads(sch, block, last)
    vo, vi = _vector_split(sch, spatial[-1]) if vectorise else (None, None)
    # scalar: the last spatial loop stays serial inside the parallel one (plain index math)
    par = [*spatial[:-1], *([vo] if vo is not None else [])] or spatial[-1:]
    if vi is not None:
        sch.reorder(*par, *reduce_, vi)
    if par and work >= MIN_PARALLEL:
        sch.parallel(sch.fuse(*par) if len(par) > 1 else par[0])
    if vi is not None:
        sch.vectorize(vi)  # before the init is split off: the block is still a reduction
        init = sch.decompose_reduction(block, reduce_[0])
        sch.vectorize(sch.get_loops(init)[-1])
    elif _iterations(sch, reduce_) <= MAX_UNROLL:
        for lp in reduce_:
            sch.unroll(lp)


def _inline_all(sch) -> None:
    """Inline injective producers into consumers, then injective epilogues of reductions
    (a block that cannot be inlined is simply kept)."""
    root = sch.get_sblock("root")
    for blk in list(sch.get_child_blocks(root))[:-1]:
        try:
            sch.compute_inline(blk)
        except Exception:  # noqa: BLE001 - not inlinable (a reduction, several consumers...)
            pass
    for blk in reversed(list(sch.get_child_blocks(root))[1:]):
        try:
            sch.reverse_compute_inline(blk)
        except Exception:  # noqa: BLE001 - not an epilogue that can be inlined
            pass


def schedule_func(func):
    """A scheduled copy of an unscheduled PrimFunc ``func`` (module doc), or None when one
    of its blocks does not fit the supported shapes."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        _inline_all(sch)
        for blk in sch.get_child_blocks(sch.get_sblock("root")):
            ivs = sch.get(blk).iter_vars
            if any(iv.iter_type == 2 for iv in ivs):
                schedule_reduction(sch, blk)
            else:
                schedule_injective(sch, blk)
    except Exception:  # noqa: BLE001 - an unusual loop nest keeps its default (correct) form
        return None
    return sch.mod["main"]


def schedule_module_pass():
    """A module pass applying :func:`schedule_func` to every PrimFunc not marked
    ``tirx.is_scheduled`` (and marking the ones it schedules)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="KcompileScheduleLegalizedOps")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            if func.attrs is not None and int(func.attrs.get("tirx.is_scheduled", 0)) == 1:
                continue
            new = schedule_func(func)
            if new is not None:
                updates[gv] = new.with_attr("tirx.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass
