"""ONNX export: graph contract, fidelity in onnxruntime (stock function bodies, kcompile's custom
ops, portable inlined) vs the PyTorch clustered model, ONNX's Conv conformance vectors through
ClusteredConv, property tests over conv geometry and units, dense fallbacks."""

from __future__ import annotations

import glob
import math
import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

from kcompile import onnx_functions as F
from kcompile.cluster import cluster
from kcompile.export import export
from kcompile.ir import ClusteredWeight
from kcompile.layers import ClusteredConv2d, ClusteredLinear, clustered_layers
from kcompile.onnx_export import ExportWarning, build_onnx, layer_model
from kcompile.ort import onnxruntime_session
from tiny_models import tiny

METHODS = {
    "son": dict(k=8, iters=3),
    "son-tic": dict(k=8, iters=3, transforms=8, scope="layer"),
    "kse": dict(iters=3),
    "kse-q": dict(iters=3, q=3),
    "dkm": dict(k=4, iters=3, sparsity=0.2),
    "filter": dict(iters=3, ratio=0.5),
}


def _method(name):
    return name.split("-")[0]


def stock(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def close(a, b, ref):
    rng = float(ref.max() - ref.min()) or 1.0
    err = float(np.abs(a - b).max())
    assert err <= 1e-4 * rng + 1e-7, f"max error {err} > 1e-4 of output range {rng}"


def check_three_ways(cm: nn.Module, om: onnx.ModelProto, shape, batches=(1, 4), portable=None):
    """PyTorch, stock onnxruntime (function bodies), kcompile custom ops (and portable) agree."""
    cm.eval()
    s_stock, s_custom = stock(om), onnxruntime_session(om, threads=1)
    s_port = stock(portable) if portable is not None else None
    gen = torch.Generator().manual_seed(1)
    for n in batches:
        x = torch.randn((n, *shape[1:]), generator=gen)
        with torch.no_grad():
            ref = cm(x).numpy()
        feed = {"input": x.numpy()}
        close(s_stock.run(None, feed)[0], ref, ref)
        close(s_custom.run(None, feed)[0], ref, ref)
        if s_port is not None:
            close(s_port.run(None, feed)[0], ref, ref)
    return s_custom


def check_graph(om: onnx.ModelProto):
    """The file contract: checker, IR/opsets, every output shaped, names, functions present."""
    onnx.checker.check_model(om, full_check=True)
    assert om.ir_version <= 11
    imports = {o.domain: o.version for o in om.opset_import}
    assert imports[""] == F.OPSET
    custom = [n for n in om.graph.node if n.domain == F.DOMAIN]
    if custom:
        assert imports[F.DOMAIN] == F.DOMAIN_VERSION
        assert {f.name for f in om.functions} == {n.op_type for n in custom}
        for f in om.functions:
            assert f.domain == F.DOMAIN and all(n.domain in ("", "ai.onnx") for n in f.node)
    inferred = onnx.shape_inference.infer_shapes(om, strict_mode=True)
    shaped = {vi.name for vi in [*inferred.graph.value_info, *inferred.graph.output] if vi.type.tensor_type.HasField("shape")}
    for n in om.graph.node:
        for o in n.output:
            assert o in shaped, f"output {o} of {n.name} has no inferred shape"
    return custom


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_clustered():
    m = tiny().eval()
    return m, {name: cluster(m, _method(name), **opts).eval() for name, opts in METHODS.items()}


# ------------------------------------------------------------------------------- graph
@pytest.mark.parametrize("method", list(METHODS))
def test_tiny_every_method_three_ways(tiny_clustered, method):
    _, cms = tiny_clustered
    cm = cms[method]
    om = build_onnx(cm, (1, 3, 8, 8))
    custom = check_graph(om)
    assert {n.name for n in custom} == {name for name, _ in clustered_layers(cm)}
    port = build_onnx(cm, (1, 3, 8, 8), onnx_ops="portable")
    onnx.checker.check_model(port, full_check=True)
    assert not port.functions and all(n.domain in ("", "ai.onnx") for n in port.graph.node)
    sess = check_three_ways(cm, om, (1, 3, 8, 8), portable=port)
    used = set(sess.kcompile_backends().values())
    assert used and None not in used


def test_node_inputs_names_and_types(tiny_clustered):
    _, cms = tiny_clustered
    om = build_onnx(cms["son-tic"], (1, 3, 8, 8))
    inits = {t.name: t for t in om.graph.initializer}
    node = next(n for n in om.graph.node if n.name == "conv")
    assert node.op_type == F.CONV and list(node.input[1:8]) == [
        "conv.codebook", "conv.index", "conv.scale", "conv.transform_perms", "conv.transform",
        "kc.zero_i64", "kc.one_f32"]
    assert node.input[8] == "conv.bias"
    assert inits["conv.codebook"].data_type == TensorProto.FLOAT
    assert inits["conv.index"].data_type == TensorProto.UINT4  # K=8 fits 4 bits
    assert inits["conv.scale"].data_type == TensorProto.FLOAT16
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["strides"] == [1, 1] and attrs["pads"] == [1, 1, 1, 1] and attrs["group"] == 1
    assert attrs["weight_shape"] == [8, 8, 3, 3] and attrs["unit"] == b"kernel"
    stem = next(n for n in om.graph.node if n.name == "stem")
    assert len(stem.input) == 8  # no bias: the optional input is omitted
    # batch-norm is not folded into a clustered conv: it stays a node after 'stem'
    bn = [n for n in om.graph.node if n.op_type == "BatchNormalization"]
    assert len(bn) == 1 and bn[0].input[0] == stem.output[0]


def test_index_narrowest_type_8_and_16_bits():
    torch.manual_seed(0)
    for K, t in ((200, TensorProto.UINT8), (300, TensorProto.UINT16)):
        cw = ClusteredWeight("kernel", (30, 20, 3, 3), torch.randn(K, 9), torch.randint(0, K, (30, 20)).to(torch.int64).clamp(max=K - 1))
        cw = ClusteredWeight("kernel", cw.shape, cw.codebook, torch.arange(600).reshape(30, 20) % K)
        net = nn.Sequential(ClusteredConv2d(cw, padding=(1, 1)))
        om = build_onnx(net, (1, 20, 5, 5))
        assert next(t2 for t2 in om.graph.initializer if t2.name == "0.index").data_type == t
        check_three_ways(net, om, (1, 20, 5, 5), batches=(2,))
    om4 = build_onnx(net, (1, 20, 5, 5), index_bits4=False)
    assert next(t2 for t2 in om4.graph.initializer if t2.name == "0.index").data_type == TensorProto.UINT16


def test_son_network_codebook_is_shared():
    m = tiny().eval()
    cm = cluster(m, "son", k=8, iters=3, scope="network")
    om = build_onnx(cm, (1, 3, 8, 8))
    books = [n.input[1] for n in om.graph.node if n.domain == F.DOMAIN and n.attribute]
    shared = [b for b in set(books) if books.count(b) > 1]
    assert shared and all(b.startswith("codebooks.") for b in shared)
    assert sum(1 for t in om.graph.initializer if t.name in shared) == len(shared)


def test_dynamic_and_fixed_batch(tiny_clustered, tmp_path):
    _, cms = tiny_clustered
    cm = cms["son"]
    cm.kcompile_arch = {"spec": "zoo:fake"}  # no default shape -> needs input_shape
    om = build_onnx(cm, (1, 3, 8, 8))
    assert om.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert om.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    p = tmp_path / "fixed.onnx"
    export(cm, p, input_shape=(3, 3, 8, 8))
    fixed = onnx.load(p)
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        close(stock(fixed).run(None, {"input": x})[0], cm(torch.from_numpy(x)).numpy(), cm(torch.from_numpy(x)).numpy())


def test_dense_model_stays_standard_onnx():
    m = tiny().eval()
    om = build_onnx(m, (1, 3, 8, 8))
    onnx.checker.check_model(om, full_check=True)
    assert not om.functions and all(n.domain in ("", "ai.onnx") for n in om.graph.node)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = m(x).numpy()
    close(stock(om).run(None, {"input": x.numpy()})[0], ref, ref)


def test_model_not_modified_by_export(tiny_clustered):
    _, cms = tiny_clustered
    cm = cms["kse"].train()
    before = {k: v.clone() for k, v in cm.state_dict().items()}
    types = [type(m) for m in cm.modules()]
    build_onnx(cm, (1, 3, 8, 8))
    assert cm.training and all(m.training for m in cm.modules())
    assert [type(m) for m in cm.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in cm.state_dict().items())
    cm.eval()


def test_public_api_is_callable_after_submodule_import(tiny_clustered, tmp_path):
    import kcompile
    import kcompile.export  # noqa: F401  rebinds kcompile.export to the module

    _, cms = tiny_clustered
    p = kcompile.export(cms["dkm"], tmp_path / "m.onnx", target="onnx", input_shape=(1, 3, 8, 8))
    assert os.path.exists(p)


# ------------------------------------------------------------------------------- gemm
def _linear_net(unit, bias=True, seed=0):
    """A ClusteredLinear 10 -> 6 with fp16 scales; filter units are rows of W, the others scalars."""
    g = torch.Generator().manual_seed(seed)
    O, I = 6, 10
    lead, D = ((O,), I) if unit == "filter" else ((O, I), 1)
    cw = ClusteredWeight(unit, (O, I), torch.randn(5, D, generator=g), torch.randint(0, 5, lead, generator=g).to(torch.uint8),
                         scale=torch.rand(lead, generator=g).half() + 0.5)
    return ClusteredLinear(cw, bias=torch.randn(O, generator=g) if bias else None)


@pytest.mark.parametrize("unit,bias", [("filter", True), ("scalar", False), ("kernel", True)])
def test_clustered_gemm(unit, bias):
    net = nn.Sequential(nn.Flatten(), _linear_net(unit, bias))
    om = build_onnx(net, (1, 10, 1, 1))
    custom = check_graph(om)
    assert [n.op_type for n in custom] == [F.GEMM]
    check_three_ways(net, om, (1, 10, 1, 1))


def test_clustered_gemm_nd_input():
    lin = _linear_net("filter")
    cw = lin.clustered_weight().detached()
    om = layer_model(cw, lin.bias.detach().numpy(), None, ["N", 3, 10])
    x = np.random.default_rng(0).standard_normal((2, 3, 10)).astype(np.float32)
    with torch.no_grad():
        ref = lin(torch.from_numpy(x)).numpy()
    close(stock(om).run(None, {"input": x})[0], ref, ref)
    close(onnxruntime_session(om).run(None, {"input": x})[0], ref, ref)


# ------------------------------------------------------------------------------- fallbacks
class FlippedConv(ClusteredConv2d):
    """A clustered layer whose forward is not a plain conv of its decoded weight."""

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight.flip(-1), self.bias, self.stride, self.padding)


