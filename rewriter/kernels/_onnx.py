"""Building blocks of the ONNX translations (traced onnxscript, opset 18 ops).

A translation is a plain Python function over symbolic ONNX values: Python `if`s on
static facts (an option, a static size, whether an input is None) choose what is
emitted. Anything computed from static sizes (a gather plan, a pooling matrix) is
computed here with the op's own PyTorch reference code and embedded as a constant,
so the ONNX graph and the reference cannot drift apart.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset18 as op

__all__ = ["NeedsStaticShape", "const", "ints", "to_float", "repeat_kv", "static", "dense_attention", "tiles_attention", "MASKED"]

MASKED = -1e30  # additive score of an invisible key (finite: a fully masked row stays finite)
FLOAT = 1  # onnx.TensorProto.FLOAT


def const(array) -> object:
    """An ONNX constant from a numpy array or torch tensor."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return op.Constant(value=ir.tensor(np.ascontiguousarray(array)))


def ints(*values: int):
    return op.Constant(value_ints=list(values))


class NeedsStaticShape(ValueError):
    """A translation needs a size the exported program left dynamic (export retries with it fixed)."""


def static(value, dim: int, what: str) -> int:
    """A dim that must be known at export time, or a clear error saying which and why."""
    size = value.shape[dim]
    if not isinstance(size, int):
        raise NeedsStaticShape(f"{what} needs dim {dim} of its input to be static for ONNX export (got {size})")
    return size


def to_float(x):
    return op.Cast(x, to=FLOAT)


def repeat_kv(x, heads: int):
    """[B, Hk, N, D] -> [B, heads, N, D], each k/v head serving heads // Hk query heads."""
    hk = static(x, 1, "grouped-query attention")
    if hk == heads:
        return x
    x5 = op.Unsqueeze(x, ints(2))  # [B, Hk, 1, N, D]
    x5 = op.Expand(x5, ints(1, 1, heads // hk, 1, 1))
    return op.Reshape(x5, ints(0, heads, -1, static(x, 3, "grouped-query attention")))


def _masked_bias(visible_f):
    """0 where visible (1.0), MASKED elsewhere."""
    return op.Mul(op.Sub(op.Constant(value_float=1.0), visible_f), op.Constant(value_float=MASKED))


def dense_attention(q, k, v, key_mask=None):
    """softmax(q kᵀ) v over every key (q already scaled, fp32): [B, H, P, D] -> [B, H, P, Dv].
    Rows whose every key is padded give zeros."""
    s = op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2]))
    if key_mask is None:
        return op.MatMul(op.Softmax(s, axis=-1), v)
    km = op.Cast(op.Unsqueeze(key_mask, ints(1, 2)), to=FLOAT)  # [B, 1, 1, N]
    out = op.MatMul(op.Softmax(op.Add(s, _masked_bias(km)), axis=-1), v)
    return op.Mul(out, op.ReduceMax(km, ints(-1), keepdims=1))


def tiles_attention(q, k, v, key_mask, tiles, d: int, dv: int):
    """Attention over a reference gather plan (`window_attention._tiles.Tiles`).

    q [B, H, N, D] (scaled, fp32), k [B, H, N, D], v [B, H, N, Dv] -> [B, H, len(out_idx), Dv]
    (d, dv given: traced values carry no shapes).
    Each tile gathers its queries and keys, attends with the plan's visibility mask, and
    the outputs are gathered back into token order.
    """
    t, m = tiles.q_idx.shape
    kk = tiles.k_idx.shape[1]
    k_idx = const(tiles.k_idx.reshape(-1))
    qt = op.Reshape(op.Gather(q, const(tiles.q_idx.reshape(-1)), axis=2), ints(0, 0, t, m, d))
    kt = op.Reshape(op.Gather(k, k_idx, axis=2), ints(0, 0, t, kk, d))
    vt = op.Reshape(op.Gather(v, k_idx, axis=2), ints(0, 0, t, kk, dv))
    s = op.MatMul(qt, op.Transpose(kt, perm=[0, 1, 2, 4, 3]))  # [B, H, T, M, K]
    visible = const(tiles.visible.to(torch.float32))  # [T, M, K]
    if key_mask is not None:
        km = op.Cast(op.Reshape(op.Gather(key_mask, k_idx, axis=1), ints(0, 1, t, 1, kk)), to=FLOAT)  # [B,1,T,1,K]
        visible = op.Mul(visible, km)  # [B, 1, T, M, K]
    out = op.MatMul(op.Softmax(op.Add(s, _masked_bias(visible)), axis=-1), vt)  # [B, H, T, M, Dv]
    if key_mask is not None:
        out = op.Mul(out, op.ReduceMax(visible, ints(-1), keepdims=1))
    out = op.Reshape(out, ints(0, 0, t * m, dv))
    return op.Gather(out, const(tiles.out_idx), axis=2)
