"""Agreement statistics between two estimates (numpy only).

``r2(x, y)``: coefficient of determination of the least-squares line y ~ a*x + b (for one
predictor it equals the squared Pearson correlation). ``spearman(x, y)``: Pearson
correlation of the ranks (ties get their average rank). Both need >= 2 points with
non-constant values, else they return nan.
"""

from __future__ import annotations

import numpy as np


def r2(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    a, b = np.polyfit(x, y, 1)
    resid = y - (a * x + b)
    return float(1.0 - (resid @ resid) / ((y - y.mean()) @ (y - y.mean())))


def ranks(x) -> np.ndarray:
    """Average ranks (1-based) of ``x``."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(x.size)
    r[order] = np.arange(1, x.size + 1)
    for v in np.unique(x):  # ties: average rank
        m = x == v
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r


def spearman(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.size < 2:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
