"""Shared-centroid kernels: run a clustered conv / linear layer without materialising more
work than its distinct centroids need.

``prepare(cw, bias, stride, padding, dilation, groups, backend)`` does all per-weight work
once and returns a :class:`PreparedConv` (x (N, C, H, W) float32 -> y (N, O, H', W')).
Backends: ``numba`` (CPU), ``reference`` (NumPy, literal math), ``cuda`` (numba.cuda).
This package depends only on :mod:`kcompile.ir` / :mod:`kcompile.errors` (a leaf).
"""

from .api import (BACKENDS, FORMS, PreparedConv, PreparedLinear, choose_form, conv2d, linear, prepare,
                  prepare_linear)
from .plan import Geometry

__all__ = ["BACKENDS", "FORMS", "Geometry", "PreparedConv", "PreparedLinear", "choose_form", "conv2d",
           "linear", "prepare", "prepare_linear"]
