"""Search spaces of the 2-D grid attention kernels (`grid_triton.py` beside this file), as data.

No Triton import here: the tuner and the runtime read this without a GPU.

Both ops run one fused kernel over the grid queries (online softmax over key tiles) and a
small second launch for the `prefix` query rows (CLS/registers, which see every token).
One config dict drives both launches of one call.

`window_attention_2d` (Swin): a program takes `BLOCK_M` query slots of one window (the
window's wh·ww slots, row-major; a window of more than `BLOCK_M` slots is split over
several programs) and walks the same window's slots as keys, `BLOCK_N` at a time, after
the key tiles of the prefix tokens (min(prefix, BLOCK_N) at a time, rounded up to 16).

- `BLOCK_M`: query slots per program (a power of two, >= 16: tl.dot's smallest tile).
- `BLOCK_N`: key slots per online-softmax step (likewise).

`neighborhood_attention_2d` (NAT/DiNAT): a program takes a `BLOCK_QH` x `BLOCK_QW` patch of
queries of one dilation group (so `BLOCK_QH` rows and `BLOCK_QW` columns of the group's own
sub-grid, `dilation` apart on the real grid) and walks the rectangle of keys that the
union of their neighbourhoods spans (at most (BLOCK_QH + k - 1) x (BLOCK_QW + k - 1)),
flattened row-major, `BLOCK_N` keys at a time; each query keeps only its own k x k keys.

- `BLOCK_QH`, `BLOCK_QW`: the query patch (powers of two, BLOCK_QH·BLOCK_QW in [16, 256]).
  Larger patches reuse each loaded key across more queries but load more keys that a
  given query does not see: with k = 13, an 8x8 patch computes 400 scores per query row
  for 169 visible ones, a 16x16 patch 784.
- `BLOCK_N`: keys per online-softmax step.

Both:

- `SPLIT`: programs sharing one (batch, head)'s key loop in the prefix-row launch (its
  programs take 16 prefix query rows each, which see all N tokens; partial results are
  merged by log-sum-exp afterwards). Pinned to 1 when there is no prefix.
- `num_warps`, `num_stages`: the usual Triton launch options (both launches).

`keep` rejects tiles larger than the window / the patch's key rectangle / the group, more
than one warp per 8 query rows (unless fewer would not fit), register and shared-memory
estimates over budget, and idle or pointless SPLITs.

The head dims are one block each (D for q·k, Dv for the accumulator), so they are not
knobs. `shape` (from `shape_of`, the op's own arguments) holds `b, h, hk, n, d, dv, dtype,
masked, prefix, grid_h, grid_w` and, per op, `window_h, window_w, shifted` or
`kernel_h, kernel_w, dilation_h, dilation_w`.
"""
from __future__ import annotations

from typing import Any

from rewriter.autotune.space import Space, next_pow2
from rewriter.autotune.space import dot_tile as block

__all__ = ["SPACES", "WINDOW_PARAMS", "NEIGHBORHOOD_PARAMS", "next_pow2", "block", "window_shape_of",
           "neighborhood_shape_of"]

# fp32-equivalent elements one thread may hold (q, k, v tiles, scores, accumulator) before
# the estimate says registers spill. Calibrated with ptxas for sm_90 (Triton 3.9): bf16
# estimates of 56-112 compiled to <= 255 registers with at most ~170 bytes of spills, 192
# spilled ~880 bytes. fp32 runs exact CUDA-core dots whose operands sit in registers: 56
# and 72 compiled without spills, 80-112 spilled 300-700 bytes.
MAX_PER_THREAD = 128
MAX_PER_THREAD_FP32 = 72
# shared memory a config may plan for: the k and v tiles of every pipeline stage plus the
# q tile (under the 163 KiB of an A100; an H100 has 227 KiB)
MAX_SHARED_BYTES = 160 * 1024
# prefix-row programs the default aims for: a couple per SM on a large GPU
TARGET_PREFIX_PROGRAMS = 256

WINDOW_PARAMS: dict[str, list] = {
    "BLOCK_M": [16, 32, 64, 128],
    "BLOCK_N": [16, 32, 64, 128],
    "SPLIT": [1, 4, 16, 64],
    "num_warps": [2, 4, 8],
    "num_stages": [1, 2, 3],
}

NEIGHBORHOOD_PARAMS: dict[str, list] = {
    "BLOCK_QH": [1, 2, 4, 8, 16],
    "BLOCK_QW": [4, 8, 16, 32, 64],
    "BLOCK_N": [16, 32, 64, 128],
    "SPLIT": [1, 4, 16, 64],
    "num_warps": [2, 4, 8],
    "num_stages": [1, 2, 3],
}


