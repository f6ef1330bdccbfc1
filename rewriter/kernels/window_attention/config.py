"""Search spaces of the window-attention kernels, as data (no Triton import).

The Triton kernels' spaces are declared beside them (`sliding_config.py`, `grid_config.py`)
and collected here as `SPACES`. `CPU_SPACES` are the references' own knobs on the CPU:

- `sliding_window_attention`: `block_size`, queries per tile of the band plan. Larger
  tiles mean fewer, larger matmuls but more wasted keys (each tile gathers
  `block_size + window` keys).
- `neighborhood_attention_2d`: `TILE_Y` × `TILE_X` queries per tile (per dilation
  group); same trade-off in 2-D (a tile gathers `(TILE_Y + k - 1) × (TILE_X + k - 1)` keys).

All three take `max_scores`, the elements of one score block of the tile engine
(`_tiles.run_tiles`): tiles are processed in batches of at most that many scores, trading
fewer, larger batched matmuls against a working set that fits the caches. (Swin windows
have no tile knob: a window is a tile.)
"""
from __future__ import annotations

from typing import Any

from rewriter.autotune.space import Space, next_pow2

from .grid_config import SPACES as _GRID_SPACES
from .grid_config import neighborhood_shape_of, window_shape_of
from .sliding_config import SPACE as _SLIDING_SPACE
from .sliding_config import shape_of as sliding_shape_of

__all__ = ["SPACES", "CPU_SPACES"]

SPACES = {"sliding_window_attention": _SLIDING_SPACE, **_GRID_SPACES}


def _sliding_limit(shape: dict[str, Any]) -> int:
    """The largest useful block: one covering a dilation group's tokens."""
    return max(16, next_pow2(-(-int(shape["n"]) // int(shape["dilation"]))))


def _neighborhood_limits(shape: dict[str, Any]) -> tuple[int, int]:
    """The largest useful tile: one covering a dilation group's grid rows and columns."""
    rows = -(-int(shape["grid_h"]) // int(shape["dilation_h"]))
    cols = -(-int(shape["grid_w"]) // int(shape["dilation_w"]))
    return max(2, next_pow2(rows)), max(4, next_pow2(cols))


def _sliding_keep(config: dict[str, Any], shape: dict[str, Any]) -> bool:
    return config["block_size"] <= _sliding_limit(shape)


def _neighborhood_keep(config: dict[str, Any], shape: dict[str, Any]) -> bool:
    ty, tx = _neighborhood_limits(shape)
    return config["TILE_Y"] <= ty and config["TILE_X"] <= tx


MAX_SCORES = [1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26]


def _sliding_default(shape: dict[str, Any]) -> dict[str, Any]:
    return {"block_size": min(128, _sliding_limit(shape)), "max_scores": 1 << 24}


def _window_default(shape: dict[str, Any]) -> dict[str, Any]:
    return {"max_scores": 1 << 24}


def _neighborhood_default(shape: dict[str, Any]) -> dict[str, Any]:
    ty, tx = _neighborhood_limits(shape)
    return {"TILE_Y": min(8, ty), "TILE_X": min(8, tx), "max_scores": 1 << 24}


CPU_SPACES = {
    "sliding_window_attention": Space(
        "sliding_window_attention", params={"block_size": [16, 32, 64, 128, 256, 512, 1024], "max_scores": MAX_SCORES},
        keep=_sliding_keep, default=_sliding_default, shape_of=sliding_shape_of),
    "window_attention_2d": Space(
        "window_attention_2d", params={"max_scores": MAX_SCORES}, keep=lambda config, shape: True,
        default=_window_default, shape_of=window_shape_of),
    "neighborhood_attention_2d": Space(
        "neighborhood_attention_2d", params={"TILE_Y": [2, 4, 8, 16], "TILE_X": [4, 8, 16, 32], "max_scores": MAX_SCORES},
        keep=_neighborhood_keep, default=_neighborhood_default, shape_of=neighborhood_shape_of),
}
