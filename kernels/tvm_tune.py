"""Optional tuning of the TVM layer kernels.

Two tuners, both returning something :func:`kcompile.kernels.tvm_schedule.layer_module`
accepts:

- :func:`search_tiles` -- times the cost model's best few tile choices of the *hand-written*
  llvm schedule (register row nv, output block OB, channel chunk CC, output split og) on
  this machine and returns the fastest :class:`~kcompile.kernels.tvm_schedule.LlvmTiles`.
  Cheap (one build per candidate); ``compile_model(..., tune=True)`` uses it per layer.
- :func:`tune_layer` -- hands the *unscheduled* compute to ``tvm.s_tir.meta_schedule``
  (``tune_tir``; trials configurable; ``runner`` may be a ``meta_schedule.runner.RPCRunner``
  for a remote device, default the local runner) and returns the best scheduled IRModule,
  or None when no valid schedule was found.

Timing is never asserted by tests; tuning is opt-in and slow.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np

from .tvm_compute import ConvArrays, ConvSpec, prim_func
from .cpu_isa import host_isa
from .tvm_schedule import LlvmTiles, layer_module, llvm_tiles, make_target, nv_range, shared_tile_cost


@dataclass(frozen=True)
class TuneConfig:
    """meta_schedule settings: ``trials`` (max_trials_global), ``work_dir`` (None: a temp
    dir), ``runner`` ("local" or a ``meta_schedule.runner.Runner`` such as RPCRunner),
    ``builder`` ("local" or a Builder), ``target`` kind, ``threads`` (num-cores), ``seed``,
    ``cost_model`` ("xgb" or "random")."""

    trials: int = 64
    work_dir: str | None = None
    runner: object = "local"
    builder: object = "local"
    target: str = "llvm"
    threads: int = 2
    seed: int = 0
    cost_model: str = "xgb"


_JSON_OK: bool | None = None


def ir_serialization_works() -> bool:
    """Whether ``tvm.ir.save_json`` works in this TVM build (probed once, in a subprocess:
    the apache-tvm 0.27.0.post1 wheel installed here segfaults in ``ffi::ToJSONGraph`` even
    for a constant, and meta_schedule serialises every candidate through it)."""
    global _JSON_OK
    if _JSON_OK is None:
        import subprocess
        import sys

        code = "import tvm; tvm.ir.save_json(tvm.tirx.const(1))"
        try:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
            _JSON_OK = r.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _JSON_OK = False
    return _JSON_OK


def tune_layer(spec: ConvSpec, arrays: ConvArrays, config: TuneConfig = TuneConfig()):
    """meta_schedule-tuned IRModule (function ``main``) of one layer, or None.

    Raises KcompileError when this TVM build cannot serialise IR (see
    :func:`ir_serialization_works`) instead of crashing the process."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from kcompile.errors import KcompileError

    if not ir_serialization_works():
        raise KcompileError("meta_schedule tuning is unavailable: this TVM build crashes serialising IR "
                            "(tvm.ir.save_json); use search_tiles or the default schedule")

    func = prim_func(spec, arrays, spec.wide_len(host_isa().lanes))
    mod = tvm.IRModule({"main": func})
    target = make_target(config.target, config.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = config.work_dir or tmp
        db = ms.tune_tir(mod, target, work_dir, max_trials_global=config.trials,
                         num_trials_per_iter=min(config.trials, 16), runner=config.runner,
                         builder=config.builder, seed=config.seed,
                         num_tuning_cores=max(1, config.threads), cost_model=config.cost_model)
        sch = ms.tir_integration.compile_tir(db, mod, target)
    return None if sch is None else sch.mod


def tile_candidates(spec: ConvSpec, arrays: ConvArrays, threads: int = 2, limit: int = 6) -> list[LlvmTiles]:
    """The heuristic tiles first, then the next best of the cost model
    (:func:`~kcompile.kernels.tvm_schedule.shared_tile_cost`, every nv of ``nv_range``) and their variants
    with the output channels split over the threads (``og``): at most ``limit`` distinct."""
    base = llvm_tiles(spec, arrays.meta, threads)
    ranked = sorted((shared_tile_cost(spec, arrays.meta, nv, threads) for nv in nv_range()), key=lambda c: c[0])
    out = [base]
    for _, t in ranked:
        variants = [t]
        if t.og == 1 and spec.geom.groups == 1 and (spec.O // t.OB) % threads == 0:
            variants.append(replace(t, og=threads))
        for v in variants:
            if v not in out:
                out.append(v)
    return out[:limit]


def search_tiles(spec: ConvSpec, arrays: ConvArrays, threads: int = 2, runs: int = 10, rounds: int = 7,
                 candidates: list[LlvmTiles] | None = None) -> tuple[LlvmTiles, list[tuple[LlvmTiles, float]]]:
    """(fastest tiles, [(tiles, median seconds per call)]) of the hand-written llvm shared
    schedule, measured here on random inputs: every candidate is built, then timed in
    ``rounds`` interleaved rounds of ``runs`` calls (so that a drifting machine load hits all
    candidates alike); a candidate's time is the median of its rounds."""
    import tvm

    if arrays.form != "shared":
        raise ValueError("search_tiles tunes the shared form")
    dev = tvm.cpu()
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(
        (spec.N, spec.C, spec.H, spec.W)).astype(np.float32), dev)
    residual = []
    if (arrays.meta.get("epilogue") is not None) and arrays.meta["epilogue"].residual:
        residual = [tvm.runtime.tensor(np.zeros(spec.out_shape, np.float32), dev)]
    consts = [tvm.runtime.tensor(a, dev) for a in arrays.arrays.values()]
    out = tvm.runtime.empty(spec.out_shape, "float32", dev)
    args = [x, *residual, *consts, out]
    cands = list(candidates or tile_candidates(spec, arrays, threads))
    fns = []
    for t in cands:
        lm = layer_module(spec, arrays, "llvm", threads, tiles=t)
        fn = tvm.compile(lm.mod, target=make_target("llvm", threads))[lm.name]
        for _ in range(3):
            fn(*args)
        fns.append(fn)
    per_round = [[] for _ in cands]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(runs):
                fn(*args)
            per_round[i].append((time.perf_counter() - t0) / runs)
    results = [(t, float(np.median(r))) for t, r in zip(cands, per_round)]
    best = min(results, key=lambda r: r[1])[0]
    return best, results
