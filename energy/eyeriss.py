"""Eyeriss-style access counts of a layer under a simple row-stationary-like dataflow.

Energy = sum over events of count x cost, with costs relative to one MAC (Eyeriss: MAC 1,
register file 1, inter-PE array 2, global buffer 6, DRAM 200; ``costs.EnergyTable``).
The access counts come from this dataflow model (all counts for the whole batch N, memory
counts in words: a weight word is B_w bits, an activation / partial-sum word B_x bits):

Dense conv, weight (O, Cg, kh, kw), input (N, C, H, W), output (N, O, H', W'), P = H'W',
M = N*O*Cg*kh*kw*P MACs:

- **MAC**: M.
- **RF**: 3 per MAC (read the weight, read the activation, update the partial sum). A PE
  keeps one filter row in its register file and slides it along an input row (row
  stationary), so every operand of a MAC comes from the RF.
- **array**: one inter-PE transfer per 1-D row result (the kh row results of a PE column
  are accumulated vertically): N*O*Cg*kh*P.
- **buffer**:
  - inputs: each input word is delivered from the global buffer once per tile of
    ``out_tile`` (16) output channels of its group: N*C*H*W*ceil((O/groups)/out_tile);
  - weights: a filter row stays in the RF for one output row of one image, so each weight
    word is read N*H' times;
  - partial sums: written once per tile of ``in_tile`` (16) input channels and read back
    for every tile but the first: N*O*P*(2*ceil(Cg/in_tile) - 1).
- **DRAM**: compulsory traffic only (the buffer is assumed to hold a layer's working set):
  inputs N*C*H*W, weights once, outputs N*O*P.

Sharing-aware changes for a clustered layer (its IR ``cw``):

- weight words everywhere are ``cw.storage_bits(value_bits=B_w)/B_w``: codebook reads,
  index reads and scales instead of dense weights (the index and codebook are what moves);
- factorised multiplications (``cw.conv_macs``: conv-then-add / add-then-conv): each
  distinct product costs one MAC and 3 RF accesses; each accumulation into an output costs
  one MAC, 2 RF accesses (read the product, update the sum) plus the read of its index
  (index_bits/B_w words); the accumulations are the array transfers;
- pruned input channels (KSE): their activations are never read (buffer and DRAM inputs
  scaled by the kept fraction);
- filter unit: only the n distinct filters are convolved (skipped redundant convolutions);
  the gathered output channels cost one buffer write each (N*(O-n)*P);
- a layer whose factorised form is not cheaper than dense is run decode-then-dense: dense
  counts with the compressed weight traffic.

A linear layer is a 1x1 conv on H*W = (number of positions) (usually 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .costs import Accesses
from .layers import LayerSpec, index_bits, op_counts, weight_bits


@dataclass(frozen=True)
class Dataflow:
    """Tiling assumptions of the dataflow model (see the module docstring)."""

    out_tile: int = 16   # output channels sharing one delivery of an input word
    in_tile: int = 16    # input channels accumulated in the array before a psum spill
    factorise: bool = True  # False: clustered layers run decode-then-dense (storage savings only)


def accesses(spec: LayerSpec, bw: int = 8, bx: int = 8, flow: Dataflow = Dataflow()) -> Accesses:
    """Access counts of one layer (batch included) under ``flow``."""
    N, P = spec.batch, spec.P
    _, C, H, W = spec.in_shape
    O, Cg, kh, kw = spec.weight_shape
    ops = op_counts(spec, flow.factorise)
    kept = ops.kept
    o_eff = ops.o_eff
    w_words = weight_bits(spec, bw) / bw

    if ops.form in ("conv-then-add", "add-then-conv"):
        macs = float(N) * ops.macs
        mults = float(N) * ops.products
        adds = float(N) * ops.macs
        idx_words = index_bits(spec) / bw
        rf = 3.0 * N * ops.products + N * ops.accum * (2.0 + idx_words)
        array = float(N) * ops.accum
    else:  # dense, decode-dense, filter-gather: a dense conv over o_eff filters
        macs = float(N) * ops.macs
        mults = adds = macs
        rf = 3.0 * macs
        array = float(N) * o_eff * Cg * kept * kh * P

    in_words = float(N) * C * H * W * kept
    o_per_group = max(1, o_eff // max(1, spec.groups))
    buf_in = in_words * math.ceil(o_per_group / flow.out_tile)
    h_out = spec.out_hw[0]
    buf_w = w_words * N * h_out
    c_kept = max(1, round(Cg * kept))
    buf_psum = float(N) * o_eff * P * (2 * math.ceil(c_kept / flow.in_tile) - 1)
    buf_gather = float(N) * (O - o_eff) * P
    buffer = buf_in + buf_w + buf_psum + buf_gather
    dram = in_words + w_words + float(N) * O * P
    return Accesses(macs=macs, mults=mults, adds=adds, rf=rf, array=array, buffer=buffer, dram=dram)