def test_unexpressible_layer_warns_and_falls_back_dense():
    m = tiny().eval()
    cm = cluster(m, "son", k=8, iters=3)
    conv = cm.conv
    cm.conv = FlippedConv(conv.clustered_weight().detached(), stride=conv.stride, padding=conv.padding, bias=conv.bias)
    cm.eval()
    with pytest.warns(ExportWarning, match=r"layer conv: FlippedConv overrides forward"):
        om = build_onnx(cm, (1, 3, 8, 8))
    custom = check_graph(om)
    assert "conv" not in {n.name for n in custom} and {"stem", "dw"} <= {n.name for n in custom}
    check_three_ways(cm, om, (1, 3, 8, 8), batches=(2,))


def test_broken_index_falls_back_to_a_dense_node():
    # index 7 into a 5-row codebook: PyTorch's decode clamps it, ONNX Gather would fail
    cw = ClusteredWeight("kernel", (4, 3, 3, 3), torch.randn(5, 9), torch.full((4, 3), 7, dtype=torch.uint8))
    net = nn.Sequential(ClusteredConv2d(cw, padding=(1, 1), bias=torch.randn(4))).eval()
    with pytest.warns(ExportWarning, match=r"layer 0: index 7 out of range for 5 centroids"):
        om = build_onnx(net, (1, 3, 6, 6))
    nodes = [n for n in om.graph.node if n.name == "0"]
    assert [n.op_type for n in nodes] == ["Conv"] and not om.functions
    onnx.checker.check_model(om, full_check=True)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = net(x).numpy()
    close(stock(om).run(None, {"input": x.numpy()})[0], ref, ref)


