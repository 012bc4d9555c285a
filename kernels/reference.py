"""NumPy references: the math of every shared-centroid form, written literally (slow).

All functions take x (N, C, H, W) float32 and return y (N, O, H', W') float32. They follow
the formulas of :mod:`kcompile.kernels.plan` one loop at a time, so that the fast backends
have an independent oracle:

- :func:`conv2d_dense`: y[o] = sum_c sum_taps w[o, c, i, j] x[c, shifted]   (the definition)
- :func:`kernel_conv_then_add`: z[c, n] = mu_n * x_c per distinct centroid n of channel c,
  y_o = sum_c s[o, c] z[c, idx[o, c]]; KSE's full channels by a dense conv, pruned skipped
- :func:`kernel_add_then_conv`: a[o, n] = sum_{c: idx[o,c]=n} s[o,c] x_c, y_o = sum_n mu_n * a[o, n]
- :func:`filter_gather`: distinct filters convolved once, outputs gathered
- :func:`units_conv_then_add`: the same for row / scalar units (distinct (channel, position,
  centroid) products, then accumulation)
- :func:`linear`: decode-then-dense
"""

from __future__ import annotations

import numpy as np

from kcompile.ir import ClusteredWeight

from .plan import (Geometry, channel_masks, check_input, decoded_weight, filter_tables,
                   sub_kernels, unit_keys_vectors)


def _padded(x: np.ndarray, g: Geometry) -> np.ndarray:
    t, l, b, r = g.padding
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))


def _tap(xp: np.ndarray, i: int, j: int, g: Geometry, Ho: int, Wo: int) -> np.ndarray:
    """The input seen by tap (i, j) at every output position: xp[..., Ho, Wo] (a view)."""
    sh, sw = g.stride
    dh, dw = g.dilation
    return xp[..., i * dh: i * dh + sh * (Ho - 1) + 1: sh, j * dw: j * dw + sw * (Wo - 1) + 1: sw]


def single_conv(xp_c: np.ndarray, k: np.ndarray, g: Geometry, Ho: int, Wo: int) -> np.ndarray:
    """One channel with one kernel: xp_c (N, Hp, Wp) padded, k (kh, kw) -> (N, Ho, Wo)."""
    out = np.zeros((xp_c.shape[0], Ho, Wo), np.float64)
    for i in range(k.shape[0]):
        for j in range(k.shape[1]):
            if k[i, j] != 0:
                out += float(k[i, j]) * _tap(xp_c, i, j, g, Ho, Wo)
    return out


def conv2d_dense(x: np.ndarray, w: np.ndarray, bias=None, geom: Geometry = Geometry()) -> np.ndarray:
    """Direct convolution. w (O, C/groups, kh, kw)."""
    O, Cg, kh, kw = w.shape
    x = check_input(x, Cg * geom.groups)
    N, C, H, W = x.shape
    Ho, Wo = geom.out_hw(H, W, kh, kw)
    xp = _padded(x, geom).astype(np.float64)
    Og = O // geom.groups
    y = np.zeros((N, O, Ho, Wo), np.float64)
    for gi in range(geom.groups):
        xs = xp[:, gi * Cg:(gi + 1) * Cg]
        for i in range(kh):
            for j in range(kw):
                y[:, gi * Og:(gi + 1) * Og] += np.einsum("oc,nchw->nohw", w[gi * Og:(gi + 1) * Og, :, i, j],
                                                          _tap(xs, i, j, geom, Ho, Wo))
    if bias is not None:
        y += np.asarray(bias, np.float64).reshape(1, O, 1, 1)
    return y.astype(np.float32)


def _full_part(x, cw: ClusteredWeight, geom: Geometry, Ho, Wo) -> np.ndarray:
    """Dense conv of KSE's full channels (zero elsewhere)."""
    _, full = channel_masks(cw)
    if not full.any():
        return 0.0
    w = decoded_weight(cw) * full.reshape(1, -1, 1, 1)
    return conv2d_dense(x, w, None, geom).astype(np.float64)