def _pair(x) -> tuple[int, int]:
    if isinstance(x, int):
        return int(x), int(x)
    a, b = x
    return int(a), int(b)


def _common_shape(q, k, v, key_mask, grid, prefix) -> dict[str, Any]:
    hg, wg = _pair(grid)
    return {"b": int(q.shape[0]), "h": int(q.shape[1]), "hk": int(k.shape[1]), "n": int(q.shape[2]),
            "d": int(q.shape[3]), "dv": int(v.shape[3]), "dtype": str(q.dtype).removeprefix("torch."),
            "masked": key_mask is not None, "prefix": int(prefix), "grid_h": hg, "grid_w": wg}


def window_shape_of(q, k, v, key_mask, grid, window, shift, prefix, scale) -> dict[str, Any]:
    """`shape` for a `window_attention_2d` call (the op's positional arguments)."""
    wh, ww = _pair(window)
    return {**_common_shape(q, k, v, key_mask, grid, prefix), "window_h": wh, "window_w": ww,
            "shifted": any(s != 0 for s in _pair(shift))}


def neighborhood_shape_of(q, k, v, key_mask, grid, kernel_size, dilation, prefix, scale) -> dict[str, Any]:
    """`shape` for a `neighborhood_attention_2d` call (the op's positional arguments)."""
    kh, kw = _pair(kernel_size)
    dh, dw = _pair(dilation)
    return {**_common_shape(q, k, v, key_mask, grid, prefix), "kernel_h": kh, "kernel_w": kw, "dilation_h": dh,
            "dilation_w": dw}


def _itemsize(shape: dict[str, Any]) -> int:
    return 2 if shape["dtype"] in ("float16", "bfloat16") else 4


def _fits(config: dict[str, Any], bm: int, bn: int, shape: dict[str, Any]) -> bool:
    """Whether a program with a [BM, D] query tile and [BN, D] / [BN, Dv] key tiles fits.

    Registers: q, k, v (half-size for fp16/bf16), scores [BM, BN] and the accumulator
    [BM, Dv] within MAX_PER_THREAD (fp32: MAX_PER_THREAD_FP32) fp32 values a thread. Shared
    memory: the k and v tiles of every stage plus the q tile within MAX_SHARED_BYTES.
    """
    bd, bdv, size = block(shape["d"]), block(shape["dv"]), _itemsize(shape)
    held = (bm * bd + bn * bd + bn * bdv) * size // 4 + bm * bn + bm * bdv
    shared = (bn * (bd + bdv) * config["num_stages"] + bm * bd) * size
    budget = MAX_PER_THREAD if size == 2 else MAX_PER_THREAD_FP32
    return held <= 32 * config["num_warps"] * budget and shared <= MAX_SHARED_BYTES