# ------------------------------------------------------------------------------- conformance
def lossless_kernel_codebook(W: np.ndarray) -> ClusteredWeight:
    """Every kernel its own centroid: codebook = the O*C kernels, index = arange."""
    O, C, kh, kw = W.shape
    return ClusteredWeight("kernel", W.shape, torch.from_numpy(W.reshape(O * C, kh * kw).copy()),
                           torch.arange(O * C).reshape(O, C))


def conv_attributes(node: onnx.NodeProto, x_shape, w_shape) -> dict:
    a = {at.name: onnx.helper.get_attribute_value(at) for at in node.attribute}
    kh, kw = w_shape[2:]
    strides, dil = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
    pads = list(a.get("pads", [0, 0, 0, 0]))
    auto = a.get("auto_pad", b"NOTSET").decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for i, (n, k) in enumerate(zip(x_shape[2:], (kh, kw))):
            out = -(-n // strides[i])
            total = max(0, (out - 1) * strides[i] + dil[i] * (k - 1) + 1 - n)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + 2] = (big, small) if auto == "SAME_LOWER" else (small, big)
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    return {"strides": strides, "pads": pads, "dilations": dil, "group": int(a.get("group", 1))}


def _onnx_node_conv_cases():
    import onnx.backend.test.case.node as node_cases

    node_cases._TargetOpType = "Conv"
    import onnx.backend.test.case.node.conv  # noqa: F401  (class creation runs the exports)

    out = []
    for case in node_cases._NodeTestCases:
        if case.model.graph.node[0].op_type == "Conv":
            (inputs, outputs), = case.data_sets
            out.append((case.name, case.model.graph.node[0], list(inputs), outputs[0]))
    return out


