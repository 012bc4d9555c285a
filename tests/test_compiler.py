"""kcompile.compile / export_library (kcompile/compiler.py): whole models through TVM (llvm,
cuda build) and the Numba kernels, against PyTorch."""

import copy
import json

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import kcompile  # noqa: E402
from kcompile.compiler import compile_model, export_library  # noqa: E402
from kcompile.errors import KcompileError, UsageError  # noqa: E402
from kcompile.layers import clustered_layers  # noqa: E402
from tiny_models import tiny  # noqa: E402

METHODS = {
    "son": {"k": 16, "transforms": 4, "iters": 3},
    "kse": {"iters": 3},
    "dkm": {"iters": 3},
    "filter": {"select": "fixed", "ratio": 0.5, "iters": 3},
}


def _cluster(method):
    torch.manual_seed(0)
    m = tiny().eval()
    try:
        return kcompile.cluster(m, method, **METHODS[method]).eval()
    except UsageError:  # methods without an iters option
        opts = {k: v for k, v in METHODS[method].items() if k != "iters"}
        return kcompile.cluster(m, method, **opts).eval()


def _close(y, ref):
    tol = 1e-4 * max(float(np.ptp(ref)), 1e-6)
    assert y.shape == ref.shape
    assert np.abs(y - ref).max() <= tol, (np.abs(y - ref).max(), tol)


def _torch(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


X = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("method", list(METHODS))
def test_llvm_tiny_matches_torch(method):
    cm = _cluster(method)
    before = copy.deepcopy(cm.state_dict())
    run = compile_model(cm, "llvm", X.shape)
    _close(run(X), _torch(cm, X))
    assert run.output_shape == (2, 10)
    names = {r["layer"] for r in run.layers if r["clustered"]}
    assert names == {n for n, m in clustered_layers(cm) if hasattr(m, "conv_params")}
    for k, v in cm.state_dict().items():  # model untouched
        assert torch.equal(v, before[k])


def test_llvm_forced_shared_forms():
    """Son's layers (scales + TIC) through the shared-centroid kernel in a whole model."""
    cm = _cluster("son")
    forms = {n: "shared" for n, _ in clustered_layers(cm)}
    run = compile_model(cm, "llvm", X.shape, forms=forms)
    assert {r["form"] for r in run.layers if r["clustered"]} == {"shared"}
    _close(run(X), _torch(cm, X))


@pytest.mark.parametrize("method", ["kse", "son"])
def test_numba_tiny_matches_torch(method):
    cm = _cluster(method)
    run = compile_model(cm, "numba", X.shape)
    _close(run(X), _torch(cm, X))


def test_digits_resnet_llvm():
    from kcompile import zoo

    m = zoo.build("digits-resnet").eval()
    shape = zoo.input_shape("digits-resnet")
    cm = kcompile.cluster(m, "kse", q=4).eval()
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    run = compile_model(cm, "llvm", shape)
    assert any(r["form"] == "shared" for r in run.layers)
    _close(run(x), _torch(cm, x))


def test_cuda_builds_with_shared_centroid_kernels():
    from kcompile.kernels.tvm_schedule import make_target

    try:
        make_target("cuda")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"cuda target cannot be constructed here: {e}")
    cm = kcompile.cluster(tiny().eval(), "kse", q=4).eval()
    run = compile_model(cm, "cuda", (1, 3, 8, 8))
    src = run.cuda_source()
    shared = [r["function"] for r in run.layers if r["form"] == "shared"]
    assert shared and all(f in src for f in shared)
    assert "__shared__" in src
    with pytest.raises(KcompileError):
        run(np.zeros((1, 3, 8, 8), np.float32))


def test_export_library_llvm(tmp_path):
    import tvm

    cm = kcompile.cluster(tiny().eval(), "kse", q=4).eval()
    out = tmp_path / "model.so"
    meta = export_library(cm, out, "llvm", (1, 3, 8, 8))
    side = json.loads((tmp_path / "model.json").read_text())
    assert side == json.loads(json.dumps(meta))
    assert side["input_shape"] == [1, 3, 8, 8] and side["output_shape"] == [1, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.so"]
    lib = tvm.runtime.load_module(str(out))
    vm = tvm.relax.VirtualMachine(lib, tvm.cpu())
    x = X[:1].copy()
    _close(vm["main"](tvm.runtime.tensor(x)).numpy(), _torch(cm, x))


def test_export_library_errors(tmp_path):
    cm = tiny().eval()
    with pytest.raises(KcompileError):
        export_library(cm, tmp_path / "missing" / "m.so", "llvm", (1, 3, 8, 8))
    with pytest.raises(UsageError):
        export_library(cm, tmp_path / "m.so", "onnx", (1, 3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_bad_requests():
    m = tiny().eval()
    with pytest.raises(UsageError):
        compile_model(m, "tpu", (1, 3, 8, 8))
    with pytest.raises(UsageError):
        compile_model(m, "llvm", None)
    with pytest.raises(UsageError):
        compile_model(m, "llvm", (1, 3, 8))
    run = compile_model(m, "numba", (1, 3, 8, 8))
    with pytest.raises(UsageError):
        run(np.zeros((2, 3, 8, 8), np.float32))


@pytest.mark.slow
def test_export_library_cuda(tmp_path):
    from kcompile.kernels.tvm_schedule import make_target

    try:
        make_target("cuda")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"cuda target cannot be constructed here: {e}")
    cm = kcompile.cluster(tiny().eval(), "kse", q=4).eval()
    meta = export_library(cm, tmp_path / "m.so", "cuda", (1, 3, 8, 8))
    assert meta["target"] == "cuda" and (tmp_path / "m.so").stat().st_size > 0
    assert json.loads((tmp_path / "m.json").read_text())["output_shape"] == [1, 10]
