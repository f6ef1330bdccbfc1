"""Search spaces of the RMSNorm kernels (`triton.py` beside this file), as data.

No Triton import here: the tuner and the runtime read these without a GPU.

A config is one dict, used by the forward and the backward launch alike:

- `BLOCK_D`: columns per tile. A row wider than `BLOCK_D` is walked in column blocks
  (two passes forward; a statistics kernel then a column-parallel kernel backward);
  a row that fits is loaded once and kept in registers. Kept: blocks from half the row
  (rounded up to a power of two; at least 1024 wide for long rows) up to the whole row.
- `BLOCK_M`: rows per tile, so narrow rows still give every thread work.
- `ROWS_PER_PROGRAM`: rows each program walks (a multiple of `BLOCK_M`). Sets the grid
  (`cdiv(rows, ROWS_PER_PROGRAM)` programs) and, backward, how many per-program weight and
  bias partial sums the second reduction stage adds up.
- `num_warps`: threads per program / 32.

`shape` is `{"rows": R, "d": D, "dtype": "bfloat16"}` where `d` is the input's last dim,
`x.shape[-1]`; for `crms_norm` the kernel normalises rows of width `d + 1`.
"""
from __future__ import annotations

from typing import Any

from rewriter.autotune.space import Space, next_pow2

__all__ = ["SPACES", "PARAMS", "keep", "default", "next_pow2", "shape_of"]

# the largest tile, in elements, one program holds (fp32 accumulators live in registers)
MAX_TILE = 16384
# elements per thread beyond which registers spill
MAX_PER_THREAD = 64
# a row that needs walking in column blocks is walked in blocks at least this wide
MIN_SPLIT_BLOCK = 1024
# the default's rows per program: the backward's fp32 partial sums near this many elements
# ([programs, D]; 16 MB), but never fewer than MIN_PROGRAMS programs where rows allow
PARTIAL_ELEMENTS = 1 << 22
MIN_PROGRAMS = 256

PARAMS: dict[str, list] = {
    "BLOCK_D": [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
    "BLOCK_M": [1, 2, 4, 8, 16],
    "ROWS_PER_PROGRAM": [1, 2, 4, 8, 16, 32, 64, 128, 256],
    "num_warps": [1, 2, 4, 8, 16],
}


def keep(config: dict[str, Any], shape: dict[str, Any], width: int | None = None) -> bool:
    """Whether `config` is worth running on `shape` (rows of `width` columns)."""
    width = shape["d"] if width is None else width
    rows = max(int(shape["rows"]), 1)
    bd, bm, rpp, warps = config["BLOCK_D"], config["BLOCK_M"], config["ROWS_PER_PROGRAM"], config["num_warps"]
    tile = bm * bd
    fit = max(PARAMS["BLOCK_D"][0], next_pow2(width))  # the smallest block holding a whole row
    return (
        bd <= fit  # no block wider than the row needs
        and bd >= min(fit // 2, MIN_SPLIT_BLOCK)  # wide rows are walked in blocks that are not tiny
        and tile <= MAX_TILE
        and bm <= next_pow2(rows)
        and rpp % bm == 0
        and rpp <= max(bm, next_pow2(rows))  # no program with nothing to do
        and warps * 32 <= tile  # every thread holds at least one element
        and tile <= warps * 32 * MAX_PER_THREAD
    )


def default(shape: dict[str, Any], width: int | None = None) -> dict[str, Any]:
    """A config that is kept and is reasonable for `shape` without tuning.

    Chosen from an H200 sweep of rms_norm forward and backward (bf16; 8192x4096, 32768x768,
    512x65536): one block per row up to 16K columns, ~1K-element tiles for narrow rows
    (taller tiles slowed the backward 2x), ~16 elements a thread, and rows per program
    balancing the forward's parallelism against the backward's partial sums.
    """
    width = shape["d"] if width is None else width
    rows = max(int(shape["rows"]), 1)
    bd = min(max(next_pow2(width), PARAMS["BLOCK_D"][0]), PARAMS["BLOCK_D"][-1])
    bm = max(1, min(16, 1024 // bd, next_pow2(rows)))
    rpp = next_pow2(-(-rows * max(width, 1) // PARTIAL_ELEMENTS))
    rpp = min(rpp, 1 << max((rows // MIN_PROGRAMS).bit_length() - 1, 0))
    rpp = max(bm, min(PARAMS["ROWS_PER_PROGRAM"][-1], rpp))
    warps = max(1, min(16, (bm * bd) // 512))
    return {"BLOCK_D": bd, "BLOCK_M": bm, "ROWS_PER_PROGRAM": rpp, "num_warps": warps}


def _crms_keep(config, shape):
    return keep(config, shape, shape["d"] + 1)


def _crms_default(shape):
    return default(shape, shape["d"] + 1)


def shape_of(x, *rest) -> dict[str, Any]:
    """The shape dict of a norm op's call (x is the normalised input; the rest do not matter)."""
    rows = 1
    for size in x.shape[:-1]:
        rows *= int(size)
    return {"rows": rows, "d": int(x.shape[-1]), "dtype": str(x.dtype).removeprefix("torch.")}


SPACES = {
    "rms_norm": Space("rms_norm", params=PARAMS, keep=keep, default=default, shape_of=shape_of),
    "crms_norm": Space("crms_norm", params=PARAMS, keep=_crms_keep, default=_crms_default, shape_of=shape_of),
}
