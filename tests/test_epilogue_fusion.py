"""Epilogues in the conv kernels' out stage (kernels/tvm_compute.py ``Epilogue``,
``with_epilogue``) and their fusion into compiled models (kcompile/epilogue_fusion.py)."""

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("tvm")

import kcompile  # noqa: E402
from kcompile.compiler import compile_model  # noqa: E402
from kcompile.kernels.plan import Geometry  # noqa: E402
from kcompile.kernels.tvm_compute import ConvSpec, Epilogue, dense_arrays, epilogue_out_shape, with_epilogue  # noqa: E402
from test_tvm_pipeline import ResBlockNet, X, _close, _torch  # noqa: E402


def _run_layer(spec, arrays, x, *extra):
    import tvm

    from kcompile.kernels.tvm_schedule import layer_module, make_target

    lm = layer_module(spec, arrays, "llvm", 2)
    lib = tvm.compile(lm.mod, target=make_target("llvm", 2))
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(epilogue_out_shape(spec, arrays.meta.get("epilogue")), np.float32), dev)
    args = [x, *extra, *arrays.arrays.values()]
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in args], out)
    return out.numpy()


def test_with_epilogue_composes_and_keeps_the_tables():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    base = dense_arrays(w, 1, rng.standard_normal(4))
    s1, t1, s2, t2 = (rng.standard_normal(4) for _ in range(4))
    a = with_epilogue(with_epilogue(base, s1, t1), s2, t2)
    np.testing.assert_allclose(a.arrays["oscale"], s1 * s2, rtol=1e-6)
    np.testing.assert_allclose(a.arrays["bias"], (base.arrays["bias"] * s1 + t1) * s2 + t2, rtol=1e-5, atol=1e-6)
    assert list(a.arrays) == ["weight", "bias", "oscale"]
    assert np.array_equal(a.arrays["weight"], base.arrays["weight"])
    b = with_epilogue(a, residual=True, relu=True)
    assert b.meta["epilogue"] == Epilogue(scale=True, residual=True, relu=True)
    assert b.meta["epilogue"].tag == "bn_res_relu"
    assert with_epilogue(b, relu=False).meta["epilogue"].tag == "bn_res"
    assert "epilogue" not in base.meta  # the input is not modified


@pytest.mark.parametrize("residual,relu", [(False, True), (True, False), (True, True)])
def test_out_stage_applies_scale_residual_and_relu(residual, relu):
    rng = np.random.default_rng(1)
    # padding (top, left, bottom, right)
    spec = ConvSpec(1, 3, 9, 7, 5, 3, 3, Geometry.make((2, 1), (1, 1, 0, 2), (1, 1), 1))
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    scale, shift = rng.standard_normal(5), rng.standard_normal(5)
    arrays = with_epilogue(dense_arrays(w, 1, bias), scale, shift, residual=residual, relu=relu)
    x = rng.standard_normal((1, 3, 9, 7)).astype(np.float32)
    res = rng.standard_normal(spec.out_shape).astype(np.float32)
    got = _run_layer(spec, arrays, x, *([res] if residual else []))
    conv = torch.nn.functional.conv2d(torch.nn.functional.pad(torch.from_numpy(x), (1, 2, 1, 0)),
                                      torch.from_numpy(w), torch.from_numpy(bias), stride=(2, 1)).numpy()
    ref = conv * scale[None, :, None, None] + shift[None, :, None, None] + (res if residual else 0)
    if relu:
        ref = np.maximum(ref, 0)
    _close(got, ref.astype(np.float32))


def test_resnet_block_chains_fused_and_exact():
    torch.manual_seed(0)
    cm = kcompile.cluster(ResBlockNet().eval(), "kse", q=4, iters=3, skip=["stem", "down"]).eval()
    run = compile_model(cm, "llvm", X.shape, forms={"c1": "shared", "c2": "shared"})
    _close(run(X), _torch(cm, X))
    tags = {r["layer"]: r.get("epilogue") for r in run.layers}
    # stem: conv-BN-ReLU; c1: BN-ReLU; the add + ReLU after c2 and down goes to the conv
    # called later (down), c2's output being its residual
    # (the stem's max-pool too: its full-size output is never written)
    assert tags == {"stem": "relu_maxpool", "c1": "bn_relu", "c2": None, "down": "res_relu"}
    stem = next(r for r in run.layers if r["layer"] == "stem")
    assert tuple(stem["output_shape"]) == (1, 8, 4, 4)  # 16x16 -> stem /2 -> max-pool /2
    names = {gv.name_hint for gv in run.mod.get_global_vars()}
    assert {r["function"] for r in run.layers} <= names
    assert not any(n in names for n in ("kc_stem_dense", "kc_c1_shared", "kc_down_dense"))  # unfused copies dropped


