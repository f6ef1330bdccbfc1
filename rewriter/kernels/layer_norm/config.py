"""Search space of the LayerNorm kernels (`triton.py` beside this file), as data.

The LayerNorm kernels have the RMSNorm kernels' structure (row tiles of `BLOCK_M` x
`BLOCK_D`, column blocks for wide rows, `ROWS_PER_PROGRAM` rows per program), so they share
its parameters, constraints and default; see `kernels/rms_norm/config.py`. No Triton import.
`shape` is `{"rows": R, "d": D, "dtype": "bfloat16"}` with `d = x.shape[-1]`.
"""
from __future__ import annotations

from rewriter.autotune.space import Space
from rewriter.kernels.rms_norm.config import PARAMS, default, keep, shape_of

__all__ = ["SPACE"]

SPACE = Space("layer_norm", params=PARAMS, keep=keep, default=default, shape_of=shape_of)
