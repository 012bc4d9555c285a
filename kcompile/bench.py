"""`kcompile bench`: latency of layers and models per backend, held against the energy estimates.

A *case* is a module plus an input shape: a one-layer model (the layer suite, or one conv of
a zoo model) or a whole model. Each backend turns the case into a callable on numpy arrays:

==================  ==========================================================================
torch-dense         the model with every clustered layer replaced by a dense nn.Conv2d /
                    nn.Linear holding the decoded weight (the baseline, timed in every run)
torch-decoded       the clustered model as is (decodes the weight in every forward)
onnxruntime-custom  ``kcompile.export`` ONNX + ``kcompile.onnxruntime_session`` (custom ops)
onnxruntime-stock   the same file in a stock session (the ops' standard function bodies)
numba               layers: ``kcompile.kernels.prepare(..., backend="numba")`` (dense layers:
                    torch, as the kernels' dense form); models: ``kcompile.compile(target="numba")``
tvm-llvm            ``kcompile.compile(model, target="llvm", input_shape)``
numba-cuda          layers: ``kcompile.kernels.prepare(..., backend="cuda")`` (needs a CUDA GPU)
tvm-cuda            ``kcompile.compile(model, target="cuda", input_shape)`` (needs a CUDA GPU)
==================  ==========================================================================

Backends are imported lazily; one that is missing or fails on a case is skipped with a
one-line note (``BenchResult.notes``) instead of stopping the run. A case may bring its own
ready callables (``Case.runners``, e.g. already exported artifacts) for some backends. Every
output is checked against torch-decoded (``max_abs_err`` in the record). Timing: ``warmup``
calls per backend, then ``runs`` timed calls (perf_counter) in rounds of per-backend blocks
(see :func:`time_blocks`), median/min/max in ms; torch, numba, onnxruntime and TVM threads are
pinned to ``threads``.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .errors import UsageError

BACKENDS = ("torch-dense", "torch-decoded", "onnxruntime-custom", "onnxruntime-stock", "numba", "tvm-llvm",
            "numba-cuda", "tvm-cuda")
ALIASES = {"torch": ("torch-dense", "torch-decoded"), "onnxruntime": ("onnxruntime-custom", "onnxruntime-stock"),
           "ort": ("onnxruntime-custom", "onnxruntime-stock"), "tvm": ("tvm-llvm",),
           "cuda": ("numba-cuda", "tvm-cuda"), "all": BACKENDS}


class BackendUnavailable(Exception):
    """A backend cannot run a case (not installed yet, unsupported layer, failure)."""


CPU_BACKENDS = BACKENDS[:6]


def default_backends() -> tuple[str, ...]:
    """The CPU backends, plus the CUDA ones when a GPU is present."""
    try:
        _require_gpu()
        return BACKENDS
    except BackendUnavailable:
        return CPU_BACKENDS


def parse_backends(text: str | None) -> tuple[str, ...]:
    """'torch,numba' -> backends in canonical order; UsageError for unknown names."""
    if not text:
        return default_backends()
    out: list[str] = []
    for name in (t.strip() for t in text.split(",")):
        if not name:
            continue
        names = ALIASES.get(name, (name,))
        for n in names:
            if n not in BACKENDS:
                raise UsageError(f"unknown backend {name!r}: expected some of {', '.join(BACKENDS)} "
                                 f"(or {', '.join(ALIASES)})")
            if n not in out:
                out.append(n)
    if not out:
        raise UsageError("--backends is empty")
    return tuple(b for b in BACKENDS if b in out)


#: TVM thread-pool workers busy-wait (sched_yield) this many times for the next task before
#: sleeping. TVM's default, 300000, kept a worker spinning ~70 ms of CPU after every call of
#: a 0.2 ms model on this machine: in one process with torch's OpenMP pool that starves
#: torch's threads (2-thread barriers wait for a core). 1000 still bridges the gaps between
#: the parallel loops of one call (digits-resnet kse via TVM: 0.20 ms median vs 0.23 ms with
#: the default, measured alone) and goes quiet within a millisecond.
TVM_SPIN_COUNT = 1000


def pin_threads(threads: int) -> None:
    """Pin torch, numba and TVM to ``threads`` (onnxruntime sessions get it per session).

    TVM's workers get a short spin (``TVM_THREAD_POOL_SPIN_COUNT``, :data:`TVM_SPIN_COUNT`)
    unless the variable is set; like the thread count it is read when TVM's thread pool starts.

    Numba gets the ``workqueue`` threading layer unless NUMBA_THREADING_LAYER is set: with
    numba's OpenMP layer running in the same process as torch, torch's conv became ~70x slower
    on this machine (128->128@28 3x3 conv, 1 thread: 1.5 ms -> 110 ms median), which would
    poison every dense baseline timed next to a numba kernel. (Must happen before numba's
    threading layer is first launched; otherwise it is too late and nothing changes.)
    """
    torch.set_num_threads(threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(TVM_SPIN_COUNT))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import numba

        if "NUMBA_THREADING_LAYER" not in os.environ:
            numba.config.THREADING_LAYER = "workqueue"
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except Exception:
        pass


# ------------------------------------------------------------------------------ cases
@dataclass
class Case:
    """A module to time on ``input_shape`` (batch included). ``layer`` None = whole model.

    ``runners``: optional ready callables {backend: fn(x numpy input_shape) -> y numpy} used
    instead of building that backend from ``module`` (e.g. sessions/modules loaded from files
    already exported); they are checked against the module like any other backend.
    """

    model_name: str
    layer: str | None
    module: nn.Module
    input_shape: tuple[int, ...]
    method: str = "dense"
    info: dict = field(default_factory=dict)
    runners: dict = field(default_factory=dict)


def _is_clustered(mod: nn.Module) -> bool:
    return callable(getattr(mod, "clustered_weight", None))


def densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose clustered layers are plain nn.Conv2d / nn.Linear (decoded weights)."""
    from .layers import set_submodule

    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if not name or not _is_clustered(mod):
            continue
        cw = mod.clustered_weight().detached()
        w = cw.decode().detach()
        if callable(getattr(mod, "conv_params", None)):
            p = mod.conv_params()
            pad = p["padding"]
            dense = nn.Conv2d(w.shape[1] * p["groups"], w.shape[0], tuple(w.shape[2:]), stride=p["stride"],
                              padding=pad, dilation=p["dilation"], groups=p["groups"], bias=mod.bias is not None)
        else:
            dense = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(w)
            if mod.bias is not None:
                dense.bias.copy_(mod.bias.detach())
        set_submodule(m, name, dense)
    return m.eval()


