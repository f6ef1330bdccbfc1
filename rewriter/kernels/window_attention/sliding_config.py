"""Search space of the 1-D sliding-window attention kernel (`sliding_triton.py`), as data.

No Triton import here: the tuner and the runtime read this without a GPU.

One config dict drives both launches of one call (the band kernel, and the global-row
kernel when `global_sinks` is set):

- `BLOCK_M`: queries per program. The queries of a program are consecutive members of one
  dilation group (tokens g, g + δ, g + 2δ, …), so a block reads one contiguous run of
  group-mates as keys: the band costs (BLOCK_M + window) keys per BLOCK_M queries, which
  favours small blocks for short windows and large ones (better tensor-core use) for long.
- `BLOCK_N`: keys per step of the online-softmax loop (band keys, sink keys, and the
  global rows' keys alike).
- `num_warps`, `num_stages`: the usual Triton launch options (`num_stages` is the depth of
  the K/V software pipeline).

The head dims are one block each (`next_pow2(d)`, `next_pow2(dv)`, at least 16), so they
are not knobs.

`shape` is `{"b", "h", "hk", "n", "d", "dv", "window", "causal", "dilation", "sinks",
"global_sinks", "masked", "dtype"}`: batch, query heads, k/v heads, tokens, the q/k and v
head dims, the op's window / causal / dilation / sinks (clamped to n) / global_sinks,
whether a key mask is given, and the dtype's name. `shape_of(*op_args)` builds it.
"""
from __future__ import annotations

from typing import Any

from rewriter.autotune.space import Space, next_pow2
from rewriter.autotune.space import dot_tile as _block

__all__ = ["SPACE", "PARAMS", "keep", "default", "shape_of", "band", "next_pow2"]

# fp32 elements one thread may hold (scores [BM, BN], output accumulator [BM, BDV] and the
# query block [BM, BD]) before the estimate says the registers spill
MAX_PER_THREAD = 192
# shared memory a kept config may ask for (the query block and `num_stages` K/V buffers):
# what an A100 (164 KiB) or H100 (228 KiB) gives one program
MAX_SHARED = 160 * 1024
# ... and what the default may ask for: consumer GPUs (sm_86/sm_89) give 99 KiB
DEFAULT_SHARED = 96 * 1024

PARAMS: dict[str, list] = {
    "BLOCK_M": [16, 32, 64, 128],
    "BLOCK_N": [16, 32, 64, 128],
    "num_warps": [2, 4, 8],
    "num_stages": [1, 2, 3, 4],
}

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def band(n: int, window: int, causal: bool, dilation: int) -> tuple[int, int, int]:
    """(lmax, lo, hi): the longest dilation group and the band in group coordinates.

    Query a' of a group sees group-mate c' when -hi <= a' - c' <= lo (the reference's
    `_band_tiles`, clamped to the group so the numbers stay small).
    """
    lmax = max(1, -(-int(n) // max(int(dilation), 1)))
    if causal:
        return lmax, min(int(window), lmax) - 1, 0
    lo = min(int(window) // 2, lmax - 1)
    return lmax, lo, lo


def _shared_bytes(config: dict[str, Any], shape: dict[str, Any]) -> int:
    bm, bn, stages = config["BLOCK_M"], config["BLOCK_N"], max(1, config["num_stages"])
    bd, bdv = _block(shape["d"]), _block(shape["dv"])
    return _BYTES.get(shape["dtype"], 4) * (bm * bd + stages * bn * (bd + bdv))


def keep(config: dict[str, Any], shape: dict[str, Any]) -> bool:
    """Whether `config` is worth running on `shape`."""
    lmax, lo, hi = band(shape["n"], shape["window"], shape["causal"], shape["dilation"])
    bm, bn, warps = config["BLOCK_M"], config["BLOCK_N"], config["num_warps"]
    bd, bdv = _block(shape["d"]), _block(shape["dv"])
    if bm > _block(lmax):  # a query block longer than a dilation group
        return False
    if bn > _block(bm + lo + hi):  # a key step longer than the keys one query block reads
        return False
    if warps > max(2, bm // 16):  # warps with no rows of the query block to work on
        return False
    if bm * bn + bm * bdv + bm * bd > 32 * warps * MAX_PER_THREAD:
        return False
    return _shared_bytes(config, shape) <= MAX_SHARED


def default(shape: dict[str, Any]) -> dict[str, Any]:
    """A config that is kept and is reasonable for `shape` without tuning.

    The rule (not yet measured on a GPU): query blocks of 128 for bands of at least 1024
    keys, 64 from 128, else 32 (a block reads BLOCK_M + window keys for BLOCK_M queries, so
    short windows want short blocks); key steps of 64 (32 for head dims above 128), never
    longer than the keys a block reads; 8 warps for 128 x 128 tiles, else 4 (2 for blocks
    of 32 or fewer); 2 pipeline stages. Then the first kept config shrinking BLOCK_N, then
    BLOCK_M, under the default's shared-memory budget (99 KiB GPUs included).
    """
    lmax, lo, hi = band(shape["n"], shape["window"], shape["causal"], shape["dilation"])
    span = lo + hi + 1
    wide = max(_block(shape["d"]), _block(shape["dv"]))
    bm = 128 if span >= 1024 else 64 if span >= 128 else 32
    bm = min(bm, _block(lmax))
    bn = min(64 if wide <= 128 else 32, _block(bm + lo + hi))
    config = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4, "num_stages": 2}
    while True:
        config["num_warps"] = 8 if bm >= 128 and wide >= 128 else 4 if bm >= 64 else 2
        for bn_try in [b for b in PARAMS["BLOCK_N"] if b <= bn][::-1]:
            config["BLOCK_N"] = bn_try
            if keep(config, shape) and _shared_bytes(config, shape) <= DEFAULT_SHARED:
                return dict(config)
        if bm == PARAMS["BLOCK_M"][0]:
            break
        bm //= 2
        config["BLOCK_M"] = bm
    # unreachable for head dims up to 256 (16 x 16 tiles always fit); kept for safety
    return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1}


def shape_of(q, k, v, key_mask, window, causal, dilation, sinks, global_sinks, scale) -> dict[str, Any]:
    """The shape dict of a `rewriter::sliding_window_attention` call (its positional arguments)."""
    n = int(q.shape[2])
    return {
        "b": int(q.shape[0]), "h": int(q.shape[1]), "hk": int(k.shape[1]), "n": n,
        "d": int(q.shape[3]), "dv": int(v.shape[3]),
        "window": int(window), "causal": bool(causal), "dilation": int(dilation),
        "sinks": min(int(sinks), n), "global_sinks": bool(global_sinks) and int(sinks) > 0,
        "masked": key_mask is not None, "dtype": str(q.dtype).removeprefix("torch."),
    }


SPACE = Space("sliding_window_attention", params=PARAMS, keep=keep, default=default, shape_of=shape_of)
