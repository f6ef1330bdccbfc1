"""ONNX translation of `rewriter::linear_attention`.

Non-causal: the state S = φ(K)ᵀV and z = Σφ(K) are reduced once, so the graph is linear
in N like the reference. Causal: the masked quadratic form (φQ φKᵀ ⊙ tril) V — exact,
but O(N²) memory; ONNX has no cheap way to express the chunked recurrence without Loop.
"""
from __future__ import annotations

from onnxscript import opset18 as op

from .._onnx import epsilon, ints, repeat_kv, static, to_float

TINY = 1.1754943508222875e-38  # fp32 tiny: guards the focused map's divisions


def _feature_map(x, kind: str, power: float):
    if kind == "identity":
        return x
    if kind == "elu":
        return op.Add(op.Elu(x), op.Constant(value_float=1.0))
    if kind == "relu":
        return op.Relu(x)
    r = op.Relu(x)  # focused: ‖r‖ · u / ‖u‖ with u = (r / max r)^p
    tiny = op.Constant(value_float=TINY)
    u = op.Pow(op.Div(r, op.Max(op.ReduceMax(r, ints(-1), keepdims=1), tiny)), op.Constant(value_float=power))
    norm = lambda t: op.Sqrt(op.ReduceSum(op.Mul(t, t), ints(-1), keepdims=1))  # noqa: E731
    return op.Mul(u, op.Div(norm(r), op.Max(norm(u), tiny)))


def linear_attention(q, k, v, key_mask, feature_map: str, causal: bool, normalize: str, power: float, eps: float):
    heads = static(q, 1, "linear_attention")
    qf = _feature_map(to_float(q), feature_map, power)
    kf = _feature_map(to_float(repeat_kv(k, heads)), feature_map, power)
    vf = to_float(repeat_kv(v, heads))
    if key_mask is not None:
        kf = op.Mul(kf, op.Cast(op.Unsqueeze(key_mask, ints(1, 3)), to=1))  # [B, 1, N, 1]
    if causal:
        a = op.Trilu(op.MatMul(qf, op.Transpose(kf, perm=[0, 1, 3, 2])), upper=0)  # [B, H, N, N]
        o = op.MatMul(a, vf)
        den = op.ReduceSum(a, ints(-1), keepdims=1)
    else:
        o = op.MatMul(qf, op.MatMul(op.Transpose(kf, perm=[0, 1, 3, 2]), vf))  # φQ (φKᵀ V)
        z = op.Unsqueeze(op.ReduceSum(kf, ints(2), keepdims=0), ints(-1))  # [B, H, D, 1]
        den = op.MatMul(qf, z)
    if normalize == "denominator":
        o = op.Div(o, op.Add(den, epsilon(eps)))
    else:
        ms = op.ReduceMean(op.Mul(o, o), ints(-1), keepdims=1)
        o = op.Div(o, op.Sqrt(op.Add(ms, epsilon(eps))))
    return op.CastLike(o, q)
