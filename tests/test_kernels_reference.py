"""The NumPy references of kcompile.kernels against PyTorch on the decoded weight."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kcompile.errors import UsageError
from kcompile.kernels import Geometry, choose_form, conv2d, linear, prepare
from kcompile.kernels import plan as P
from kcompile.kernels import reference as R
from kcompile.kernels.testing import KINDS, random_weight


def torch_conv(x, cw, bias, g: Geometry):
    """Ground truth: torch conv2d with the decoded weight (explicit asymmetric pad)."""
    t, l, b, r = g.padding
    xt = F.pad(torch.from_numpy(x), (l, r, t, b))
    bt = None if bias is None else torch.from_numpy(bias)
    with torch.no_grad():
        return F.conv2d(xt, cw.decode().detach(), bt, g.stride, 0, g.dilation, g.groups).numpy()


def assert_close(y, ref, rel=1e-4):
    assert y.shape == ref.shape and y.dtype == np.float32
    span = float(ref.max() - ref.min()) or 1.0
    err = float(np.abs(y.astype(np.float64) - ref).max())
    assert err <= rel * span, f"max error {err:.3g} > {rel} x output range {span:.3g}"


FORMS_OF = {
    "kernel": ["conv-then-add", "add-then-conv", "dense"],
    "son": ["conv-then-add", "add-then-conv", "dense"],
    "kse": ["conv-then-add", "add-then-conv", "dense"],
    "filter": ["filter-gather", "dense"],
    "row": ["conv-then-add", "dense"],
    "scalar": ["conv-then-add", "dense"],
}


@st.composite
def conv_cases(draw, kinds=KINDS, max_c=5):
    kind = draw(st.sampled_from(kinds))
    groups = 1 if kind == "kse" else draw(st.sampled_from([1, 1, 2, 3]))
    Og, Cg = draw(st.integers(1, max_c)), draw(st.integers(1, max_c))
    if kind == "kse":
        Cg = max(Cg, 3)
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(4))
    H = draw(st.integers(max(1, dil[0] * (kh - 1) + 1 - pad[0] - pad[2]), 9))
    W = draw(st.integers(max(1, dil[1] * (kw - 1) + 1 - pad[1] - pad[3]), 9))
    N = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**16))
    cw = random_weight(kind, (Og * groups, Cg, kh, kw), seed=seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, Cg * groups, H, W)).astype(np.float32)
    bias = rng.standard_normal(Og * groups).astype(np.float32) if draw(st.booleans()) else None
    return kind, cw, x, bias, Geometry.make(stride, pad, dil, groups)


@settings(max_examples=30, deadline=None)
@given(conv_cases())
def test_reference_forms_match_torch(case):
    kind, cw, x, bias, g = case
    ref = torch_conv(x, cw, bias, g)
    for form in FORMS_OF[kind]:
        assert_close(R.conv2d(x, cw, bias, g, form), ref)


@settings(max_examples=15, deadline=None)
@given(conv_cases(kinds=("kernel",)))
def test_reference_dense_conv_matches_torch(case):
    _, cw, x, bias, g = case
    w = cw.decode().detach().numpy()
    assert_close(R.conv2d_dense(x, w, bias, g), torch_conv(x, cw, bias, g))


def test_reference_backend_through_public_api():
    cw = random_weight("son", (4, 3, 3, 3), seed=3)
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 6)).astype(np.float32)
    g = Geometry.make((2, 1), (1, 0, 2, 1), (1, 2), 1)
    y = conv2d(x, cw, None, (2, 1), (1, 0, 2, 1), (1, 2), backend="reference")
    assert_close(y, torch_conv(x, cw, None, g))


def test_input_is_not_modified():
    cw = random_weight("kse", (4, 4, 3, 3), seed=1)
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 5)).astype(np.float32)
    before = x.copy()
    conv2d(x, cw, backend="reference", padding=(1, 1))
    np.testing.assert_array_equal(x, before)


def test_kse_pruned_and_full_channels_are_handled():
    cw = random_weight("kse", (5, 4, 3, 3), seed=2)
    assert cw.pruned is not None and cw.full is not None
    t = P.shared_tables(cw, 1)
    pruned, full = P.channel_masks(cw)
    assert set(t.kept.tolist()) == set(np.flatnonzero(~(pruned | full)).tolist())
    # distinct rows per kept channel = distinct centroids used by that channel
    for k, c in enumerate(t.kept):
        n_rows = t.zstart[k + 1] - t.zstart[k]
        assert n_rows == len(np.unique(cw.index[:, c].numpy()))


def test_son_tables_count_distinct_centroid_transform_pairs():
    cw = random_weight("son", (8, 3, 3, 3), seed=5)
    t = P.shared_tables(cw, 1)
    ids = (cw.index.long() * cw.num_transforms + cw.transform.long()).numpy()
    assert t.rows == sum(len(np.unique(ids[:, c])) for c in range(3))
    assert t.rows == cw.distinct_per_group((1,))
    np.testing.assert_allclose(t.uscale, cw.scale.float().numpy())


def test_filter_tables_gather_reproduces_weight():
    cw = random_weight("filter", (6, 2, 3, 3), seed=4)
    ft = P.filter_tables(cw, 1)
    np.testing.assert_allclose(ft.weight[ft.gather], cw.decode().detach().numpy())


@pytest.mark.parametrize("padding, expect", [((1, 2), (1, 2, 1, 2)), (3, (3, 3, 3, 3)), ((0, 1, 2, 3), (0, 1, 2, 3))])
def test_geometry_padding_forms(padding, expect):
    assert Geometry.make(1, padding, 1, 1).padding == expect


@pytest.mark.parametrize("kw", [dict(padding=(1, 2, 3)), dict(stride=0), dict(padding=(-1, 0)), dict(groups=0)])
def test_geometry_rejects_bad_values(kw):
    with pytest.raises(UsageError):
        Geometry.make(**{"stride": 1, "padding": 0, "dilation": 1, "groups": 1, **kw})


def test_bad_inputs_are_one_line_usage_errors():
    cw = random_weight("kernel", (4, 3, 3, 3), seed=0)
    with pytest.raises(UsageError, match="must be"):
        conv2d(np.zeros((1, 5, 6, 6), np.float32), cw, backend="reference")
    with pytest.raises(UsageError, match="too small"):
        conv2d(np.zeros((1, 3, 2, 2), np.float32), cw, backend="reference")
    with pytest.raises(UsageError, match="backend"):
        prepare(cw, backend="opencl")
    with pytest.raises(UsageError, match="form"):
        prepare(cw, backend="reference", form="winograd")
    with pytest.raises(UsageError, match="groups"):
        prepare(cw, groups=3, backend="reference")
    with pytest.raises(UsageError, match="bias"):
        prepare(cw, bias=np.zeros(3, np.float32), backend="reference")


def test_form_choice_follows_op_counts():
    # per-channel books with 2 centroids for 64 outputs: a big bound -> conv-then-add
    rng = np.random.default_rng(0)
    from kcompile.ir import ClusteredWeight
    O, C = 64, 16
    cw = ClusteredWeight("kernel", (O, C, 3, 3), torch.randn(2 * C, 9),
                         torch.from_numpy(rng.integers(0, 2, (O, C)).astype(np.uint8)),
                         offset=torch.arange(C) * 2)
    form, ops = choose_form(cw, 1)
    assert form == "conv-then-add" and ops["bound"] > 4
    # one distinct kernel per output channel (K = O, no sharing per channel) -> dense
    cw2 = ClusteredWeight("kernel", (O, C, 3, 3), torch.randn(O, 9),
                          torch.arange(O).view(O, 1).expand(O, C).to(torch.uint8).contiguous())
    form2, ops2 = choose_form(cw2, 1)
    assert ops2["form"] == "add-then-conv" and form2 == "add-then-conv"
    cw3 = random_weight("scalar", (8, 8, 3, 3), seed=0)
    assert choose_form(cw3, 1)[0] == "dense"


@pytest.mark.parametrize("kind", ["filter", "scalar"])
def test_linear_reference_matches_torch(kind):
    from kcompile.ir import ClusteredWeight
    rng = np.random.default_rng(1)
    O, I = 6, 10
    if kind == "filter":
        cw = ClusteredWeight("filter", (O, I), torch.randn(3, I), torch.from_numpy(rng.integers(0, 3, O).astype(np.uint8)))
    else:
        cw = ClusteredWeight("scalar", (O, I), torch.randn(5, 1), torch.from_numpy(rng.integers(0, 5, (O, I)).astype(np.uint8)))
    x = rng.standard_normal((4, I)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    ref = F.linear(torch.from_numpy(x), cw.decode(), torch.from_numpy(b)).detach().numpy()
    for backend in ("reference", "numba"):
        assert_close(linear(x, cw, b, backend=backend), ref)
    with pytest.raises(UsageError):
        linear(np.zeros((2, I + 1), np.float32), cw, b, backend="reference")
