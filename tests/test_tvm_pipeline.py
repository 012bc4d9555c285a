"""The llvm model pipeline: batch-norm folding (kcompile/bn_fold.py), the schedules of the
legalised operators (kernels/tvm_model_schedule.py), the ReLU / max-pool rewrite
(kcompile/relax_rewrites.py) and their use by compile_model, against PyTorch."""

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("tvm")

import kcompile  # noqa: E402
from kcompile.bn_fold import ChannelAffine, conv_batch_norms  # noqa: E402
from kcompile.compiler import compile_model  # noqa: E402


def _close(y, ref):
    tol = 1e-4 * max(float(np.ptp(ref)), 1e-6)
    assert y.shape == ref.shape
    assert np.abs(y - ref).max() <= tol, (np.abs(y - ref).max(), tol)


def _random_bn(bn: nn.BatchNorm2d, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
        bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
        bn.weight.copy_(torch.rand(n, generator=g) * 2 - 1)
        bn.bias.copy_(torch.rand(n, generator=g) * 2 - 1)


class ResBlockNet(nn.Module):
    """stem conv+BN+ReLU+max-pool, a residual block (conv-BN-ReLU-conv-BN + 1x1 downsample
    conv-BN, add, ReLU), global mean, linear. Input (N, 3, 16, 16)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 5, stride=2, padding=2, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.c1 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.c2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.down = nn.Conv2d(width, 2 * width, 1, bias=False)
        self.bnd = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, 10)
        for i, bn in enumerate((self.bn0, self.bn1, self.bn2, self.bnd)):
            _random_bn(bn, i)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn0(self.stem(x))))
        y = self.bn2(self.c2(torch.relu(self.bn1(self.c1(x)))))
        x = torch.relu(y + self.bnd(self.down(x)))
        return self.fc(x.mean(dim=(2, 3)))


X = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)


def _torch(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_channel_affine_matches_batch_norm():
    bn = nn.BatchNorm2d(6).eval()
    _random_bn(bn, 3)
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    aff = ChannelAffine(s.astype(np.float32), (bn.bias.detach().numpy() - bn.running_mean.numpy() * s).astype(np.float32))
    x = torch.randn(2, 6, 3, 3)
    with torch.no_grad():
        ref = bn(x).numpy()
    got = x.numpy() * aff.scale[None, :, None, None] + aff.shift[None, :, None, None]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    w = np.ones((6, 2, 1, 1), np.float32)
    np.testing.assert_allclose(aff.fold_weight(w)[:, 0, 0, 0], aff.scale, rtol=1e-6)
    np.testing.assert_allclose(aff.fold_bias(None), aff.shift, rtol=1e-6)


def test_conv_batch_norms_finds_single_user_pairs():
    from kcompile.compiler import _REGISTRY, _out_channels, _stub_model

    model = ResBlockNet().eval()
    stub, keys = _stub_model(model)
    try:
        ep = torch.export.export(stub, (torch.from_numpy(X),)).run_decompositions()
        folds = conv_batch_norms(ep, "conv.default", lambda n: _out_channels(_REGISTRY[int(n.args[1])]))
    finally:
        for k in keys:
            _REGISTRY.pop(k, None)
    assert len(folds) == 4  # stem, c1, c2, down: all followed by their batch-norm
    bn = model.bn1
    want = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    assert any(a.scale.shape == want.shape and np.allclose(a.scale, want, rtol=1e-6) for a in folds.values())


def test_dense_model_folds_batch_norm_into_weights():
    model = ResBlockNet().eval()
    run = compile_model(model, "llvm", X.shape)
    _close(run(X), _torch(model, X))
    assert {r["layer"]: r.get("batch_norm") for r in run.layers} == {
        "stem": "folded", "c1": "folded", "c2": "folded", "down": "folded"}
    names = [gv.name_hint for gv in run.mod.get_global_vars()]
    assert not any("batch_norm" in n for n in names)


def test_clustered_model_gets_batch_norm_epilogue():
    torch.manual_seed(0)
    model = ResBlockNet().eval()
    cm = kcompile.cluster(model, "kse", q=4, iters=3, skip=["stem", "down"]).eval()
    forms = {"c1": "shared", "c2": "shared"}
    run = compile_model(cm, "llvm", X.shape, forms=forms)
    _close(run(X), _torch(cm, X))
    bn = {r["layer"]: r.get("batch_norm") for r in run.layers}
    assert bn == {"stem": "folded", "c1": "epilogue", "c2": "epilogue", "down": "folded"}
    assert {r["layer"]: r["form"] for r in run.layers if r["clustered"]} == forms


def test_schedules_keep_results_of_legalised_ops():
    import tvm
    from tvm import relax

    from kcompile.kernels.tvm_model_schedule import schedule_func
    from kcompile.kernels.tvm_schedule import make_target

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 10, 10), "float32"))
    r = relax.Var("r", relax.TensorType((1, 8, 5, 5), "float32"))
    w = relax.Var("w", relax.TensorType((8, 12), "float32"))
    with bb.function("main", [x, r, w]):
        with bb.dataflow():
            p = bb.emit(relax.op.nn.max_pool2d(x, (3, 3), (2, 2), (1, 1, 1, 1)))
            e = bb.emit(relax.op.nn.relu(relax.op.add(relax.op.multiply(p, relax.const(np.full((1, 8, 1, 1), 0.5, np.float32))), r)))
            m = bb.emit(relax.op.mean(e, axis=[2, 3]))
            o = bb.emit_output(relax.op.matmul(m, w))
        bb.emit_func_output(o)
    mod = relax.transform.LegalizeOps()(bb.get())
    mod = relax.transform.AnnotateTIROpPattern()(mod)
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(mod))
    funcs = dict(mod.functions_items())
    prims = [gv for gv, f in funcs.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(prims) >= 3
    for gv in prims:
        funcs[gv] = schedule_func(funcs[gv])
        assert funcs[gv] is not None, gv.name_hint
    scheduled = tvm.IRModule(funcs)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype(np.float32) for s in ((1, 8, 10, 10), (1, 8, 5, 5), (8, 12))]
    dev = tvm.cpu()
    outs = []
    for m in (mod, scheduled):
        ex = tvm.compile(m, target=make_target("llvm", 2))
        vm = relax.VirtualMachine(ex, dev)
        outs.append(vm["main"](*[tvm.runtime.tensor(a, dev) for a in args]).numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_relu_moves_after_max_pool():
    from tvm import relax

    from kcompile.relax_rewrites import relu_after_max_pool

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(x))
            o = bb.emit_output(relax.op.nn.max_pool2d(y, (3, 3), (2, 2), (1, 1, 1, 1)))
        bb.emit_func_output(o)
    text = relu_after_max_pool(bb.get()["main"]).script()
    assert text.index("max_pool2d") < text.index("relu")