def _single_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, layer) when ``model`` holds exactly one conv/linear layer (a layer-suite case)."""
    layers = [(n, m) for n, m in model.named_modules()
              if _is_clustered(m) or isinstance(m, (nn.Conv2d, nn.Linear))]
    return layers[0] if len(layers) == 1 else None


# ------------------------------------------------------------------------------ backends
def _torch_runner(module: nn.Module):
    module = module.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return run


def _numba_runner(case: Case, threads: int):
    one = _single_layer(case.module)
    if one is not None and _is_clustered(one[1]) and callable(getattr(one[1], "conv_params", None)):
        try:
            from . import kernels
        except ImportError as e:
            raise BackendUnavailable(f"kcompile.kernels not importable ({e})") from None
        mod = one[1]
        p = mod.conv_params()
        pad = p["padding"]
        if isinstance(pad, str):
            raise BackendUnavailable(f"padding {pad!r} not supported by the kernels")
        prep = kernels.prepare(mod.clustered_weight().detached(), mod.bias, stride=p["stride"], padding=tuple(pad),
                               dilation=p["dilation"], groups=p["groups"], backend="numba")
        if len(list(case.module.children())) == 1 or case.module is mod:
            return prep
    if one is not None and not _is_clustered(one[1]):
        return _torch_runner(case.module)  # the kernels' dense form is torch's conv
    return _compiled_runner(case, "numba")


def _require_gpu() -> None:
    try:
        from numba import cuda

        ok = cuda.is_available()
    except Exception:
        ok = False
    if not ok:
        raise BackendUnavailable("no CUDA GPU on this machine")


def _numba_cuda_runner(case: Case):
    one = _single_layer(case.module)
    if one is None or not _is_clustered(one[1]) or not callable(getattr(one[1], "conv_params", None)):
        raise BackendUnavailable("numba-cuda times single clustered conv layers only")
    from . import kernels

    mod = one[1]
    p = mod.conv_params()
    if isinstance(p["padding"], str):
        raise BackendUnavailable(f"padding {p['padding']!r} not supported by the kernels")
    return kernels.prepare(mod.clustered_weight().detached(), mod.bias, stride=p["stride"],
                           padding=tuple(p["padding"]), dilation=p["dilation"], groups=p["groups"], backend="cuda")


def _compiled_runner(case: Case, target: str):
    try:
        from .compiler import compile_model
    except ImportError as e:
        raise BackendUnavailable(f"kcompile.compiler not available yet ({e})") from None
    run = compile_model(case.module, target=target, input_shape=case.input_shape)
    return lambda x: np.asarray(run(x))


def _ort_runner(case: Case, threads: int, custom: bool, workdir: str):
    try:
        from .export import export
        from .ort import onnxruntime_session
    except ImportError as e:
        raise BackendUnavailable(f"ONNX export/onnxruntime session not available ({e})") from None
    path = os.path.join(workdir, f"case{id(case)}.onnx")
    if not os.path.exists(path):
        export(case.module, path, target="onnx", input_shape=case.input_shape, onnx_ops="custom")
    return session_runner(onnxruntime_session(path, threads=threads, custom_ops=custom), custom)


def session_runner(sess, custom: bool = True):
    """fn(x numpy) -> first output (numpy) of an onnxruntime session; with ``custom``, the
    custom-op session's ``kcompile_backends()`` is passed on (which kernel each node ran)."""
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: x})[0]

    if custom and hasattr(sess, "kcompile_backends"):
        run.kcompile_backends = lambda: {k: str(v) for k, v in sess.kcompile_backends().items()}
    return run


