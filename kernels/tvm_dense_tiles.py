"""Register tiles for the llvm direct dense conv (form ``dense``: the stem, 1x1 downsample
convs, the convs of an unclustered model, decode-then-dense clustered layers).

``tvm_schedule.plan_tiles`` sizes its register block for the ``shared`` form, whose
reduction is a gather (one z vector per FMA whatever the block): it favours long position
tiles (nv up to 16) and then fits at most ``16 // nv`` outputs, often one. In a direct
conv, each input vector of a tap can feed OB output channels, so a block of OB = 8 outputs
x nv = 2 vectors (or 4 x 4) -- 16 accumulators, one input load per OB FMAs -- is
load-bound far less. Measured on this machine (1 and 2 threads, loaded, min of 15 calls),
against ``plan_tiles``: 7x7/2 stem 0.34-0.43x the time, 64@56 3x3 0.39x, 256@14 0.5-0.6x,
128@28 0.78x, 1x1/2 downsample 0.6-0.9x, 512@7 ~1.0x.
"""

from __future__ import annotations

from .tvm_compute import ConvSpec
from .tvm_schedule import VEC, LlvmTiles

ACC_VECTORS = 16  # accumulator vectors per register block (AVX-512 has 32 zmm)


def dense_tiles(spec: ConvSpec, planned: LlvmTiles) -> LlvmTiles | None:
    """Tiles for the direct dense conv of ``spec`` (x (N, C, H, W), weight (O, C/groups,
    kh, kw)) when ``planned`` (``tvm_schedule.plan_tiles``' choice) blocks fewer than 4
    output channels: OB output channels (8 / 4, dividing O / groups) x nv vectors of
    positions with OB * nv = 16, nv no longer than the wide rows need. None to keep
    ``planned`` (it already shares each input load over >= 4 outputs, or fewer than 4
    outputs per group divide evenly: depthwise etc.)."""
    if planned.OB >= 4:
        return None
    OB = next((ob for ob in (8, 4) if spec.Og % ob == 0), None)
    if OB is None:
        return None
    nv = max(1, min(ACC_VECTORS // OB, -(-spec.wide_len() // VEC)))
    TL = VEC * nv
    return LlvmTiles(og=1, OB=OB, nv=nv, ZT=TL, P=spec.wide_len(TL))
