"""The token layout of a vision model: which tokens form a 2-D grid, and how many come first.

Read from the graph's shapes: a patch embedding is a conv2d whose output [B, C, Hg, Wg]
becomes Hg·Wg tokens (flatten + transpose), to which a few prefix tokens (CLS,
distillation, registers) are concatenated in front. An attention over N tokens has that
grid when N = prefix + Hg·Wg with a small prefix.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..graph import val

aten = torch.ops.aten

__all__ = ["infer_grid", "MAX_PREFIX"]

MAX_PREFIX = 16  # CLS + distillation + registers, in the models we know


def _conv_grids(graph: fx.Graph) -> list[tuple[int, int]]:
    grids = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target in (aten.conv2d.default, aten.convolution.default, torch.conv2d,
                                                     torch.nn.functional.conv2d):
            v = val(n)
            if isinstance(v, torch.Tensor) and v.dim() == 4 and all(isinstance(s, int) for s in v.shape[-2:]):
                grids.append((v.shape[-2], v.shape[-1]))
    return grids


def infer_grid(graph: fx.Graph, n_tokens, grid=None, prefix=None) -> tuple[tuple[int, int] | None, int, str | None]:
    """(grid, prefix, reason): the 2-D layout of `n_tokens` tokens, or why it is unknown.

    A user's `grid` (and `prefix`, default n_tokens − Hg·Wg) wins over inference.
    """
    if grid is not None:
        hg, wg = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if not isinstance(n_tokens, int):  # a dynamic length: the op checks the grid on every call
            return (hg, wg), prefix or 0, None
        p = n_tokens - hg * wg if prefix is None else prefix
        if p < 0 or p + hg * wg != n_tokens:
            return None, 0, f"grid {hg}x{wg} with prefix {p} does not cover the {n_tokens} tokens"
        return (hg, wg), p, None
    if not isinstance(n_tokens, int):
        return None, 0, "the token count is dynamic: pass grid=(H, W) and prefix=P, or optimize(..., dynamic=False)"
    fits = sorted({(n_tokens - h * w, (h, w)) for h, w in _conv_grids(graph) if 0 <= n_tokens - h * w <= MAX_PREFIX})
    if not fits:
        return None, 0, (f"cannot infer a 2-D token grid for {n_tokens} tokens (no patch-embedding conv2d "
                         "matches); pass grid=(H, W) and prefix=P")
    if prefix is not None:
        fits = [f for f in fits if f[0] == prefix] or fits
    p, g = fits[0]
    return g, p, None
