"""Softmax attention → local attention: 1-D sliding window with sinks (Longformer,
StreamingLLM, Mistral), 2-D windows with shift (Swin), neighbourhoods with dilation
(NAT/DiNAT). The 2-D forms need the token grid (inferred from the patch embedding, or
given) and are for non-causal self-attention."""
from __future__ import annotations

import torch

from .. import kernels  # noqa: F401  (registers torch.ops.rewriter)
from ..graph import call, val
from ._layout import infer_grid
from .approximate import Form

ops = torch.ops.rewriter
aten = torch.ops.aten


def _pair(x, name):
    pair = (x, x) if isinstance(x, int) else tuple(x)
    if len(pair) != 2 or not all(isinstance(i, int) and i >= 1 for i in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, not {x!r}")
    return pair


def _front(x) -> tuple | None:
    """(prefix, rest) when `x` is `cat([prefix, rest], dim=-2)`."""
    if not (x.op == "call_function" and x.target == aten.cat.default and len(x.args[0]) == 2):
        return None
    dim = x.args[1] if len(x.args) > 1 else 0
    return tuple(x.args[0]) if dim in (-2, val(x).dim() - 2) else None


def _prepended_sinks(s) -> int | None:
    """How many tokens are concatenated in front of both K and V (learned sink tokens, as
    StreamingLLM and gpt-oss add them), when what follows them are the queries' positions."""
    k, v = _front(s.k), _front(s.v)
    if k is None or v is None:
        return None
    n = val(k[0]).shape[-2]
    if not isinstance(n, int) or val(v[0]).shape[-2] != n or str(val(k[1]).shape[-2]) != str(s.n_tokens):
        return None
    return n


def _sliding(gm, s, p):
    window, dilation, sinks = int(p["window"]), int(p["dilation"]), int(p["sinks"])
    if window < 1 or dilation < 1 or sinks < 0:
        raise ValueError(f"window and dilation must be >= 1 and sinks >= 0 (got {window}, {dilation}, {sinks})")
    q, prepended = s.q, 0
    if not s.same_tokens:
        prepended = _prepended_sinks(s)
        if prepended is None or (s.prefix and prepended != s.prefix):
            return None, "cross-attention (queries and keys differ): a sliding window needs self-attention", {}
        # the concatenated tokens become the op's first sinks; a zero query stands at each of their positions
        q = call(gm.graph, aten.constant_pad_nd.default, (s.q, [0, 0, prepended, 0]), like=s.node)
    global_sinks = bool(p["global_sinks"]) and not s.causal
    used = {"window": window, "dilation": dilation, "sinks": sinks, "global_sinks": global_sinks, "scale": s.scale}
    if prepended:
        used["prepended_sinks"] = prepended
    node = call(gm.graph, ops.sliding_window_attention.default,
                (q, s.k, s.v, s.key_mask, window, s.causal, dilation, prepended + sinks, global_sinks, s.scale),
                like=s.node)
    if prepended:
        node = call(gm.graph, aten.slice.Tensor, (node, 2, prepended, 2**62), like=s.node)
    return node, None, used


def _grid_site(gm, s, p, form):
    if s.causal:
        return None, None, f"causal attention: {form} attention is non-causal only (vision)"
    if not s.same_tokens:
        return None, None, "cross-attention (queries and keys differ): 2-D local attention needs self-attention"
    grid, prefix, reason = infer_grid(gm.graph, s.n_tokens, p["grid"], p["prefix"])
    return grid, prefix, reason


def _window2d(gm, s, p):
    grid, prefix, reason = _grid_site(gm, s, p, "window2d")
    if reason:
        return None, reason, {}
    window = _pair(p["window"], "window")
    window = (min(window[0], grid[0]), min(window[1], grid[1]))  # Swin: a window never exceeds the grid
    shift = p["shift"]
    if shift == "alternate":  # Swin: regular windows on even layers, shifted by half on odd ones
        shift = (0, 0) if s.index % 2 == 0 else (window[0] // 2, window[1] // 2)
    shift = (0, 0) if shift is None else (shift, shift) if isinstance(shift, int) else tuple(shift)
    if window == tuple(grid):
        shift = (0, 0)  # one window covers the grid: nothing to shift
    if len(shift) != 2 or not all(isinstance(sh, int) and 0 <= sh < w for sh, w in zip(shift, window)):
        raise ValueError(f"shift {shift} must satisfy 0 <= shift < window {window}")
    used = {"grid": list(grid), "prefix": prefix, "window": list(window), "shift": list(shift), "scale": s.scale}
    node = call(gm.graph, ops.window_attention_2d.default,
                (s.q, s.k, s.v, s.key_mask, list(grid), list(window), list(shift), prefix, s.scale), like=s.node)
    return node, None, used


def _neighborhood(gm, s, p):
    grid, prefix, reason = _grid_site(gm, s, p, "neighborhood")
    if reason:
        return None, reason, {}
    kernel, dilation = _pair(p["kernel_size"], "kernel_size"), _pair(p["dilation"], "dilation")
    if any(g < k * d for g, k, d in zip(grid, kernel, dilation)):
        return None, (f"grid {grid[0]}x{grid[1]} is smaller than kernel {kernel} x dilation {dilation}; "
                      "use a smaller kernel_size or dilation"), {}
    used = {"grid": list(grid), "prefix": prefix, "kernel_size": list(kernel), "dilation": list(dilation),
            "scale": s.scale}
    node = call(gm.graph, ops.neighborhood_attention_2d.default,
                (s.q, s.k, s.v, s.key_mask, list(grid), list(kernel), list(dilation), prefix, s.scale), like=s.node)
    return node, None, used


_GRID = {"grid": None, "prefix": None}
FORMS = {
    "sliding_window": Form("sliding_window", "sliding_window_attention",
                           {"window": 512, "dilation": 1, "sinks": 4, "global_sinks": False}, _sliding),
    "window2d": Form("window2d", "window_attention_2d", {"window": 7, "shift": "alternate", **_GRID}, _window2d),
    "neighborhood": Form("neighborhood", "neighborhood_attention_2d",
                         {"kernel_size": 7, "dilation": 1, **_GRID}, _neighborhood),
}
