"""Deep k-Means hardware metrics (Wu et al. 2018, after Sakr et al. 2017), per layer.

With B_w-bit weights and B_x-bit activations, for a layer whose dot products have length D
(C/groups*kh*kw, +1 with a bias):

- compute cost in 1-bit full adders, one dot product:
  ``FA(D) = D*B_w*B_x + (D-1)*(B_x + B_w + ceil(log2 D) - 1)``;
  a dense conv performs N*O*H'*W' of them. Weight sharing reduces the *multiplications*
  only (the factorised form multiplies each distinct centroid once per input and keeps the
  additions), so a clustered layer costs ``mults*B_w*B_x + dots*(D-1)*(adder width)`` with
  ``mults`` from the IR's sharing-aware counts (``ClusteredWeight.conv_macs``). A filter-
  clustered layer computes only its n distinct filters (redundant convolutions skipped).
- weight representational cost ``N_w * |W| * B_w``: N_w = N*H'*W' uses of each stored weight,
  and |W|*B_w = the bits the layer really stores (``cw.storage_bits(value_bits=B_w)``:
  codebook + indices + scales; dense: O*D*B_w).
- activation representational cost ``N_x * |X| * B_x`` with N_x*|X| = the activation reads
  of the dense layer (its MAC count): unchanged by weight sharing, except that KSE's pruned
  input channels and a filter layer's skipped filters read nothing.
- the sum in MAC units: compute / FA_MAC + 6 * (weight_rep / B_w + activation_rep / B_x),
  where FA_MAC = B_w*B_x + B_w + B_x is one multiply-accumulate in full adders and 6 is the
  cost of a global-buffer word access relative to a MAC (Eyeriss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .costs import Summable
from .layers import LayerSpec, op_counts, weight_bits

BUFFER_FACTOR = 6.0


def adder_width(D: int, bw: int, bx: int) -> int:
    """Width of the accumulation adders of a length-D dot product: B_x + B_w + ceil(log2 D) - 1."""
    return bx + bw + (math.ceil(math.log2(D)) if D > 1 else 0) - 1


def fa(D: int, bw: int, bx: int) -> int:
    """Full-adder cost of one D-dim dot product: D*B_w*B_x + (D-1)*(B_x + B_w + ceil(log2 D) - 1)."""
    if D < 1:
        raise ValueError(f"dot-product length must be >= 1, got {D}")
    return D * bw * bx + (D - 1) * adder_width(D, bw, bx)


def fa_mac(bw: int, bx: int) -> int:
    """One multiply-accumulate in full adders (the MAC unit of the summed metric)."""
    return bw * bx + bw + bx


@dataclass(frozen=True)
class DKMCost(Summable):
    """Deep k-Means metrics of a layer (batch included).

    fa_compute      full adders          weight_rep, activation_rep   bits moved
    mac_units       compute/FA_MAC + 6*(weight_rep/B_w + activation_rep/B_x)
    data_units      the data-movement part of ``mac_units`` (6*(...))
    """

    fa_compute: float = 0.0
    weight_rep: float = 0.0
    activation_rep: float = 0.0
    mac_units: float = 0.0
    data_units: float = 0.0

    @property
    def compute_units(self) -> float:
        """The compute part of ``mac_units``."""
        return self.mac_units - self.data_units

    def as_dict(self) -> dict:
        return {"fa_compute": self.fa_compute, "weight_rep": self.weight_rep,
                "activation_rep": self.activation_rep, "mac_units": self.mac_units}


def dkm_cost(spec: LayerSpec, bw: int = 8, bx: int = 8, factorise: bool = True) -> DKMCost:
    """The Deep k-Means metrics of one layer at B_w = ``bw``, B_x = ``bx`` (see ``op_counts``)."""
    ops = op_counts(spec, factorise)
    N, P = spec.batch, spec.P
    d_kept = max(1, round(spec.D * ops.kept))
    d_eff = d_kept + (1 if spec.bias else 0)
    dots = N * ops.o_eff * P
    if ops.form in ("dense", "decode-dense", "filter-gather"):
        fa_compute = float(dots) * fa(d_eff, bw, bx)
    else:
        mults = N * ops.products + (dots if spec.bias else 0)
        fa_compute = float(mults) * bw * bx + float(dots) * (d_eff - 1) * adder_width(d_eff, bw, bx)
    weight_rep = float(N * P) * weight_bits(spec, bw)
    activation_rep = float(N * ops.o_eff * d_kept * P) * bx
    data = BUFFER_FACTOR * (weight_rep / bw + activation_rep / bx)
    total = fa_compute / fa_mac(bw, bx) + data
    return DKMCost(fa_compute, weight_rep, activation_rep, total, data)