def make_runner(backend: str, case: Case, threads: int, workdir: str):
    """A callable x (numpy) -> y (numpy) for ``case`` on ``backend``, or BackendUnavailable."""
    try:
        if backend == "torch-dense":
            return _torch_runner(densify(case.module))
        if backend == "torch-decoded":
            return _torch_runner(case.module)
        if backend == "numba":
            return _numba_runner(case, threads)
        if backend == "tvm-llvm":
            return _compiled_runner(case, "llvm")
        if backend in ("numba-cuda", "tvm-cuda"):
            _require_gpu()
            if backend == "tvm-cuda":
                return _compiled_runner(case, "cuda")
            return _numba_cuda_runner(case)
        if backend in ("onnxruntime-custom", "onnxruntime-stock"):
            return _ort_runner(case, threads, backend == "onnxruntime-custom", workdir)
    except BackendUnavailable:
        raise
    except Exception as e:  # a backend's failure must not stop the run
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BackendUnavailable(f"{type(e).__name__}: {msg}") from None
    raise UsageError(f"unknown backend {backend!r}")


# ------------------------------------------------------------------------------ timing
@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int


def timed_calls(call, n: int, into: list[float] | None = None) -> list[float]:
    """Wall time in ms (perf_counter) of each of ``n`` back-to-back calls of ``call()``,
    appended to ``into`` (a new list if None) as they are taken, so a call that raises
    leaves the earlier times in place; returns the list."""
    ts = [] if into is None else into
    for _ in range(n):
        t = time.perf_counter()
        call()
        ts.append((time.perf_counter() - t) * 1e3)
    return ts


def time_fn(fn, x: np.ndarray, runs: int, warmup: int) -> Timing:
    """``warmup`` untimed calls, then ``runs`` timed calls of ``fn(x)``."""
    for _ in range(warmup):
        fn(x)
    ts = timed_calls(lambda: fn(x), runs)
    return Timing(statistics.median(ts), min(ts), max(ts), runs)


_ALONE = """
import json, sys
import torch
from kcompile.bench import _torch_runner, densify, time_fn
from kcompile.loading import load_model
spec, shape, threads, runs, warmup = sys.argv[1], tuple(json.loads(sys.argv[2])), *map(int, sys.argv[3:6])
torch.set_num_threads(threads)
fn = _torch_runner(densify(load_model(spec)))
x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).numpy()
fn(x)
sys.stdin.readline()  # wait for the go: the parent's own work is over
t = time_fn(fn, x, runs, warmup)
print(json.dumps([t.median_ms, t.min_ms, t.max_ms, t.runs]))
"""


