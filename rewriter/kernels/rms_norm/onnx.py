"""ONNX translations of `rewriter::rms_norm` and `rewriter::crms_norm`.

Opset 18: a decomposition in fp32 (ReduceMean of squares, Sqrt, Div). Opset ≥ 23: the
standard `RMSNormalization` op where it fits (no weight offset, no bias).
"""
from __future__ import annotations

from onnxscript import opset18 as op

from .._onnx import epsilon, ints, to_float


def _affine(y, weight, bias, weight_offset: float = 0.0):
    if weight is not None:
        w = to_float(weight)
        if weight_offset:
            w = op.Add(w, op.Constant(value_float=weight_offset))
        y = op.Mul(y, w)
    if bias is not None:
        y = op.Add(y, to_float(bias))
    return y


def rms_norm(x, weight=None, bias=None, eps: float = 1e-6, weight_offset: float = 0.0):
    # spelled Pow → ReduceMean → Add → Sqrt → Div → Mul: the pattern onnxruntime fuses into
    # one SimplifiedLayerNormalization kernel
    xf = to_float(x)
    ms = op.ReduceMean(op.Pow(xf, op.Constant(value_float=2.0)), ints(-1), keepdims=1)
    y = op.Div(xf, op.Sqrt(op.Add(ms, epsilon(eps))))
    return op.CastLike(_affine(y, weight, bias, weight_offset), x)


def rms_norm_opset23(x, weight=None, bias=None, eps: float = 1e-6, weight_offset: float = 0.0):
    if weight is None or bias is not None or weight_offset:
        return rms_norm(x, weight, bias, eps, weight_offset)
    from onnxscript import opset23

    xf = to_float(x)
    return op.CastLike(opset23.RMSNormalization(xf, to_float(weight), axis=-1, epsilon=eps), x)


def crms_norm(x, weight=None, bias=None, eps: float = 1e-6):
    """x [..., D-1] (a zero-mean stream without its last channel) -> RMSNorm of the full [..., D]."""
    xf = to_float(x)
    total = op.ReduceSum(xf, ints(-1), keepdims=1)
    d = float(x.shape[-1] + 1)
    ms = op.Div(op.Add(op.ReduceSum(op.Mul(xf, xf), ints(-1), keepdims=1), op.Mul(total, total)),
                op.Constant(value_float=d))
    full = op.Concat(xf, op.Neg(total), axis=-1)
    y = op.Div(full, op.Sqrt(op.Add(ms, epsilon(eps))))
    return op.CastLike(_affine(y, weight, bias), x)
