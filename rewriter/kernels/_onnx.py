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

__all__ = ["NeedsStaticShape", "const", "ints", "epsilon", "to_float", "repeat_kv", "static", "dense_attention",
           "tiles_attention", "grouped_mm", "MASKED"]

MASKED = -1e30  # additive score of an invisible key (finite: a fully masked row stays finite)
FLOAT = 1  # onnx.TensorProto.FLOAT


def const(array) -> object:
    """An ONNX constant from a numpy array or torch tensor."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return op.Constant(value=ir.tensor(np.ascontiguousarray(array)))


def ints(*values: int):
    return op.Constant(value_ints=list(values))


def epsilon(value: float):
    """A small additive constant (a norm's eps) as a 1-element tensor, not a scalar: the
    onnxscript optimizer that torch.onnx runs drops `x + c` for any scalar |c| <= 1e-8
    (its no-op rule compares with abs_tol=1e-8), and an eps of 1e-12 lost that way turns
    a zero row into 0/0 = NaN. A [1] constant broadcasts the same and is left alone."""
    return op.Constant(value=ir.tensor(np.array([value], dtype=np.float32)))


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


INT64 = 7  # onnx.TensorProto.INT64


def grouped_mm(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
    """`aten._grouped_mm` and `transformers::grouped_mm_fallback` (mixture-of-experts
    layers): mat_a [M, K] holds rows sorted by group, offs [G] each group's end row, mat_b
    [G, K, N] the groups' matrices -> [M, N], row r times its group's matrix (+ bias [G, N]);
    rows past offs[-1] give zeros (as the fallback does). Without offs, mat_a [G, M, K]
    batched with mat_b [G, K, N].

    G is static (the number of experts), so this is one Slice + MatMul per group and one
    Concat: no [M, K, N] gather of every row's matrix.
    """
    if offs is None:
        if len(mat_a.shape) != 3 or len(mat_b.shape) != 3:
            raise ValueError("grouped_mm without offs needs mat_a [G, M, K] and mat_b [G, K, N] for ONNX export")
        out = op.MatMul(mat_a, mat_b)
        if bias is not None:
            out = op.Add(out, op.Unsqueeze(bias, ints(1)))
        return out if out_dtype is None else op.Cast(out, to=out_dtype)
    if len(mat_a.shape) != 2 or len(mat_b.shape) != 3:
        raise ValueError(f"grouped_mm with offs is exported for mat_a [M, K] and mat_b [G, K, N] "
                         f"(got ranks {len(mat_a.shape)} and {len(mat_b.shape)})")
    groups = static(mat_b, 0, "grouped_mm (the number of groups)")
    ends = op.Cast(offs, to=INT64)  # [G]
    axis0 = ints(0)
    start = ints(0)
    outs = []
    for g in range(groups):
        end = op.Slice(ends, ints(g), ints(g + 1), axis0)  # [1]
        rows = op.Slice(mat_a, start, end, axis0)  # [n_g, K]
        out = op.MatMul(rows, op.Gather(mat_b, op.Constant(value_int=g), axis=0))  # [n_g, N]
        if bias is not None:
            out = op.Add(out, op.Gather(bias, op.Constant(value_int=g), axis=0))
        outs.append(out)
        start = end
    rest = op.Slice(mat_a, start, ints(2 ** 62), axis0)  # rows no group claims: zeros
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), outs[0]),
                      op.Concat(op.Shape(rest, start=0, end=1), op.Shape(mat_b, start=2, end=3), axis=0))
    out = op.Concat(*outs, zeros, axis=0)
    return out if out_dtype is None else op.Cast(out, to=out_dtype)