class TorchAlone:
    """torch-dense timing of model ``spec`` (e.g. "zoo:digits-resnet") on ``input_shape`` in
    a fresh Python process where torch is the only runtime: the reference that tells whether
    a torch-dense figure timed next to other runtimes is plausible.

    The process starts here and loads the model (imports overlap the caller's work), then
    waits; :meth:`measure` lets it time (``warmup`` + ``runs`` calls) while the caller waits.
    """

    def __init__(self, spec: str, input_shape, threads: int, runs: int, warmup: int = 3) -> None:
        import json
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", _ALONE, spec, json.dumps(list(input_shape)),
                                      str(threads), str(runs), str(warmup)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def measure(self, timeout: float = 120.0) -> Timing:
        """Run the timing now; RuntimeError if the process failed."""
        import json

        try:
            out, err = self.proc.communicate("go\n", timeout=timeout)
        except Exception:
            self.close()
            raise
        if self.proc.returncode != 0 or not out.strip():
            lines = err.strip().splitlines() or [f"exit code {self.proc.returncode}"]
            raise RuntimeError(lines[-1])
        return Timing(*json.loads(out.strip().splitlines()[-1]))

    def close(self) -> None:
        """Stop the process if it is still running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


#: pause before each backend's block: longer than the other pools' busy-wait after their last
#: call (torch's OpenMP and onnxruntime's workers: ~10-15 ms of CPU on this machine)
SETTLE_S = 0.03
#: blocks per backend (a shift in the machine's load still hits every backend)
ROUNDS = 5


def time_blocks(fns: dict, x: np.ndarray, runs: int, rounds: int = ROUNDS, settle: float = SETTLE_S,
                rewarm: bool = True, on_error=None) -> dict[str, list[float]]:
    """Time ``runs`` calls of each ``fns[name](x)``; returns {name: times in ms} (failed: fewer).

    The runs are split over ``min(rounds, runs)`` rounds; in each round every callable gets
    one block: a ``settle`` s pause (the previous backend's thread pool stops busy-waiting),
    one untimed call if ``rewarm`` (wakes this backend's own pool), then its share of timed
    calls back to back. Calling the backends round-robin call by call instead puts every
    backend next to another runtime's still-spinning pool, which on 2 cores stalled torch's
    2-thread OpenMP barriers (digits-resnet dense: 0.5 ms alone, 25-260 ms interleaved).
    ``on_error(name, exc)`` is told about a callable that raised; it is not called again.
    """
    rounds = max(1, min(rounds, runs))
    share = [runs // rounds + (i < runs % rounds) for i in range(rounds)]
    times: dict[str, list[float]] = {name: [] for name in fns}
    failed = set()
    for n in share:
        for name, fn in fns.items():
            if name in failed:
                continue
            if settle:
                time.sleep(settle)
            try:
                if rewarm:
                    fn(x)
                timed_calls(lambda: fn(x), n, into=times[name])
            except Exception as e:
                failed.add(name)
                if on_error is not None:
                    on_error(name, e)
    return times


# ------------------------------------------------------------------------------ the run
@dataclass
class BenchResult:
    records: list[dict]
    notes: list[str]
    machine: dict

    def correlations(self, estimate_key: str = "eyeriss") -> dict:
        """Per backend: Spearman and R^2 between ``estimate_key`` and median_ms over the layer records."""
        from .energy.stats import r2, spearman

        out = {}
        for b in sorted({r["backend"] for r in self.records}):
            rs = [r for r in self.records if r["backend"] == b and r["layer"] is not None
                  and r.get(estimate_key) is not None]
            if len(rs) >= 3:
                x = [r[estimate_key] for r in rs]
                y = [r["median_ms"] for r in rs]
                out[b] = {"points": len(rs), "spearman": spearman(x, y), "r2": r2(x, y)}
        return out


def cpu_name(default: str = "") -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``default`` when it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), default)
    except OSError:
        return default


def machine_info(threads: int) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": threads}


def _estimates(case: Case) -> dict:
    try:
        from . import energy

        rep = energy.estimate(case.module, case.input_shape)
        t = rep.total
        return {"eyeriss": t["eyeriss"], "dkm_mac_units": t["dkm_mac_units"], "joules_45nm": t["joules_45nm"],
                "macs": t["macs"], "dense_macs": t["dense_macs"],
                "form": rep.layers[0].form if len(rep.layers) == 1 else None}
    except Exception:
        return {}


def run_bench(cases: list[Case], backends=BACKENDS, threads: int = 2, runs: int = 30, warmup: int = 5,
              show_progress: bool = True, on_note=None) -> BenchResult:
    """Time every case on every backend; torch-dense is always timed too (the baseline).

    Per case, every backend is prepared (or taken from ``case.runners``) and checked first,
    warmed up ``warmup`` times, then timed ``runs`` times in rounds of per-backend blocks
    (:func:`time_blocks`): a shift in the machine's load hits all backends of a case alike (the
    machine is shared) while no backend is timed next to another runtime's spinning pool.
    """
    from .progress import progress

    pin_threads(threads)
    records, notes = [], []

    def note(msg):
        notes.append(msg)
        if on_note:
            on_note(msg)

    def where(case):
        return f"{case.model_name}:{case.layer or 'model'}"

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    if load > (os.cpu_count() or 1):
        note(f"load average {load:.1f} on {os.cpu_count()} CPUs: timings are noisy, and multi-threaded "
             f"OpenMP convs stall at barriers on an oversubscribed machine (compare --threads 1)")
    order = ("torch-dense",) + tuple(b for b in backends if b != "torch-dense")
    with tempfile.TemporaryDirectory(prefix="kcompile-bench-") as workdir, progress(show_progress) as prog:
        task = prog.add_task("bench", total=len(cases), info="")
        for case in cases:
            prog.update(task, info=where(case))
            g = torch.Generator().manual_seed(0)
            x = torch.randn(case.input_shape, generator=g).numpy()
            with torch.inference_mode():
                ref = case.module.eval()(torch.from_numpy(x)).numpy()
            scale = float(np.abs(ref).max()) or 1.0
            ready = {}  # backend -> (fn, executed, err)
            for b in order:
                try:
                    fn = case.runners[b] if b in case.runners else make_runner(b, case, threads, workdir)
                    y = np.asarray(fn(x))
                    executed = getattr(fn, "form", None)
                    if executed is None and hasattr(fn, "kcompile_backends"):
                        executed = fn.kcompile_backends()
                    err = float(np.abs(y - ref).max()) if y.shape == ref.shape else float("inf")
                    for _ in range(warmup):
                        fn(x)
                except BackendUnavailable as e:
                    note(f"skipped {b} on {where(case)}: {e}")
                    continue
                except Exception as e:  # failure while running: skip, never crash the run
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    note(f"skipped {b} on {where(case)}: {type(e).__name__}: {msg}")
                    continue
                if err > 1e-3 * scale:
                    note(f"{b} on {where(case)}: output differs from torch by {err:.3g} (output range {scale:.3g})")
                ready[b] = (fn, executed, err)
            failed = set()

            def timing_failed(b, e):
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                note(f"skipped {b} on {where(case)}: failed while timing: {type(e).__name__}: {msg}")
                failed.add(b)

            times = time_blocks({b: fn for b, (fn, _, _) in ready.items()}, x, runs, rewarm=warmup > 0,
                                on_error=timing_failed)
            est = _estimates(case)
            dense_ms = statistics.median(times["torch-dense"]) if times.get("torch-dense") else None
            for b, (fn, executed, err) in ready.items():
                if b in failed or not times[b]:
                    continue
                ts = times[b]
                med = statistics.median(ts)
                rec = {"model": case.model_name, "layer": case.layer, "backend": b,
                       "batch": int(case.input_shape[0]), "threads": threads,
                       "median_ms": med, "min_ms": min(ts), "max_ms": max(ts), "runs": len(ts),
                       "method": case.method, "input_shape": list(case.input_shape), "max_abs_err": err,
                       "dense_median_ms": dense_ms}
                if dense_ms:
                    rec["speedup_vs_dense"] = dense_ms / med
                rec.update(est)
                rec["executed"] = executed  # the kernel form / ORT kernels the backend ran, if it says
                records.append(rec)
            prog.advance(task)
    return BenchResult(records, notes, machine_info(threads))


# ------------------------------------------------------------------------------ suites
#: resnet18's 3x3 conv shapes: (C_in, C_out, H, stride)
RESNET18_3X3 = ((64, 64, 56, 1), (128, 128, 28, 1), (256, 256, 14, 1), (512, 512, 7, 1),
                (64, 128, 56, 2), (128, 256, 28, 2), (256, 512, 14, 2))

#: the kernels issue's clusterings: (label, method, options(O))
SUITE_METHODS = (("kse-q8", "kse", lambda O: {"q": 8}), ("kse-qO/4", "kse", lambda O: {"q": max(1, O // 4)}),
                 ("son-k256", "son", lambda O: {"k": 256, "scope": "layer"}),
                 ("filter-n=O/4", "filter", lambda O: {"select": "fixed", "ratio": 0.25}))


def one_conv(cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, bias=False)).eval()


def layer_suite(batch: int = 1, shapes=RESNET18_3X3, methods=SUITE_METHODS, iters: int = 20,
                include_dense: bool = True) -> list[Case]:
    """The layer suite: each shape dense and clustered by each method (one-layer models)."""
    cases = []
    for cin, cout, h, s in shapes:
        name = f"conv3x3_{cin}->{cout}@{h}s{s}"
        dense = one_conv(cin, cout, 3, s, 1)
        if include_dense:
            cases.append(Case("layers", f"{name}/dense", dense, (batch, cin, h, h), "dense"))
        for label, method, opts in methods:
            cases.append(Case("layers", f"{name}/{label}", cluster_one(dense, method, iters=iters, **opts(cout)),
                              (batch, cin, h, h), method))
    return cases


def cluster_one(layer_model: nn.Sequential, method: str, **opts) -> nn.Module:
    """Cluster the single conv of ``layer_model`` (KSE never clusters a model's first conv, so a
    1x1 stub conv is put in front while clustering and dropped afterwards)."""
    from .cluster import cluster

    conv = layer_model[0]
    stub = nn.Sequential(nn.Conv2d(conv.in_channels, conv.in_channels, 1, bias=False), copy.deepcopy(conv))
    skip = () if method == "kse" else ("0",)
    cm = cluster(stub, method, skip=skip, **opts)
    return nn.Sequential(cm[1]).eval()


def model_layer_cases(model: nn.Module, model_name: str, input_shape, clustered: nn.Module | None = None,
                      kinds=(nn.Conv2d,)) -> list[Case]:
    """Each conv of ``model`` as a one-layer case on its real input shape (and the clustered twin's)."""
    shapes = {}
    def hook(name):
        def record(mod, inp, out):  # returns None: the output is left alone
            shapes.setdefault(name, tuple(inp[0].shape))
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
    cases = []
    for name, shape in shapes.items():
        cases.append(Case(model_name, f"{name}/dense", nn.Sequential(copy.deepcopy(model.get_submodule(name))).eval(),
                          shape, "dense"))
        if clustered is not None:
            mod = clustered.get_submodule(name)
            if _is_clustered(mod):
                cases.append(Case(model_name, f"{name}/{getattr(mod, 'method', 'clustered')}",
                                  nn.Sequential(copy.deepcopy(mod)).eval(), shape, getattr(mod, "method", "")))
    return cases


MODEL_SUITE = (("zoo:resnet56", "kse", {"q": 8}), ("zoo:resnet18", "kse", {"q": 8}))


def model_suite(batch: int = 1, iters: int = 20) -> list[Case]:
    """Zoo models dense vs clustered (whole models)."""
    from .cluster import cluster
    from .loading import load_model
    from .zoo import input_shape

    cases = []
    for spec, method, opts in MODEL_SUITE:
        m = load_model(spec).eval()
        shape = (batch, *input_shape(spec[4:])[1:])
        cases.append(Case(spec, None, m, shape, "dense"))
        cases.append(Case(f"{spec}+{method}", None, cluster(m, method, iters=iters, **opts).eval(), shape, method))
    return cases
