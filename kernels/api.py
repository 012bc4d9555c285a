"""Public entry points: ``prepare`` (once per layer) and ``PreparedConv.__call__`` (per input).

Forms (chosen per layer from the IR's op counts, ``cw.conv_macs``; override with ``form=``):

==============  ==========================================================================
form            computation
==============  ==========================================================================
conv-then-add   distinct (channel, centroid) products, then gather-accumulate (kernel, row,
                scalar units; KSE full channels by a dense conv of those channels)
add-then-conv   inputs sharing a centroid summed per output, then one conv per centroid
filter-gather   distinct filters convolved once (dense conv), output channels gathered
dense           decode the weight once, dense conv (oneDNN through torch)
==============  ==========================================================================

Backends: ``numba`` (CPU kernels of :mod:`.numba_cpu`, dense sub-convs through torch),
``reference`` (the literal NumPy math of :mod:`.reference`), ``cuda`` (numba.cuda kernels
of :mod:`.numba_cuda`; runs under ``NUMBA_ENABLE_CUDASIM=1`` without a GPU).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kcompile.errors import UsageError
from kcompile.ir import ClusteredWeight

from . import plan as P
from .plan import Geometry

BACKENDS = ("numba", "reference", "cuda")
FORMS = ("conv-then-add", "add-then-conv", "filter-gather", "dense")

#: A shared form is used only when the op-count bound (dense MACs / shared ops) reaches this:
#: oneDNN's dense conv runs near the FMA peak while the gather-accumulate of stage 2 is bound
#: by L1 loads (one per add), so a shared op costs ~3-4 dense MACs on this machine (measured
#: with benchmarks/layer_suite.py: q=O/4, bound 2.8, is slower than dense; q=8 at 64@56,
#: bound 4.2, is about even).
MIN_BOUND = {"kernel": 4.5, "row": 6.0, "scalar": 6.0}


def choose_form(cw: ClusteredWeight, groups: int) -> tuple[str, dict]:
    """(form, op counts) for a conv weight; op counts are per output position."""
    if cw.unit == "filter":
        n = int(np.unique(cw.global_index().numpy()).size)
        m = P.op_counts(cw, (1, 1), groups)
        return ("filter-gather" if n < cw.shape[0] else "dense"), m
    m = P.op_counts(cw, (1, 1), groups)
    if m["bound"] < MIN_BOUND[cw.unit]:
        return "dense", m
    return m["form"], m


def _as_np(t) -> np.ndarray | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().float().numpy()
    return np.ascontiguousarray(t, np.float32)


def torch_conv(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, geom: Geometry) -> np.ndarray:
    """Dense conv through torch (oneDNN); asymmetric padding via an explicit pad."""
    t, l, b, r = geom.padding
    with torch.inference_mode():
        xt = torch.from_numpy(x)
        wt = torch.from_numpy(w)
        bt = None if bias is None else torch.from_numpy(bias)
        if t == b and l == r:
            y = F.conv2d(xt, wt, bt, geom.stride, (t, l), geom.dilation, geom.groups)
        else:
            y = F.conv2d(F.pad(xt, (l, r, t, b)), wt, bt, geom.stride, 0, geom.dilation, geom.groups)
        return y.numpy()


class PreparedConv:
    """A clustered conv ready to run: ``y = prepared(x)``, x (N, C, H, W) float32 ->
    y (N, O, H', W') float32. Attributes: ``form``, ``backend``, ``ops`` (op counts per output
    position: dense, shared, bound), ``geometry``, ``in_channels``, ``out_channels``."""

    def __init__(self, cw: ClusteredWeight, bias, geom: Geometry, backend: str, form: str | None) -> None:
        if len(cw.shape) != 4:
            raise UsageError(f"conv weight must be 4-D (O, C/groups, kh, kw), got shape {tuple(cw.shape)}")
        if backend not in BACKENDS:
            raise UsageError(f"unknown kernel backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        O, Cg, kh, kw = cw.shape
        if O % geom.groups:
            raise UsageError(f"{O} output channels do not split into {geom.groups} groups")
        cw = cw.detached()
        auto, ops = choose_form(cw, geom.groups)
        form = auto if form is None else form
        if form not in FORMS:
            raise UsageError(f"unknown form {form!r}; expected one of {', '.join(FORMS)}")
        if form == "add-then-conv" and cw.unit != "kernel":
            raise UsageError(f"add-then-conv needs the kernel unit, not {cw.unit}")
        if form == "filter-gather" and cw.unit != "filter":
            raise UsageError(f"filter-gather needs the filter unit, not {cw.unit}")
        if form == "conv-then-add" and cw.unit == "filter":
            raise UsageError("conv-then-add needs a kernel, row or scalar unit")
        self.cw, self.form, self.backend, self.ops, self.geometry = cw, form, backend, ops, geom
        self.in_channels, self.out_channels, self.kernel_size = Cg * geom.groups, O, (kh, kw)
        self.bias = _as_np(bias)
        if self.bias is not None and self.bias.shape != (O,):
            raise UsageError(f"bias must have shape ({O},), got {self.bias.shape}")
        self._impl = None
        if backend == "numba":
            from .numba_cpu import build
            self._impl = build(cw, self.bias, geom, form)
        elif backend == "cuda":
            from .numba_cuda import build
            self._impl = build(cw, self.bias, geom, form)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = P.check_input(x, self.in_channels)
        if self.backend == "reference":
            from . import reference
            return reference.conv2d(x, self.cw, self.bias, self.geometry, self.form)
        return self._impl(x)

    def __repr__(self) -> str:
        return (f"PreparedConv({self.in_channels}->{self.out_channels}, {self.kernel_size}, unit={self.cw.unit}, "
                f"form={self.form}, backend={self.backend}, bound={self.ops['bound']:.2f})")


def prepare(cw: ClusteredWeight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1),
            groups: int = 1, backend: str = "numba", form: str | None = None) -> PreparedConv:
    """Preprocess one clustered conv once (decoded centroids, index tables, form choice).

    padding: (top, left, bottom, right) or (ph, pw). form: force one of ``FORMS``."""
    return PreparedConv(cw, bias, Geometry.make(stride, padding, dilation, groups), backend, form)


def conv2d(x, cw: ClusteredWeight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1),
           groups: int = 1, backend: str = "numba", form: str | None = None) -> np.ndarray:
    """One-shot clustered conv: ``prepare(...)(x)``."""
    return prepare(cw, bias, stride, padding, dilation, groups, backend, form)(x)


class PreparedLinear:
    """A clustered linear layer: x (N, I) -> (N, O). Filter unit with fewer distinct rows than
    outputs: distinct rows once, then gather (form ``filter-gather``); else decode-then-dense."""

    def __init__(self, cw: ClusteredWeight, bias, backend: str) -> None:
        if len(cw.shape) != 2:
            raise UsageError(f"linear weight must be 2-D (O, I), got shape {tuple(cw.shape)}")
        if backend not in BACKENDS:
            raise UsageError(f"unknown kernel backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        cw = cw.detached()
        self.cw, self.backend = cw, backend
        self.out_features, self.in_features = cw.shape
        self.bias = _as_np(bias)
        if self.bias is not None and self.bias.shape != (self.out_features,):
            raise UsageError(f"bias must have shape ({self.out_features},), got {self.bias.shape}")
        gidx = cw.global_index().numpy()
        uniq, inv = np.unique(gidx, return_inverse=True) if cw.unit == "filter" else (None, None)
        if cw.unit == "filter" and len(uniq) < self.out_features and cw.scale is None:
            self.form = "filter-gather"
            self._w = np.ascontiguousarray(P.book_array(cw)[uniq])
            self._gather = inv.reshape(-1)
        else:
            self.form = "dense"
            self._w = P.decoded_weight(cw)
            self._gather = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise UsageError(f"x must be (N, {self.in_features}), got shape {tuple(x.shape)}")
        if self.backend == "reference":
            from . import reference
            return reference.linear(x, self.cw, self.bias)
        x = np.ascontiguousarray(x, np.float32)
        y = x @ self._w.T
        if self._gather is not None:
            y = y[:, self._gather]
        if self.bias is not None:
            y = y + self.bias
        return np.ascontiguousarray(y, np.float32)


def prepare_linear(cw: ClusteredWeight, bias=None, backend: str = "numba") -> PreparedLinear:
    return PreparedLinear(cw, bias, backend)


def linear(x, cw: ClusteredWeight, bias=None, backend: str = "numba") -> np.ndarray:
    """Clustered linear layer: x (N, I) -> (N, O)."""
    return PreparedLinear(cw, bias, backend)(x)
