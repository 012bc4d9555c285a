"""torch.distributed helpers: join a process group from the environment, or spawn N local ranks.

Two ways to get N ranks, same worker code:

* ``torchrun --nproc-per-node N ...`` (one machine) or ``torchrun --nnodes M --node-rank i
  --rdzv-endpoint HOST:PORT ...`` (several machines) sets WORLD_SIZE / RANK / LOCAL_RANK /
  MASTER_ADDR / MASTER_PORT; ``init_from_env()`` joins that group.
* ``spawn(fn, nprocs, args)`` starts ``nprocs`` local processes itself (torch.multiprocessing,
  start method ``spawn``, a free TCP port on 127.0.0.1), initialises the group in each and
  calls ``fn(rank, world_size, *args)``; it returns the per-rank results or raises one
  ``KcompileError`` line naming the first failing rank.

Backend: gloo on CPU, NCCL when CUDA is available. Every group gets a ``timeout`` so that a
rank that dies or hangs makes the others fail with an error instead of waiting forever;
``spawn`` also stops the survivors a short grace period after a rank has died.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from .errors import KcompileError

DEFAULT_TIMEOUT = 300.0  # seconds


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank in [0, world_size), local_rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_backend() -> str:
    """nccl when CUDA is usable, else gloo."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def env_world() -> DistInfo | None:
    """The rank layout torchrun put in the environment, or None when not launched by it."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise KcompileError("WORLD_SIZE / RANK / LOCAL_RANK must be integers") from None
    if not 0 <= rank < world:
        raise KcompileError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return DistInfo(rank, world, local, "")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def current() -> DistInfo:
    """This process's place in the initialised group (rank 0 of 1 when there is none)."""
    if not is_initialized():
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())


def init_from_env(timeout: float = DEFAULT_TIMEOUT, backend: str | None = None) -> DistInfo:
    """Join the group torchrun describes (no-op if one is initialised or none is described).

    Returns the resulting DistInfo (world_size 1 when not distributed).
    """
    if is_initialized():
        return current()
    info = env_world()
    if info is None or info.world_size < 1:
        return DistInfo()
    if not dist.is_available():
        raise KcompileError("torch.distributed is not available in this torch build")
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    except Exception as e:
        raise KcompileError(f"rank {info.rank}: cannot join the process group: {first_line(e)}") from None
    atexit.register(_destroy_quietly)
    return current()


def _barrier_all(timeout: float) -> None:
    """Every rank reaches this point (gloo: a monitored barrier, so a missing rank is named)."""
    rank = dist.get_rank()
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=timeout))
        else:
            dist.barrier()
    except Exception as e:
        raise KcompileError(describe_failure(e, rank, "the other ranks at the end")) from None


def finish(timeout: float = 60.0) -> None:
    """Leave the process group together: a barrier, then ``destroy_process_group`` on every
    rank (no-op when no group is initialised); for code that goes on after its distributed
    part. A process that ends with its distributed work (the CLI under torchrun) uses
    :func:`finish_and_exit` instead."""
    if not is_initialized():
        return
    try:
        _barrier_all(timeout)
    finally:
        _destroy_quietly()


def finish_and_exit(code: int = 0, timeout: float = 60.0) -> None:
    """End a torchrun rank whose work succeeded: wait for every rank (a barrier with a
    timeout), flush stdout / stderr, then ``os._exit(code)`` -- no gloo teardown, no C++
    static destructors. No-op when no process group is initialised.

    Why: two-rank ``kcompile graft`` runs under torchrun now and then died *after* their work
    was done and written, with ``terminate called without an active exception`` (SIGABRT,
    exit code -6) in the rank that finished first: 2 of 66 runs here and 2 CI runs, one of
    them with :func:`finish` (barrier + ``destroy_process_group``) already in place. Past the
    barrier every rank has finished and every output file is closed (written atomically), so
    nothing is lost by skipping the teardown in which the abort happens."""
    if not is_initialized():
        return
    _barrier_all(timeout)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _destroy_quietly() -> None:
    with contextlib.suppress(Exception):
        if is_initialized():
            dist.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def first_line(e: BaseException) -> str:
    """First line of an exception's message (or its type name)."""
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