def _pytorch_converted_conv2d_cases():
    base = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "pytorch-converted")
    out = []
    for d in sorted(glob.glob(os.path.join(base, "test_Conv2d*"))):
        m = onnx.load(os.path.join(d, "model.onnx"))
        inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        node = m.graph.node[0]
        x = numpy_helper.to_array(onnx.load_tensor(os.path.join(d, "test_data_set_0", "input_0.pb")))
        y = numpy_helper.to_array(onnx.load_tensor(os.path.join(d, "test_data_set_0", "output_0.pb")))
        inputs = [x, inits[node.input[1]]] + ([inits[node.input[2]]] if len(node.input) > 2 else [])
        out.append((os.path.basename(d), node, inputs, y))
    return out


CONFORMANCE = _onnx_node_conv_cases() + _pytorch_converted_conv2d_cases()


def test_conformance_vectors_found():
    names = {c[0] for c in CONFORMANCE}
    assert {"test_basic_conv_with_padding", "test_conv_with_strides_and_asymmetric_padding",
            "test_conv_with_autopad_same", "test_Conv2d_depthwise", "test_Conv2d_dilated"} <= names
    assert len(CONFORMANCE) >= 15


@pytest.mark.parametrize("case", CONFORMANCE, ids=[c[0] for c in CONFORMANCE])
def test_onnx_conv_conformance_through_clustered_conv(case):
    name, node, inputs, expected = case
    x, W = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    cw = lossless_kernel_codebook(W)
    om = layer_model(cw, bias, conv_attributes(node, x.shape, W.shape), ["N", *x.shape[1:]])
    onnx.checker.check_model(om, full_check=True)
    for sess in (stock(om), onnxruntime_session(om)):
        y = sess.run(None, {"input": x})[0]
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- properties
def random_clustered_conv(data, O, Cg, kh, kw, groups, unit, feature, gen):
    shape = (O, Cg, kh, kw)
    lead = {"filter": 1, "kernel": 2, "row": 3, "scalar": 4}[unit]
    L, D = shape[:lead], math.prod(shape[lead:])
    K = data.draw(st.integers(1, 12), label="K")
    kw_ir = {}
    index = torch.randint(0, K, L, generator=gen).to(torch.uint8)
    book = torch.randn(K, D, generator=gen)
    if feature == "scale":
        kw_ir["scale"] = (torch.rand(L, generator=gen) * 2 - 1).half()
    if feature == "transform" and D > 1:
        T = data.draw(st.integers(2, 4), label="T")
        kw_ir["transform_perms"] = torch.stack([torch.randperm(D, generator=gen) for _ in range(T)])
        kw_ir["transform"] = torch.randint(0, T, L, generator=gen).to(torch.uint8)
        kw_ir["scale"] = torch.rand(L, generator=gen).half()
    if feature == "kse" and unit == "kernel":
        q = torch.randint(0, O + 1, (Cg,), generator=gen)
        offset = torch.cumsum(q, 0) - q
        book = torch.randn(max(int(q.sum()), 1), D, generator=gen)
        index = torch.stack([torch.randint(0, max(int(qc), 1), (O,), generator=gen) for qc in q], 1).to(torch.uint8)
        index[:, q == 0] = 0
        kw_ir.update(offset=offset, pruned=q == 0, full=q == O)
    if feature == "zero":
        kw_ir["zero_centroid"] = True
    return ClusteredWeight(unit, shape, book, index, **kw_ir)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_exported_conv_matches_pytorch(data):
    groups = data.draw(st.sampled_from([1, 2, 3]), label="groups")
    depthwise = data.draw(st.booleans(), label="depthwise")
    Cg = 1 if depthwise else data.draw(st.integers(1, 3), label="Cg")
    O = groups * data.draw(st.integers(1, 3), label="O/groups")
    kh, kw = data.draw(st.integers(1, 4), label="kh"), data.draw(st.integers(1, 4), label="kw")
    stride = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    dilation = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)))
    padding = (data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2)))
    unit = data.draw(st.sampled_from(["filter", "kernel", "row", "scalar"]), label="unit")
    feature = data.draw(st.sampled_from(["plain", "scale", "transform", "kse", "zero"]), label="feature")
    H = data.draw(st.integers(dilation[0] * (kh - 1) + 1, 9), label="H")
    W = data.draw(st.integers(dilation[1] * (kw - 1) + 1, 9), label="W")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    cw = random_clustered_conv(data, O, Cg, kh, kw, groups, unit, feature, gen)
    bias = torch.randn(O, generator=gen) if data.draw(st.booleans(), label="bias") else None
    net = nn.Sequential(ClusteredConv2d(cw, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias))
    shape = (1, Cg * groups, H, W)
    om = build_onnx(net, shape)
    onnx.checker.check_model(om, full_check=True)
    assert [n.op_type for n in om.graph.node] == [F.CONV]
    check_three_ways(net, om, shape, batches=(2,))


