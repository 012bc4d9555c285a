"""The host CPU's vector unit, as the llvm schedules need it: lanes, registers, L1d size.

The llvm target is always this host's CPU (``llvm_get_system_cpu``), so tile sizes are
chosen for the same machine: AVX-512 (16 float lanes, 32 zmm registers), AVX2 (8 lanes,
16 ymm) or plain SSE (4 lanes, 16 xmm). A register block sized for 32 zmm spills on a
16-register AVX2 core, hence this module.

``KCOMPILE_ISA=avx512|avx2|sse`` overrides the detection (to time another ISA's tiles on
this host; the generated code still targets the host). The tile functions also take an
explicit ``isa``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class VectorIsa:
    """name; lanes: float32 lanes per vector register; regs: vector registers;
    l1d / l2: L1 data / L2 cache bytes per core."""

    name: str
    lanes: int
    regs: int
    l1d: int
    l2: int = 512 << 10


AVX512 = VectorIsa("avx512", 16, 32, 48 << 10, 1 << 20)
AVX2 = VectorIsa("avx2", 8, 16, 32 << 10, 512 << 10)
SSE = VectorIsa("sse", 4, 16, 32 << 10, 256 << 10)
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


def _cache_bytes(name: str, default: int) -> int:
    try:
        v = os.sysconf(name)
    except (ValueError, OSError, AttributeError):
        return default
    return int(v) if v and v > 0 else default


def isa_from_flags(flags: set[str], l1d: int | None = None, l2: int | None = None) -> VectorIsa:
    """The widest ISA the ``/proc/cpuinfo`` flags allow (AVX-512 needs avx512f); cache
    sizes default to the ISA's typical ones."""
    base = AVX512 if "avx512f" in flags else AVX2 if "avx2" in flags and "fma" in flags else SSE
    return replace(base, l1d=l1d or base.l1d, l2=l2 or base.l2)


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
    return replace(isa, l1d=_cache_bytes("SC_LEVEL1_DCACHE_SIZE", isa.l1d), l2=_cache_bytes("SC_LEVEL2_CACHE_SIZE", isa.l2))