def _fits_all(config: dict[str, Any], bm: int, shape: dict[str, Any], params: dict[str, list]) -> bool:
    """Whether the grid kernel (query tile of `bm` rows; its prefix key tiles are no wider
    than BLOCK_N) and the prefix-row launch (16 query rows) fit, with at most one warp per 8
    query rows (2 always allowed) unless half the warps would not fit; SPLIT pinned without
    a prefix, and never more SPLIT programs than key blocks."""
    bn, split, warps = config["BLOCK_N"], config["SPLIT"], config["num_warps"]
    if not _fits(config, bm, bn, shape):
        return False
    if warps > max(2, bm // 8) and _fits({**config, "num_warps": warps // 2}, bm, bn, shape):
        return False
    if not shape["prefix"]:
        return split == params["SPLIT"][0]
    return split == 1 or split <= -(-max(shape["n"], 1) // bn)


# ----------------------------------------------------------------------------- Swin


def window_keep(config: dict[str, Any], shape: dict[str, Any]) -> bool:
    """Whether `config` is worth running on `shape` for `window_attention_2d`."""
    slots = block(shape["window_h"] * shape["window_w"])
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    if bm > slots or bn > slots:  # a tile larger than the window
        return False
    return _fits_all(config, bm, shape, WINDOW_PARAMS)


def _default_split(shape: dict[str, Any], bn: int) -> int:
    if not shape["prefix"]:
        return 1
    want = max(1, TARGET_PREFIX_PROGRAMS // max(1, shape["b"] * shape["h"]))
    blocks = -(-max(shape["n"], 1) // bn)
    return max(s for s in WINDOW_PARAMS["SPLIT"] if s <= min(want, blocks) or s == 1)


def _first_kept(candidates, keep, shape, params):
    """The first kept candidate; else the first kept config of the whole grid (odd shapes);
    else the last candidate (the smallest tiles)."""
    for config in candidates:
        if keep(config, shape):
            return config
    kept = Space("", params=params, keep=keep, default=dict).configs(shape)
    return kept[0] if kept else candidates[-1]


def window_default(shape: dict[str, Any]) -> dict[str, Any]:
    """A kept, reasonable config for `shape` without tuning.

    Query and key tiles of 64 slots (the window rounded up to a power of two when smaller:
    a 7x7 window is one 64-slot tile, one key step), 4 warps, 2 stages; where the register
    or shared-memory estimate refuses that (wide heads), more warps first, then one stage,
    then smaller tiles. SPLIT gives the prefix launch about TARGET_PREFIX_PROGRAMS programs.
    Not yet measured on a GPU (ptxas for sm_90 compiles the bf16 D=64 default to 255
    registers with ~160 bytes of spills).
    """
    slots = block(shape["window_h"] * shape["window_w"])
    bm = bn = min(64, slots)
    split = _default_split(shape, bn)
    candidates = [{"BLOCK_M": m, "BLOCK_N": n, "SPLIT": split, "num_warps": w, "num_stages": stages}
                  for m, n in ((bm, bn), (bm, min(bn, 32)), (min(bm, 32), min(bn, 32)), (16, 16))
                  for stages in (2, 1) for w in (4, 8, 2)]
    return _first_kept(candidates, window_keep, shape, WINDOW_PARAMS)


# ----------------------------------------------------------------------------- neighbourhood


def _group_lengths(shape: dict[str, Any]) -> tuple[int, int]:
    """The longest dilation group per axis (rows, cols)."""
    return (-(-shape["grid_h"] // shape["dilation_h"]), -(-shape["grid_w"] // shape["dilation_w"]))


def neighborhood_keep(config: dict[str, Any], shape: dict[str, Any]) -> bool:
    """Whether `config` is worth running on `shape` for `neighborhood_attention_2d`."""
    qh, qw, bn = config["BLOCK_QH"], config["BLOCK_QW"], config["BLOCK_N"]
    bm = qh * qw
    if not 16 <= bm <= 256:
        return False
    lgy, lgx = _group_lengths(shape)
    # no patch longer than needed on an axis, unless halving it would leave under 16 queries
    if bm >= 32 and ((qh > 1 and qh // 2 >= lgy) or (qw > NEIGHBORHOOD_PARAMS["BLOCK_QW"][0] and qw // 2 >= lgx)):
        return False
    keys = min(qh + shape["kernel_h"] - 1, lgy) * min(qw + shape["kernel_w"] - 1, lgx)
    if bn > block(keys):  # a key tile larger than the patch's whole key rectangle
        return False
    return _fits_all(config, bm, shape, NEIGHBORHOOD_PARAMS)


def neighborhood_default(shape: dict[str, Any]) -> dict[str, Any]:
    """A kept, reasonable config for `shape` without tuning.

    An 8x8 query patch (narrowed to the dilation group's width and made taller on narrow
    grids, keeping 64 queries where the grid has them), 64 keys per step, 4 warps, 2
    stages; where the estimates refuse that, more warps, one stage, then narrower key tiles
    and smaller patches. SPLIT as for Swin. Not yet measured on a GPU.
    """
    lgy, lgx = _group_lengths(shape)
    qw = max(NEIGHBORHOOD_PARAMS["BLOCK_QW"][0], min(8, next_pow2(lgx)))
    qh = min(max(1, 64 // qw), next_pow2(lgy))
    qh = max(qh, 16 // qw)  # at least 16 queries
    split = _default_split(shape, 64)
    candidates = []
    for h, w in ((qh, qw), (max(1, qh // 2), qw), (max(1, 16 // qw), qw), (1, 16), (4, 4)):
        for n in (64, 32, 16):
            for stages in (2, 1):
                for warps in (4, 8, 2):
                    candidates.append({"BLOCK_QH": h, "BLOCK_QW": w, "BLOCK_N": n, "SPLIT": split,
                                       "num_warps": warps, "num_stages": stages})
    return _first_kept(candidates, neighborhood_keep, shape, NEIGHBORHOOD_PARAMS)


SPACES = {
    "window_attention_2d": Space("window_attention_2d", params=WINDOW_PARAMS, keep=window_keep,
                                 default=window_default, shape_of=window_shape_of),
    "neighborhood_attention_2d": Space("neighborhood_attention_2d", params=NEIGHBORHOOD_PARAMS,
                                       keep=neighborhood_keep, default=neighborhood_default,
                                       shape_of=neighborhood_shape_of),
}