@settings(max_examples=10, deadline=None)
@given(pads=st.tuples(*[st.integers(0, 3)] * 4), unit=st.sampled_from(["kernel", "row", "scalar"]), seed=st.integers(0, 999))
def test_property_asymmetric_pads(pads, unit, seed):
    gen = torch.Generator().manual_seed(seed)
    lead = {"kernel": 2, "row": 3, "scalar": 4}[unit]
    shape = (4, 3, 3, 2)
    cw = ClusteredWeight(unit, shape, torch.randn(6, math.prod(shape[lead:]), generator=gen),
                         torch.randint(0, 6, shape[:lead], generator=gen).to(torch.uint8))
    conv = {"strides": [1, 2], "pads": list(pads), "dilations": [1, 1], "group": 1}
    x = torch.randn(2, 3, 6, 7, generator=gen)
    t, l, b, r = pads
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (l, r, t, b)), cw.decode(), None, (1, 2)).numpy()
    om = layer_model(cw, None, conv, ["N", 3, 6, 7])
    for sess in (stock(om), onnxruntime_session(om)):
        close(sess.run(None, {"input": x.numpy()})[0], ref, ref)


# ------------------------------------------------------------------------------- zoo models
ZOO_SLOW = [("resnet56", (1, 3, 32, 32)), ("vgg16-cifar", (1, 3, 32, 32)), ("wrn16-4", (1, 3, 32, 32)),
            ("mobilenetv2", (1, 3, 32, 32)), ("resnet18", (1, 3, 32, 32)), ("alexnet", (1, 3, 224, 224)),
            ("googlenet", (1, 3, 32, 32))]
ZOO_METHODS = {"son": dict(k=16, iters=2), "kse": dict(iters=2, q=4), "dkm": dict(k=8, iters=2),
               "filter": dict(iters=2, ratio=0.5)}


def _zoo_case(name, shape, method):
    from kcompile.zoo import build

    m = build(name).eval()
    cm = cluster(m, method, **ZOO_METHODS[method]).eval()
    om = build_onnx(cm, shape)
    custom = check_graph(om)
    assert len(custom) == len(clustered_layers(cm)) > 0
    check_three_ways(cm, om, shape)


def test_zoo_digits_resnet_son_three_ways():
    _zoo_case("digits-resnet", (1, 1, 8, 8), "son")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kse", "dkm", "filter"])
def test_zoo_digits_resnet_three_ways_slow(method):
    _zoo_case("digits-resnet", (1, 1, 8, 8), method)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(ZOO_METHODS))