@pytest.mark.parametrize("pool,relu,hw", [
    ((3, 2, 1), True, (9, 7)),    # resnet's stem pool, odd sizes
    ((3, 2, 1), False, (8, 8)),   # negative values: clamped reads must not invent a 0
    ((2, 2, 0), True, (9, 9)),    # the last row / column dropped by floor mode
    ((3, 1, 1), False, (5, 6)),
    ((5, 3, 2), False, (10, 7)),  # padding 2: windows hanging two rows over the edge
])
def test_out_stage_max_pool_matches_torch(pool, relu, hw):
    """The pooled out stage = torch's max_pool2d of the epilogue's output, for windows that
    hang over every edge."""
    rng = np.random.default_rng(2)
    H, W = hw
    spec = ConvSpec(1, 3, H, W, 4, 3, 3, Geometry.make(1, 1, 1, 1))
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    arrays = with_epilogue(dense_arrays(w, 1, bias), relu=relu, pool=pool)
    assert arrays.meta["epilogue"].tag == ("relu_maxpool" if relu else "maxpool")
    x = rng.standard_normal((1, 3, H, W)).astype(np.float32)
    got = _run_layer(spec, arrays, x)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias), padding=1)
    if relu:
        ref = torch.relu(ref)
    k, s, p = pool
    ref = torch.nn.functional.max_pool2d(ref, k, s, p).numpy()
    assert got.shape == ref.shape == epilogue_out_shape(spec, arrays.meta["epilogue"])
    _close(got, ref)


def test_only_plain_max_pools_are_fused():
    from tvm import relax

    from kcompile.epilogue_fusion import _fusable_pool

    x = relax.Var("x", relax.TensorType((1, 4, 8, 8), "float32"))
    pool = relax.op.nn.max_pool2d
    assert _fusable_pool(pool(x, 3, 2, 1).attrs) == (3, 2, 1)
    assert _fusable_pool(pool(x, 2, 2, 0).attrs) == (2, 2, 0)
    assert _fusable_pool(pool(x, 3, 2, 1, ceil_mode=True).attrs) is None
    assert _fusable_pool(pool(x, (3, 2), 2, 1).attrs) is None
    assert _fusable_pool(pool(x, 3, (2, 1), 1).attrs) is None
    assert _fusable_pool(pool(x, 3, 2, (1, 0, 1, 0)).attrs) is None
    assert _fusable_pool(pool(x, 3, 2, 1, dilation=2).attrs) is None
    assert _fusable_pool(pool(x, 3, 2, 1, layout="NHWC").attrs) is None
    with pytest.raises(ValueError, match="padding < kernel"):
        Epilogue(pool=(2, 2, 2))


class SharedOutputNet(nn.Module):
    """A conv whose output feeds both a ReLU and an add: nothing can be fused into it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return torch.relu(self.b(torch.relu(y))) + y


def test_values_used_twice_are_not_fused():
    torch.manual_seed(0)
    model = SharedOutputNet().eval()
    run = compile_model(model, "llvm", X.shape)
    _close(run(X), _torch(model, X))
    tags = {r["layer"]: r.get("epilogue") for r in run.layers}
    assert tags == {"a": None, "b": "relu"}


def test_tuned_compile_measures_tiles_and_fused_kernels_keep_them(monkeypatch):
    from kcompile.kernels import tvm_tune

    calls = []
    real = tvm_tune.search_tiles

    def spy(spec, arrays, threads=2, **kw):
        calls.append(spec)
        return real(spec, arrays, threads, runs=2, rounds=2)

    monkeypatch.setattr(tvm_tune, "search_tiles", spy)
    torch.manual_seed(0)
    cm = kcompile.cluster(ResBlockNet().eval(), "kse", q=4, iters=3, skip=["stem", "down"]).eval()
    forms = {"c1": "shared", "c2": "shared"}
    run = compile_model(cm, "llvm", X.shape, forms=forms, tune=True)
    _close(run(X), _torch(cm, X))
    measured = {r["layer"] for r in run.layers if r.get("tiles_measured")}
    assert measured == {"c1", "c2"} and len(calls) == 2  # dense-form convs keep the heuristic
    plain = compile_model(cm, "llvm", X.shape, forms=forms)
    assert not any(r.get("tiles_measured") for r in plain.layers)