def describe_failure(e: BaseException, rank: int, peer: str = "another rank") -> str:
    """One line for a collective that failed: timeouts and lost peers read as such."""
    msg = first_line(e)
    low = msg.lower()
    if "timeout" in low or "timed out" in low:
        return f"rank {rank}: timed out waiting for {peer} (it died or hangs): {msg}"
    if "connection" in low or "closed" in low or "reset" in low or "broken pipe" in low:
        return f"rank {rank}: lost the connection to {peer} (it probably died): {msg}"
    return f"rank {rank}: {type(e).__name__}: {msg}"


# ------------------------------------------------------------------------------- spawning
def _worker(rank: int, world: int, port: int, backend: str, timeout: float, threads: int,
            fn: Callable, args: tuple, queue) -> None:
    """Body of one spawned rank: join the group, run fn, report ("ok", result) or ("error", line)."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "KCOMPILE_QUIET": "1"})
    if threads:
        torch.set_num_threads(threads)
    status, payload = "error", "unknown failure"
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout))
        status, payload = "ok", fn(rank, world, *args)
    except KcompileError as e:
        payload = f"{first_line(e)}"
    except BaseException as e:  # noqa: BLE001 - reported to the launcher as one line
        payload = describe_failure(e, rank)
        if os.environ.get("KCOMPILE_DEBUG"):
            traceback.print_exc()
    try:
        try:  # plain pickle: tensors travel by value (torch's sharing reducers need a live child)
            blob = pickle.dumps(payload)
        except Exception as e:  # noqa: BLE001
            status, blob = "error", pickle.dumps(f"rank {rank}: result is not picklable: {first_line(e)}")
        queue.put((rank, status, blob))
    finally:
        _destroy_quietly()
    if status != "ok":
        os._exit(1)  # no atexit / gloo teardown that could block on a dead peer


def spawn(fn: Callable[..., Any], nprocs: int, args: tuple = (), *, timeout: float = DEFAULT_TIMEOUT,
          backend: str | None = None, threads: int = 1, grace: float | None = None,
          start_method: str | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` new local processes, one rank each.

    ``fn`` must be importable (module level) and its result picklable. ``timeout`` (seconds)
    bounds every collective. When a rank fails or dies the others get ``grace`` seconds
    (default: timeout + 10) to finish or fail on their own, then they are terminated.
    ``start_method``: ``fork`` by default on Linux while CUDA is untouched (no re-import of
    torch per rank), else ``spawn``.
    Returns the results ordered by rank; raises KcompileError naming the first failure.
    """
    import multiprocessing as mp

    if nprocs < 1:
        raise KcompileError(f"need at least one process, got {nprocs}")
    backend = backend or default_backend()
    grace = timeout + 10.0 if grace is None else grace
    if start_method is None:
        fork_ok = sys.platform.startswith("linux") and not torch.cuda.is_initialized()
        start_method = "fork" if fork_ok else "spawn"
    ctx = mp.get_context(start_method)
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, nprocs, port, backend, timeout, threads, fn, args, queue),
                         daemon=False) for r in range(nprocs)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    stopped: set[int] = set()
    failed_at: float | None = None
    try:
        while True:
            while not queue.empty():
                r, status, blob = queue.get()
                results[r] = (status, pickle.loads(blob))
            alive = [p for p in procs if p.is_alive()]
            bad = any(s != "ok" for s, _ in results.values()) or any(
                p.exitcode not in (None, 0) for p in procs)
            if bad and failed_at is None:
                failed_at = time.monotonic()
            if not alive:
                break
            if failed_at is not None and time.monotonic() - failed_at > grace:
                break
            time.sleep(0.05)
        while not queue.empty():
            r, status, blob = queue.get()
            results[r] = (status, pickle.loads(blob))
    finally:
        stopped = {r for r, p in enumerate(procs) if p.is_alive()}
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    errors = []
    for r, p in enumerate(procs):
        status, payload = results.get(r, (None, None))
        if status == "ok":
            continue
        if status == "error":
            errors.append((0, payload))
        elif r in stopped:
            errors.append((2, f"rank {r}: stopped after another rank failed"))
        else:
            errors.append((1, f"rank {r}: process died (exit code {p.exitcode}) without reporting"))
    if errors:
        # a rank that died is the root cause; then a rank's own error; then stopped ranks
        ordered = list(dict.fromkeys(m for _, m in sorted(errors, key=lambda e: (e[0] != 1, e[0]))))
        extra = len(ordered) - 2
        raise KcompileError("; ".join(ordered[:2]) + (f" (+{extra} more)" if extra > 0 else ""))
    return [results[r][1] for r in range(nprocs)]

