"""A latency-aware term: a linear roofline-style model of CPU latency, calibrated on dense layers.

The Eyeriss-style energy ranks layers by data movement (DRAM words cost 200 MACs), which is
not what a CPU's latency follows: at batch 1 a conv with many weights but few positions
(resnet18's layer4) costs as many MACs as one with few weights and many positions
(layer1), and both run compute-bound in oneDNN. Energy also assumes the factorised form of a
clustered layer, while a backend may decode the weight and run a dense conv instead.

``features(spec, executed_form)``: per layer (batch included)
  ops    operations the backend executes: dense MACs for ``dense``; dense MACs + one gather
         per weight for ``decode-dense`` (decoding every call); products + ``shared_op_cost``
         x accumulations for the factorised forms (a gather-accumulate is load-bound and costs
         more than a fused MAC; 1.6 is the op-count bound below which kcompile.kernels
         itself prefers dense for the kernel unit); distinct filters x D x P for filter-gather;
  words  compulsory memory traffic in words (inputs + stored weight + outputs), as in the
         Eyeriss model's DRAM count.
``Roofline.fit(features, seconds)`` fits t = a*ops + b*words + c (a, b, c >= 0) by least
squares; fit it on the *dense* layers of a backend only, then predict the clustered ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .layers import LayerSpec, op_counts, weight_bits

SHARED_OP_COST = 1.6


def features(spec: LayerSpec, executed_form: str | None = None, bw: int = 32,
             shared_op_cost: float = SHARED_OP_COST) -> tuple[float, float]:
    """(ops, words) a backend executes for ``spec`` when it runs ``executed_form``.

    ``executed_form`` None: the sharing-aware form the energy model assumes.
    """
    N = spec.batch
    ops = op_counts(spec)
    form = executed_form or ops.form
    dense = float(spec.dense_macs)
    if spec.cw is None or form == "dense":
        n_ops = dense
    elif form == "decode-dense":
        n_ops = dense + spec.O * spec.D
    elif form == "filter-gather":
        n_ops = float(N) * ops.macs
    elif form in ("conv-then-add", "add-then-conv"):
        if ops.form in ("conv-then-add", "add-then-conv"):
            n_ops = float(N) * (ops.products + shared_op_cost * ops.accum)
        else:  # the backend factorises a layer the energy model would not: count it anyway
            n_ops = dense
    else:
        n_ops = dense
    _, C, H, W = spec.in_shape
    words = float(N) * C * H * W + weight_bits(spec, bw) / bw + float(N) * spec.O * spec.P
    return n_ops, words


@dataclass(frozen=True)
class Roofline:
    """t = sec_per_op * ops + sec_per_word * words + overhead_s (seconds)."""

    sec_per_op: float
    sec_per_word: float
    overhead_s: float

    def predict(self, feats) -> np.ndarray:
        f = np.asarray(feats, dtype=np.float64).reshape(-1, 2)
        return f[:, 0] * self.sec_per_op + f[:, 1] * self.sec_per_word + self.overhead_s

    @classmethod
    def fit(cls, feats, seconds) -> "Roofline":
        """Non-negative least squares over (ops, words, 1) (active-set by dropping negatives)."""
        A = np.column_stack([np.asarray(feats, dtype=np.float64).reshape(-1, 2), np.ones(len(seconds))])
        y = np.asarray(seconds, dtype=np.float64)
        scale = np.abs(A).max(axis=0)
        scale[scale == 0] = 1.0
        active = [0, 1, 2]
        coef = np.zeros(3)
        while active:
            sol, *_ = np.linalg.lstsq(A[:, active] / scale[active], y, rcond=None)
            sol = sol / scale[active]
            if (sol >= 0).all():
                coef[:] = 0
                coef[active] = sol
                break
            active = [a for a, s in zip(active, sol) if s > 0] if (sol > 0).any() else []
        return cls(*coef)
