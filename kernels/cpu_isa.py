"""The host CPU's vector unit, as the llvm schedules need it: lanes, registers, L1d size.

The llvm target is always this host's CPU (``llvm_get_system_cpu``), so tile sizes are
chosen for the same machine: AVX-512 (16 float lanes, 32 zmm registers), AVX2 (8 lanes,
16 ymm) or plain SSE (4 lanes, 16 xmm). A register block sized for 32 zmm spills on a
16-register AVX2 core, hence this module.

``KCOMPILE_ISA=avx512|avx2|sse`` overrides the detection (tests use it to build the
other ISA's schedules; the generated code still targets the host).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class VectorIsa:
    """name; lanes: float32 lanes per vector register; regs: vector registers;
    l1d: L1 data cache bytes per core."""

    name: str
    lanes: int
    regs: int
    l1d: int


AVX512 = VectorIsa("avx512", 16, 32, 48 << 10)
AVX2 = VectorIsa("avx2", 8, 16, 32 << 10)
SSE = VectorIsa("sse", 4, 16, 32 << 10)
KNOWN = {isa.name: isa for isa in (AVX512, AVX2, SSE)}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _l1d_bytes(default: int) -> int:
    try:
        v = os.sysconf("SC_LEVEL1_DCACHE_SIZE")
    except (ValueError, OSError, AttributeError):
        return default
    return int(v) if v and v > 0 else default


def isa_from_flags(flags: set[str], l1d: int | None = None) -> VectorIsa:
    """The widest ISA the ``/proc/cpuinfo`` flags allow (AVX-512 needs avx512f)."""
    base = AVX512 if "avx512f" in flags else AVX2 if "avx2" in flags and "fma" in flags else SSE
    return base if l1d is None else VectorIsa(base.name, base.lanes, base.regs, l1d)


@functools.lru_cache(maxsize=None)
def host_isa() -> VectorIsa:
    """This host's :class:`VectorIsa` (``KCOMPILE_ISA`` overrides; cached)."""
    forced = os.environ.get("KCOMPILE_ISA", "").strip().lower()
    if forced:
        if forced not in KNOWN:
            from kcompile.errors import UsageError

            raise UsageError(f"KCOMPILE_ISA must be one of {', '.join(KNOWN)}, got {forced!r}")
        return KNOWN[forced]
    isa = isa_from_flags(_cpu_flags())
    return VectorIsa(isa.name, isa.lanes, isa.regs, _l1d_bytes(isa.l1d))
