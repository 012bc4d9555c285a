"""ONNX function bodies (FunctionProto, domain ``com.kcompile``) of kcompile's custom ops.

Both ops share one input signature (``INPUTS``); every input but ``B`` is always given, with
tiny shared *neutral* initializers standing for features a layer does not use:

==========  =========================  ==============================  ====================
input       shape (L = index shape)    meaning                         neutral (absent)
==========  =========================  ==============================  ====================
X           (N, C, H, W) / (..., I)    activation                      —
codebook    (K, D) float32             centroids (shareable)           —
index       L uint8/uint16/uint32      centroid id (local to a book)   —
scale       L float16                  per-unit scale (Son)            (1,) = 1
perms       (T, D) int64               TIC permutations of D           (1, D) identity
transform   L uint8                    transform id per unit           (1,) = 0
offset      (C,) int64                 start of channel c's book       (1,) = 0
keep        (C,) float32               0 for pruned input channels     (1,) = 1
B           (O,) float32               bias (optional: "" = none)      omitted
==========  =========================  ==============================  ====================

Attributes: ``weight_shape`` (ints, the dense weight's shape), ``unit`` (string, for readers),
and for ``ClusteredConv`` the ONNX Conv attributes ``strides``, ``pads`` (begin..., end...),
``dilations``, ``group`` (passed to the inner Conv by attribute reference).

Decode (all units: the unit is implicit in the index shape)::

    vec = Gather(codebook, Cast<int64>(index) + offset)            # L + (D,)
    vec = GatherElements(vec, Gather(perms, Expand(transform, L)), axis=-1)
    vec = vec * Unsqueeze(Cast<float>(scale), -1)
    W   = Reshape(vec, weight_shape) * Reshape(keep, (1, -1, 1, ...))

then ``Conv(X, W, B)`` (ClusteredConv) or ``MatMul(X, Transpose(W)) + B`` (ClusteredGemm, any
leading dims). Stock onnxruntime inlines the body and constant-folds the decode at load time.
"""

from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto
from onnx import helper as h

DOMAIN = "com.kcompile"
DOMAIN_VERSION = 1
#: Standard opset torch's TorchScript exporter writes (its maximum) ...
TORCH_OPSET = 20
#: ... and the one of the saved models and the function bodies: 21 adds 4-bit types to Cast
#: (opset 21 changed no semantics of opset-20 ops, only type lists).
OPSET = 21
#: IR version written (onnxruntime 1.31 loads IR <= 11; 10 is the one introducing UINT4).
IR_VERSION = 10

CONV = "ClusteredConv"
GEMM = "ClusteredGemm"
INPUTS = ("X", "codebook", "index", "scale", "perms", "transform", "offset", "keep", "B")
CONV_ATTRS = ("strides", "pads", "dilations", "group")
COMMON_ATTRS = ("weight_shape", "unit")


def _ref(name: str, ref: str, kind: int) -> AttributeProto:
    """An attribute that takes its value from the calling node's attribute ``ref``."""
    a = AttributeProto()
    a.name, a.ref_attr_name, a.type = name, ref, kind
    return a


def _decode_nodes(keep_rank: int) -> list[onnx.NodeProto]:
    """Nodes computing the dense weight ``W`` from the decode inputs (see module doc)."""
    n = []
    n.append(h.make_node("Cast", ["index"], ["idx64"], to=TensorProto.INT64, name="index_to_int64"))
    n.append(h.make_node("Add", ["idx64", "offset"], ["gidx"], name="add_book_offset"))
    n.append(h.make_node("Gather", ["codebook", "gidx"], ["vec0"], axis=0, name="gather_centroids"))
    n.append(h.make_node("Shape", ["index"], ["ishape"], name="unit_shape"))
    n.append(h.make_node("Expand", ["transform", "ishape"], ["tsel"], name="expand_transform"))
    n.append(h.make_node("Cast", ["tsel"], ["t64"], to=TensorProto.INT64, name="transform_to_int64"))
    n.append(h.make_node("Gather", ["perms", "t64"], ["perm"], axis=0, name="gather_permutations"))
    n.append(h.make_node("GatherElements", ["vec0", "perm"], ["vec1"], axis=-1, name="apply_transform"))
    n.append(h.make_node("Cast", ["scale"], ["scale32"], to=TensorProto.FLOAT, name="scale_to_float"))
    n.append(h.make_node("Constant", [], ["last_axis"], value_ints=[-1], name="last_axis"))
    n.append(h.make_node("Unsqueeze", ["scale32", "last_axis"], ["scale_u"], name="scale_per_unit"))
    n.append(h.make_node("Mul", ["vec1", "scale_u"], ["vec2"], name="apply_scale"))
    shape = h.make_node("Constant", [], ["wshape"], name="weight_shape")
    shape.attribute.append(_ref("value_ints", "weight_shape", AttributeProto.INTS))
    n.append(shape)
    n.append(h.make_node("Reshape", ["vec2", "wshape"], ["W0"], name="to_weight"))
    n.append(h.make_node("Constant", [], ["kshape"], value_ints=[1, -1] + [1] * (keep_rank - 2), name="keep_shape"))
    n.append(h.make_node("Reshape", ["keep", "kshape"], ["keepb"], name="keep_per_channel"))
    n.append(h.make_node("Mul", ["W0", "keepb"], ["W"], name="apply_keep"))
    return n


def clustered_conv_function() -> onnx.FunctionProto:
    """``com.kcompile::ClusteredConv``: decode, then a standard Conv (attributes referenced)."""
    nodes = _decode_nodes(4)
    conv = h.make_node("Conv", ["X", "W", "B"], ["Y"], name="conv")
    for name, kind in (("strides", AttributeProto.INTS), ("pads", AttributeProto.INTS),
                       ("dilations", AttributeProto.INTS), ("group", AttributeProto.INT)):
        conv.attribute.append(_ref(name, name, kind))
    nodes.append(conv)
    return h.make_function(DOMAIN, CONV, list(INPUTS), ["Y"], nodes, [h.make_opsetid("", OPSET)],
                           attributes=list(CONV_ATTRS + COMMON_ATTRS),
                           doc_string="Clustered conv: W decoded from codebook + index, then Conv.")


def clustered_gemm_function() -> onnx.FunctionProto:
    """``com.kcompile::ClusteredGemm``: decode, then ``MatMul(X, W^T) + B`` (B required)."""
    nodes = _decode_nodes(2)
    nodes.append(h.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="transpose_weight"))
    nodes.append(h.make_node("MatMul", ["X", "Wt"], ["XW"], name="matmul"))
    nodes.append(h.make_node("Add", ["XW", "B"], ["Y"], name="add_bias"))
    return h.make_function(DOMAIN, GEMM, list(INPUTS), ["Y"], nodes, [h.make_opsetid("", OPSET)],
                           attributes=list(COMMON_ATTRS),
                           doc_string="Clustered linear layer: W decoded from codebook + index, then X W^T + B.")


def functions() -> list[onnx.FunctionProto]:
    """The FunctionProtos to put in a model's ``functions``."""
    return [clustered_conv_function(), clustered_gemm_function()]
