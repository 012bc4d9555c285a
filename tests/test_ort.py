"""kcompile.onnxruntime_session: the in-memory rewrite to Python custom ops, kernel caching,
backends, and agreement with stock onnxruntime (the ops' function bodies)."""

from __future__ import annotations

import gc
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import kcompile.ort as kort
from kcompile import onnx_functions as F
from kcompile.cluster import cluster
from kcompile.errors import KcompileError
from kcompile.ir import ClusteredWeight
from kcompile.layers import ClusteredConv2d
from kcompile.onnx_export import build_onnx, export_codebook, export_offset, layer_model
from kcompile.ort import decode_numpy, onnxruntime_session, rewrite_for_pyops
from tiny_models import tiny


@pytest.fixture(scope="module")
def son_model(tmp_path_factory):
    cm = cluster(tiny().eval(), "son", k=8, iters=3, transforms=4, scope="layer").eval()
    path = tmp_path_factory.mktemp("ort") / "son.onnx"
    onnx.save(build_onnx(cm, (1, 3, 8, 8)), path)
    return cm, path


def _x(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


def test_custom_ops_match_stock_and_torch(son_model):
    cm, path = son_model
    x = _x(3)
    with torch.no_grad():
        ref = cm(torch.from_numpy(x)).numpy()
    y_custom = onnxruntime_session(path, threads=2).run(None, {"input": x})[0]
    y_stock = onnxruntime_session(path, threads=2, custom_ops=False).run(None, {"input": x})[0]
    tol = 1e-4 * float(np.ptp(ref))
    assert np.abs(y_custom - ref).max() <= tol and np.abs(y_stock - ref).max() <= tol


def test_rewrite_is_in_memory_and_complete(son_model):
    _, path = son_model
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = onnx.load(path)
    rewritten, keys = rewrite_for_pyops(model, "t")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert any(n.domain == F.DOMAIN for n in model.graph.node)  # the input model is untouched
    assert not any(n.domain == F.DOMAIN for n in rewritten.graph.node) and not rewritten.functions
    ops = [n for n in rewritten.graph.node if n.domain == kort.PYOP_DOMAIN]
    assert len(ops) == len(keys) == sum(n.domain == F.DOMAIN for n in model.graph.node)
    assert all(n.op_type.startswith("KcClusteredConv_") and len(n.input) == len(F.INPUTS) for n in ops)
    casts = [n for n in rewritten.graph.node if n.op_type == "Cast"]
    assert casts  # fp16 scales and 4-bit indices are cast for the Python op


def test_prepared_kernels_cached_per_node(son_model, monkeypatch):
    _, path = son_model
    calls = []
    real = kort.prepare_node

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(kort, "prepare_node", counting)
    sess = onnxruntime_session(path, threads=1)
    for _ in range(3):
        sess.run(None, {"input": _x()})
    backends = sess.kcompile_backends()
    assert len(calls) == len(backends) and all(v for v in backends.values())
    keys = list(backends)
    assert all(k in kort._PREPARED for k in keys)
    del sess
    gc.collect()
    assert not any(k in kort._PREPARED for k in keys)  # dropped with the session


def test_numpy_backend_matches_kernels(son_model):
    _, path = son_model
    x = _x(2, 3)
    a = onnxruntime_session(path, backend="numpy")
    b = onnxruntime_session(path, backend="auto")
    ya, yb = a.run(None, {"input": x})[0], b.run(None, {"input": x})[0]
    assert set(a.kcompile_backends().values()) == {"numpy"}
    np.testing.assert_allclose(ya, yb, rtol=1e-4, atol=1e-5)


def test_dense_model_session_and_bad_inputs(tmp_path):
    m = tiny().eval()
    om = build_onnx(m, (1, 3, 8, 8))
    sess = onnxruntime_session(om)
    assert sess.kcompile_backends() == {}
    assert sess.run(None, {"input": _x()})[0].shape == (2, 10)
    with pytest.raises(KcompileError, match="no such ONNX file"):
        onnxruntime_session(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(KcompileError, match="cannot read ONNX model"):
        onnxruntime_session(bad)
    with pytest.raises(KcompileError, match="unknown backend"):
        onnxruntime_session(om, backend="gpu")


def test_uint16_index_and_uint4_index_paths():
    torch.manual_seed(0)
    x = np.random.default_rng(1).standard_normal((2, 6, 5, 5)).astype(np.float32)
    for K, bits4 in ((300, False), (9, True), (9, False)):
        cw = ClusteredWeight("kernel", (50, 6, 3, 3), torch.randn(K, 9), torch.arange(300).reshape(50, 6) % K)
        om = layer_model(cw, np.ones(50, np.float32), {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 1},
                         ["N", 6, 5, 5], index_bits4=bits4)
        ref = torch.nn.functional.conv2d(torch.from_numpy(x), cw.decode(), torch.ones(50), padding=1).numpy()
        for sess in (onnxruntime_session(om), onnxruntime_session(om, custom_ops=False)):
            np.testing.assert_allclose(sess.run(None, {"input": x})[0], ref, rtol=1e-4, atol=1e-4)


def test_unknown_com_kcompile_op_is_refused():
    node = onnx.helper.make_node("ClusteredPool", ["x"], ["y"], domain=F.DOMAIN, name="p")
    g = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    with pytest.raises(KcompileError, match="unknown op com.kcompile::ClusteredPool"):
        onnxruntime_session(onnx.helper.make_model(g))


@settings(max_examples=15, deadline=None)
@given(unit=st.sampled_from(["filter", "kernel", "row", "scalar"]), scale=st.booleans(), transform=st.booleans(),
       seed=st.integers(0, 10_000))
def test_property_decode_numpy_equals_ir_decode(unit, scale, transform, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (4, 3, 2, 3)
    lead = {"filter": 1, "kernel": 2, "row": 3, "scalar": 4}[unit]
    L = shape[:lead]
    D = int(np.prod(shape[lead:]))
    kw = {}
    if scale:
        kw["scale"] = torch.rand(L, generator=gen).half()
    if transform and D > 1:
        kw["transform_perms"] = torch.stack([torch.randperm(D, generator=gen) for _ in range(3)])
        kw["transform"] = torch.randint(0, 3, L, generator=gen).to(torch.uint8)
    cw = ClusteredWeight(unit, shape, torch.randn(7, D, generator=gen), torch.randint(0, 7, L, generator=gen).to(torch.uint8), **kw)
    w = decode_numpy(export_codebook(cw), cw.index.numpy(), None if cw.scale is None else cw.scale.numpy(),
                     None if cw.transform_perms is None else cw.transform_perms.numpy(),
                     None if cw.transform is None else cw.transform.numpy(), export_offset(cw), None, shape)
    np.testing.assert_allclose(w, cw.decode().numpy(), rtol=1e-6, atol=1e-6)


def test_conv2d_numpy_reference_matches_torch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 7, 6)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 2)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    y = kort.conv2d_numpy(x, w, b, (2, 1), (1, 0, 2, 1), (1, 2), 2)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(torch.from_numpy(x), (0, 1, 1, 2)), torch.from_numpy(w),
                                     torch.from_numpy(b), (2, 1), 0, (1, 2), 2).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_kse_pruned_channels_in_custom_and_stock():
    torch.manual_seed(0)
    O, C = 5, 4
    q = torch.tensor([0, 2, 5, 0])  # pruned, clustered, full, pruned (last channel pruned)
    offset = torch.cumsum(q, 0) - q
    index = torch.stack([torch.zeros(O, dtype=torch.long), torch.randint(0, 2, (O,)), torch.arange(O),
                         torch.zeros(O, dtype=torch.long)], 1).to(torch.uint8)
    cw = ClusteredWeight("kernel", (O, C, 3, 3), torch.randn(int(q.sum()), 9), index, method="kse", offset=offset,
                         pruned=q == 0, full=q == O)
    net = nn.Sequential(ClusteredConv2d(cw, padding=(1, 1)))
    om = build_onnx(net, (1, C, 6, 6))
    x = torch.randn(2, C, 6, 6)
    with torch.no_grad():
        ref = net(x).numpy()
    for sess in (onnxruntime_session(om), onnxruntime_session(om, custom_ops=False)):
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, rtol=1e-4, atol=1e-5)


def test_stock_session_needs_no_kcompile_registration(son_model):
    _, path = son_model
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # plain onnxruntime
    assert sess.run(None, {"input": _x()})[0].shape == (2, 10)
