"""The Numba CPU kernels against the NumPy reference and PyTorch."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from kcompile.ir import ClusteredWeight
from kcompile.kernels import Geometry, conv2d, prepare
from kcompile.kernels import numba_cpu as M
from kcompile.kernels import reference as R
from kcompile.kernels.testing import random_weight
from test_kernels_reference import FORMS_OF, assert_close, conv_cases, torch_conv


@settings(max_examples=40, deadline=None)
@given(conv_cases())
def test_numba_forms_match_reference_and_torch(case):
    kind, cw, x, bias, g = case
    ref_t = torch_conv(x, cw, bias, g)
    for form in FORMS_OF[kind]:
        p = prepare(cw, bias, g.stride, g.padding, g.dilation, g.groups, backend="numba", form=form)
        y = p(x)
        assert_close(y, ref_t)
        assert_close(y, R.conv2d(x, cw, bias, g, form))


@settings(max_examples=10, deadline=None)
@given(conv_cases(kinds=("kernel", "son", "kse"), max_c=24))
def test_numba_wider_layers_cross_chunks(case):
    """More channels than one L1 chunk and more outputs than one output part."""
    kind, cw, x, bias, g = case
    y = prepare(cw, bias, g.stride, g.padding, g.dilation, g.groups, form="conv-then-add")(x)
    assert_close(y, torch_conv(x, cw, bias, g))


def kse_q(O, C, q, seed=0):
    rng = np.random.default_rng(seed)
    return ClusteredWeight("kernel", (O, C, 3, 3), torch.from_numpy(rng.standard_normal((C * q, 9)).astype(np.float32)),
                           torch.from_numpy(rng.integers(0, q, (O, C)).astype(np.uint8)), method="kse",
                           offset=torch.arange(C) * q)


@pytest.mark.parametrize("O, C, H, stride", [(96, 40, 9, 1), (64, 70, 13, 2), (256, 16, 3, 1)])
def test_fused_kernel_realistic_shapes(O, C, H, stride):
    """Several spatial tiles, several channel chunks (with remainders), split outputs."""
    cw = kse_q(O, C, 8, seed=O)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, C, H, H)).astype(np.float32)
    bias = rng.standard_normal(O).astype(np.float32)
    p = prepare(cw, bias, stride, (1, 1), backend="numba", form="conv-then-add")
    g = Geometry.make(stride, (1, 1), 1, 1)
    assert_close(p(x), torch_conv(x, cw, bias, g))
    # a prepared conv is reusable across input sizes and batch sizes
    x2 = rng.standard_normal((1, C, H + 3, H + 1)).astype(np.float32)
    assert_close(p(x2), torch_conv(x2, cw, bias, g))


def test_son_and_depthwise_through_default_choice():
    rng = np.random.default_rng(1)
    for kind, shape, groups in [("son", (16, 8, 3, 3), 1), ("kernel", (12, 1, 3, 3), 12)]:
        cw = random_weight(kind, shape, seed=2)
        x = rng.standard_normal((2, shape[1] * groups, 10, 10)).astype(np.float32)
        p = prepare(cw, None, 1, (1, 1), 1, groups)
        g = Geometry.make(1, (1, 1), 1, groups)
        assert_close(p(x), torch_conv(x, cw, None, g))


def test_input_not_modified_and_non_contiguous_input_accepted():
    cw = random_weight("kse", (6, 5, 3, 3), seed=3)
    x = np.random.default_rng(0).standard_normal((2, 5, 8, 8)).astype(np.float32)
    xt = np.asfortranarray(x)
    before = x.copy()
    y = conv2d(xt, cw, None, 1, (1, 1), form="conv-then-add")
    np.testing.assert_array_equal(x, before)
    assert_close(y, torch_conv(x, cw, None, Geometry.make(1, (1, 1))))


def test_fused_kernel_vectorises():
    """The stage-1 / stage-2 loops compile to packed (SIMD) fused multiply-adds."""
    from numba import njit
    item = njit(fastmath=M.FASTMATH)(M._cta_item.py_func)  # uncached copy: asm inspectable
    cw = kse_q(32, 16, 4)
    p = prepare(cw, None, 1, (1, 1), form="conv-then-add")
    x = np.random.default_rng(0).standard_normal((1, 16, 6, 6)).astype(np.float32)
    impl = p._impl
    lay, osplit, chunks, maxrows, uoff = impl._plan(6, 6, 1)
    xs = M.phase_input(x, lay)
    out = np.zeros((1, 32, lay.Ho, lay.Wo), np.float32)
    t = impl.t
    item(xs, lay.tapoff, t.zk, t.zchan, t.zstart, chunks, uoff, t.uscale, t.upc, t.Ck, M.TILE, lay.Ho, lay.Wo,
         lay.Wq, maxrows, impl.bias, out, 0, 0, 0, 0, 32)
    asm = "\n".join(item.inspect_asm().values())
    packed = re.findall(r"vfmadd\w*ps\s+[^\n]*%[xyz]mm", asm)
    assert len(packed) >= 16, "the fused kernel's inner loops did not vectorise"
    ref = torch_conv(x, cw, None, Geometry.make(1, (1, 1)))
    assert_close(out, ref)
