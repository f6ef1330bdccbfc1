"""ONNX translations of the window ops: 1-D sliding window, Swin 2-D windows, neighbourhood.

The reference's gather plan (which queries form a tile, which keys each tile gathers,
who sees whom) is built at export time by the reference's own planner and embedded as
constants; the graph gathers, attends per tile and scatters back, so it keeps the
reference's O(N · keys per tile) cost. The plan needs the token count: these ops export
with a static sequence length.
"""
from __future__ import annotations

from onnxscript import opset18 as op

from .._onnx import dense_attention, ints, repeat_kv, static, tiles_attention, to_float
from ._tiles import pair
from .naive import _band_tiles, _na_tiles, _swin_tiles


def _prepared(q, k, v, scale: float):
    """fp32 q·scale, and k/v repeated to q's heads; plus the head dims (traced values have no shapes)."""
    heads = static(q, 1, "window attention")
    dims = static(q, 3, "window attention"), static(v, 3, "window attention")
    return (op.Mul(to_float(q), op.Constant(value_float=scale)), to_float(repeat_kv(k, heads)),
            to_float(repeat_kv(v, heads)), dims)


def _with_dense_rows(qs, ks, vs, key_mask, out, rows: int):
    """Replace the first `rows` outputs by full attention (prefix / global tokens)."""
    if not rows:
        return out
    dense = dense_attention(op.Slice(qs, ints(0), ints(rows), ints(2)), ks, vs, key_mask)
    return op.Concat(dense, out, axis=2)


def sliding_window_attention(q, k, v, key_mask, window: int, causal: bool, dilation: int, sinks: int,
                             global_sinks: bool, scale: float):
    n = static(q, 2, "sliding_window_attention")
    sinks = min(sinks, n)
    qs, ks, vs, dims = _prepared(q, k, v, scale)
    out = tiles_attention(qs, ks, vs, key_mask, _band_tiles(n, window, causal, dilation, sinks, 128, "cpu"), *dims)
    if global_sinks and sinks:
        out = _with_dense_rows(qs, ks, vs, key_mask, op.Slice(out, ints(sinks), ints(n), ints(2)), sinks)
    return op.CastLike(out, q)


def window_attention_2d(q, k, v, key_mask, grid, window, shift, prefix: int, scale: float):
    qs, ks, vs, dims = _prepared(q, k, v, scale)
    hg, wg = pair(list(grid), "grid", "window_attention_2d")
    tiles = _swin_tiles(hg, wg, pair(list(window), "window", "window_attention_2d"),
                        pair(list(shift), "shift", "window_attention_2d"), prefix, "cpu")
    out = _with_dense_rows(qs, ks, vs, key_mask, tiles_attention(qs, ks, vs, key_mask, tiles, *dims), prefix)
    return op.CastLike(out, q)


def neighborhood_attention_2d(q, k, v, key_mask, grid, kernel_size, dilation, prefix: int, scale: float):
    qs, ks, vs, dims = _prepared(q, k, v, scale)
    hg, wg = pair(list(grid), "grid", "neighborhood_attention_2d")
    tiles = _na_tiles(hg, wg, pair(list(kernel_size), "kernel_size", "neighborhood_attention_2d"),
                      pair(list(dilation), "dilation", "neighborhood_attention_2d"), (8, 8), prefix, "cpu")
    out = _with_dense_rows(qs, ks, vs, key_mask, tiles_attention(qs, ks, vs, key_mask, tiles, *dims), prefix)
    return op.CastLike(out, q)
