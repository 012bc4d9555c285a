"""Inference batch-norm folding for the traced copy of a model (used by ``compiler``).

A batch-norm in inference mode is a per-channel affine map, ``y = x * scale + shift`` with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``
(each of shape (O,)). When it directly follows a conv (the conv's only user), the compiler
folds it:

- dense weights (plain convs, decode-then-dense clustered convs): ``w'[o] = w[o] * scale[o]``,
  ``b'[o] = b[o] * scale[o] + shift[o]`` -- the batch-norm costs nothing at run time;
- clustered kernels (shared-centroid / filter forms): the codebook is left alone; the
  kernel's ``out`` stage multiplies by ``scale`` per output channel and the shift joins the
  bias (``kernels/tvm_compute.with_epilogue``), so it costs no pass of its own either.

This module only finds the pairs and computes the affine maps (NumPy, float64 math, float32
results); the converters in ``compiler`` apply them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BN_TARGET = "_native_batch_norm_legit_no_training.default"


@dataclass(frozen=True)
class ChannelAffine:
    """``y[:, o] = x[:, o] * scale[o] + shift[o]``; scale, shift float32 of shape (O,)."""

    scale: np.ndarray
    shift: np.ndarray

    def fold_weight(self, weight: np.ndarray) -> np.ndarray:
        """weight (O, Cg, kh, kw) -> weight scaled per output channel (float32)."""
        return (np.asarray(weight, np.float64) * self.scale.astype(np.float64)[:, None, None, None]).astype(np.float32)

    def fold_bias(self, bias) -> np.ndarray:
        """bias (O,) or None -> bias * scale + shift (float32, shape (O,))."""
        b = np.zeros(len(self.scale)) if bias is None else np.asarray(bias, np.float64)
        return (b * self.scale.astype(np.float64) + self.shift.astype(np.float64)).astype(np.float32)


def _target_name(node) -> str:
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _tensor_of(ep, node, channels: int, default: float) -> np.ndarray | None:
    """The constant tensor behind placeholder ``node`` (a parameter, buffer or lifted
    constant of ``ep``) as float64 (channels,); ``default`` filled when ``node`` is None;
    None when it is not a constant of the program."""
    if node is None:
        return np.full(channels, default)
    if getattr(node, "op", None) != "placeholder":
        return None
    sig = ep.graph_signature
    for table, store in ((sig.inputs_to_parameters, ep.state_dict), (sig.inputs_to_buffers, ep.state_dict),
                         (sig.inputs_to_buffers, ep.constants),
                         (getattr(sig, "inputs_to_lifted_tensor_constants", {}), ep.constants)):
        name = table.get(node.name)
        if name is not None and name in store:
            t = store[name].detach().cpu().double().numpy().reshape(-1)
            return t if t.shape == (channels,) else None
    return None


def batch_norm_affine(ep, bn_node, channels: int) -> ChannelAffine | None:
    """The affine map of an inference batch-norm node of ``ep`` over ``channels`` channels,
    or None when one of its statistics / parameters is not a constant."""
    args = list(bn_node.args) + [None] * (7 - len(bn_node.args))
    gamma = _tensor_of(ep, args[1], channels, 1.0)
    beta = _tensor_of(ep, args[2], channels, 0.0)
    mean = _tensor_of(ep, args[3], channels, 0.0)
    var = _tensor_of(ep, args[4], channels, 1.0)
    eps = float(args[6] if args[6] is not None else bn_node.kwargs.get("eps", 1e-5))
    if any(v is None for v in (gamma, beta, mean, var)):
        return None
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale
    return ChannelAffine(scale.astype(np.float32), shift.astype(np.float32))


def conv_batch_norms(ep, conv_target: str, channels_of) -> dict[str, ChannelAffine]:
    """{conv node name: affine map of the inference batch-norm that is its only user} for
    the ``conv_target`` call nodes of ``ep``'s graph; ``channels_of(conv node)`` gives the
    conv's output channel count."""
    found = {}
    for node in ep.graph.nodes:
        if _target_name(node) != BN_TARGET or not node.args:
            continue
        conv = node.args[0]
        if _target_name(conv) != conv_target or len(conv.users) != 1:
            continue
        aff = batch_norm_affine(ep, node, channels_of(conv))
        if aff is not None:
            found[conv.name] = aff
    return found
