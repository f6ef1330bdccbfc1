"""ONNX translation of `rewriter::layer_norm`: the standard LayerNormalization (opset 17+)."""
from __future__ import annotations

import numpy as np
from onnxscript import opset18 as op

from .._onnx import const, static, to_float


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    xf = to_float(x)
    w = to_float(weight) if weight is not None else const(np.ones(static(x, -1, "layer_norm without weight"), np.float32))
    b = to_float(bias) if bias is not None else None
    y, _, _ = op.LayerNormalization(xf, w, b, axis=-1, epsilon=eps)  # (Y, Mean, InvStdDev)
    return op.CastLike(y, x)