def units_conv_then_add(x: np.ndarray, cw: ClusteredWeight, bias=None, geom: Geometry = Geometry()) -> np.ndarray:
    """Conv-then-add for kernel, row and scalar units (stage 1 per distinct sub-kernel)."""
    O, Cg, kh, kw = cw.shape
    x = check_input(x, Cg * geom.groups)
    N, C, H, W = x.shape
    Ho, Wo = geom.out_hw(H, W, kh, kw)
    Og = O // geom.groups
    xp = _padded(x, geom).astype(np.float64)
    key, kern, scale = sub_kernels(cw)  # (O, Cg, upc), (O, Cg, upc, kh*kw), (O, Cg, upc)
    pruned, full = channel_masks(cw)
    y = np.zeros((N, O, Ho, Wo), np.float64)
    for gi in range(geom.groups):
        for c in range(Cg):
            if pruned[c] or full[c]:
                continue
            outs = range(gi * Og, (gi + 1) * Og)
            z = {}  # stage 1: one product per distinct (position, centroid, transform)
            for o in outs:
                for u in range(key.shape[2]):
                    n = int(key[o, c, u])
                    if n not in z:
                        z[n] = single_conv(xp[:, gi * Cg + c], kern[o, c, u].reshape(kh, kw), geom, Ho, Wo)
            for o in outs:  # stage 2: y_o += s[o, c] * z[c, idx[o, c]]
                for u in range(key.shape[2]):
                    y[:, o] += float(scale[o, c, u]) * z[int(key[o, c, u])]
    y += _full_part(x, cw, geom, Ho, Wo)
    if bias is not None:
        y += np.asarray(bias, np.float64).reshape(1, O, 1, 1)
    return y.astype(np.float32)


kernel_conv_then_add = units_conv_then_add


def kernel_add_then_conv(x: np.ndarray, cw: ClusteredWeight, bias=None, geom: Geometry = Geometry()) -> np.ndarray:
    """Add-then-conv (kernel unit): inputs sharing a centroid are summed, then convolved once."""
    if cw.unit != "kernel":
        raise ValueError("add-then-conv needs the kernel unit")
    O, Cg, kh, kw = cw.shape
    x = check_input(x, Cg * geom.groups)
    N, C, H, W = x.shape
    Ho, Wo = geom.out_hw(H, W, kh, kw)
    Og = O // geom.groups
    xp = _padded(x, geom).astype(np.float64)
    key, vec, scale = unit_keys_vectors(cw)
    pruned, full = channel_masks(cw)
    y = np.zeros((N, O, Ho, Wo), np.float64)
    for o in range(O):
        gi = o // Og
        a, mu = {}, {}
        for c in range(Cg):
            if pruned[c] or full[c]:
                continue
            n = int(key[o, c])
            a[n] = a.get(n, 0.0) + float(scale[o, c]) * xp[:, gi * Cg + c]
            mu[n] = vec[o, c].reshape(kh, kw)
        for n in a:
            y[:, o] += single_conv(a[n], mu[n], geom, Ho, Wo)
    y += _full_part(x, cw, geom, Ho, Wo)
    if bias is not None:
        y += np.asarray(bias, np.float64).reshape(1, O, 1, 1)
    return y.astype(np.float32)


def filter_gather(x: np.ndarray, cw: ClusteredWeight, bias=None, geom: Geometry = Geometry()) -> np.ndarray:
    """Filter unit: each distinct filter convolved once (per group), outputs gathered."""
    ft = filter_tables(cw, geom.groups)
    # distinct filters of group g are output channels g*n_max.. of a grouped conv with n_max per group
    yd = conv2d_dense(x, ft.weight, None, geom)
    y = yd[:, ft.gather].astype(np.float64)
    if bias is not None:
        y += np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
    return y.astype(np.float32)


def decode_dense(x: np.ndarray, cw: ClusteredWeight, bias=None, geom: Geometry = Geometry()) -> np.ndarray:
    return conv2d_dense(x, decoded_weight(cw), bias, geom)


def linear(x: np.ndarray, cw: ClusteredWeight, bias=None) -> np.ndarray:
    """x (N, I) -> (N, O): decode, then x W^T + b."""
    w = decoded_weight(cw).astype(np.float64)
    y = np.asarray(x, np.float64) @ w.T
    if bias is not None:
        y += np.asarray(bias, np.float64)
    return y.astype(np.float32)


FORMS = {
    "conv-then-add": units_conv_then_add,
    "add-then-conv": kernel_add_then_conv,
    "filter-gather": filter_gather,
    "dense": decode_dense,
}


def conv2d(x, cw: ClusteredWeight, bias=None, geom: Geometry = Geometry(), form: str | None = None) -> np.ndarray:
    """Reference clustered conv in ``form`` (default: the unit's natural shared form)."""
    if form is None:
        form = "filter-gather" if cw.unit == "filter" else "conv-then-add"
    return FORMS[form](x, cw, bias, geom)