@pytest.mark.parametrize("name,shape", ZOO_SLOW)
def test_zoo_three_ways_slow(name, shape, method):
    _zoo_case(name, shape, method)


@pytest.mark.parametrize("dynamic", [True, False])
def test_shape_dependent_op_after_a_clustered_layer(dynamic):
    """AdaptiveAvgPool2d to a non-global size needs the static H, W of the placeholder's output."""
    cw = ClusteredWeight("kernel", (4, 3, 3, 3), torch.randn(5, 9, generator=torch.Generator().manual_seed(0)),
                         torch.arange(12).reshape(4, 3) % 5)
    net = nn.Sequential(ClusteredConv2d(cw, padding=(1, 1)), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d((3, 3)),
                        nn.Flatten(), ClusteredLinear(ClusteredWeight("filter", (2, 36), torch.randn(2, 36), torch.tensor([1, 0])),
                                                      bias=torch.zeros(2))).eval()
    om = build_onnx(net, (2, 3, 12, 12), dynamic_batch=dynamic)
    check_graph(om)
    check_three_ways(net, om, (2, 3, 12, 12), batches=(1,) if dynamic else (2,))


def lossless_clustered(model: nn.Module) -> nn.Module:
    """A copy whose every Conv2d / Linear is a ClusteredConv2d / ClusteredLinear with a lossless
    filter codebook (each filter its own centroid): exercises export on any architecture
    without k-means."""
    import copy

    from kcompile.cluster import make_layer
    from kcompile.layers import set_submodule

    m = copy.deepcopy(model).eval()
    for name, mod in list(m.named_modules()):
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            w = mod.weight.detach()
            cw = ClusteredWeight("filter", tuple(w.shape), w.reshape(w.shape[0], -1).clone(), torch.arange(w.shape[0]))
            set_submodule(m, name, make_layer(mod, cw, None))
    return m


def _zoo_lossless(name, shape):
    """Every conv and linear layer of a zoo model as a com.kcompile node (option-A shortcuts,
    depthwise convs, ReLU6...): same outputs as PyTorch in both runtimes."""
    from kcompile.zoo import build

    cm = lossless_clustered(build(name))
    om = build_onnx(cm, shape)
    custom = check_graph(om)
    assert len(custom) == len(clustered_layers(cm))
    check_three_ways(cm, om, shape)


@pytest.mark.slow
@pytest.mark.parametrize("name,shape", [("resnet56", (1, 3, 16, 16)), ("mobilenetv2", (1, 3, 32, 32)),
                                        ("vgg16-cifar", (1, 3, 32, 32)), ("wrn16-4", (1, 3, 32, 32)),
                                        ("resnet18", (1, 3, 64, 64)), ("googlenet", (1, 3, 64, 64)),
                                        ("alexnet", (1, 3, 224, 224))])
def test_zoo_lossless_codebooks_three_ways_slow(name, shape):
    _zoo_lossless(name, shape)


class OptionABlock(nn.Module):
    """resnet56's block shape: a stride-2 conv next to a parameter-free channel-padding
    shortcut, whose output sizes torch's exporter cannot infer (the next layer sees unknown dims)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        short = torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
        y = torch.relu(self.conv1(x) + short)
        y = torch.nn.functional.adaptive_avg_pool2d(self.conv2(y), 1).flatten(1)
        return self.fc(y)


def test_lossless_codebooks_after_unknown_shapes():
    torch.manual_seed(0)
    cm = lossless_clustered(OptionABlock())
    om = build_onnx(cm, (1, 4, 8, 8))
    assert len(check_graph(om)) == 3
    check_three_ways(cm, om, (1, 4, 8, 8))


def test_padding_same_with_even_kernel_is_asymmetric():
    g = torch.Generator().manual_seed(3)
    cw = ClusteredWeight("row", (3, 2, 2, 4), torch.randn(5, 4, generator=g), torch.randint(0, 5, (3, 2, 2), generator=g))
    net = nn.Sequential(ClusteredConv2d(cw, padding="same", dilation=(1, 2))).eval()
    om = build_onnx(net, (1, 2, 7, 9))
    pads = next(onnx.helper.get_attribute_value(a) for a in om.graph.node[0].attribute if a.name == "pads")
    assert pads == [0, 3, 1, 3]
    check_three_ways(net, om, (1, 2, 7, 9))
