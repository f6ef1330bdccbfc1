"""Search space of the linear-attention kernels (`triton.py` beside this file), as data.

No Triton import here: the tuner and the runtime read this without a GPU.

One config dict drives every launch of one call (forward and backward alike):

- `BLOCK_N`: tokens per tile of the non-causal kernels (keys per step of the state
  kernel, query/key rows per program of the output and backward kernels).
- `BLOCK_DV`: value columns per program of the state kernel and of the causal kernel.
  Kernels that need whole output rows (the output and backward kernels, and the causal
  kernel with normalize="output_norm", whose RMS is over all of Dv) hold all of Dv.
- `SPLIT`: programs that share one (batch, kv head)'s key loop in the state kernel, each
  summing every SPLIT-th key block into its own partial state (added up afterwards, in a
  fixed order). Long sequences with few heads need it to fill the GPU.
- `CHUNK`: tokens per chunk of the causal kernel (Lightning Attention's block length L).
- `num_warps`, `num_stages`: the usual Triton launch options.

The head dim D is always one block (the feature maps reduce over it), so it is not a knob.
Knobs a path does not read are pinned to their first choice (`BLOCK_N`, `SPLIT` when
causal; `CHUNK` when not), so the grid holds no duplicates.

`shape` is `{"b", "h", "hk", "n", "d", "dv", "causal", "dtype"}`: batch, query heads, k/v
heads, tokens (the key count when Nq != Nk), the q/k head dim, the v head dim, whether the
attention is causal and the dtype's name.
"""
from __future__ import annotations

from typing import Any

from rewriter.autotune.space import Space, next_pow2
from rewriter.autotune.space import dot_tile as _block

__all__ = ["SPACE", "CPU_SPACE", "PARAMS", "keep", "default", "next_pow2", "shape_of"]

# fp32 elements one thread may hold before the estimate says the registers spill
MAX_PER_THREAD = 192
# programs the default state kernel aims for: a few per SM on a large GPU
TARGET_PROGRAMS = 512

PARAMS: dict[str, list] = {
    "BLOCK_N": [16, 32, 64, 128],
    "BLOCK_DV": [16, 32, 64, 128],
    "SPLIT": [1, 2, 4, 8, 16, 32, 64],
    "CHUNK": [16, 32, 64, 128],
    "num_warps": [2, 4, 8],
    "num_stages": [1, 2, 3],
}


def keep(config: dict[str, Any], shape: dict[str, Any]) -> bool:
    """Whether `config` is worth running on `shape`."""
    n, d, dv = max(int(shape["n"]), 1), int(shape["d"]), int(shape["dv"])
    bd, bdv_full = _block(d), _block(dv)
    bn, bdv, split, chunk = config["BLOCK_N"], config["BLOCK_DV"], config["SPLIT"], config["CHUNK"]
    threads = 32 * config["num_warps"]
    if bdv > bdv_full:  # a value tile wider than the values
        return False
    if shape["causal"]:
        if bn != PARAMS["BLOCK_N"][0] or split != PARAMS["SPLIT"][0]:
            return False
        if chunk > _block(n):
            return False
        # chunk scores [L, L], q/k chunk [L, D], v/o chunk [L, BDV], state [D, BDV]
        held = chunk * chunk + 2 * chunk * bd + 2 * chunk * bdv + bd * bdv
    else:
        if chunk != PARAMS["CHUNK"][0]:
            return False
        if bn > _block(n) or split > -(-n // bn):  # a tile longer than the sequence, idle splits
            return False
        # the output kernel: q tile [BN, D], output rows [BN, Dv], state [D, Dv]
        held = bn * bd + bn * bdv_full + bd * bdv_full
    return held <= threads * MAX_PER_THREAD


def default(shape: dict[str, Any]) -> dict[str, Any]:
    """A config that is kept and is reasonable for `shape` without tuning.

    Measured on an H200 (Triton 3.6, B=1, H=16, N=16384, D=Dv=64, bf16): non-causal, this
    default ran at 0.13-0.14 ms against 0.125 ms for the best of 48 configs tried; causal,
    0.93 ms (best of 16 tried) where CHUNK 64 / BLOCK_DV 64 / 4 warps took 1.4 ms.
    """
    b, hk, n = max(int(shape["b"]), 1), max(int(shape["hk"]), 1), max(int(shape["n"]), 1)
    dv = int(shape["dv"])
    bdv_full = _block(dv)
    config = {"BLOCK_N": 16, "BLOCK_DV": 16, "SPLIT": 1, "CHUNK": 16, "num_warps": 4, "num_stages": 2}
    if shape["causal"]:
        # one program per (head, value tile) walks the whole sequence: narrow value tiles
        # give more programs, long chunks fewer sequential steps
        for chunk in (128, 64, 32, 16):
            config["CHUNK"] = min(chunk, _block(n))
            for warps in PARAMS["num_warps"][1:]:  # 4 warps, or 8 where 4 would spill
                config["num_warps"] = warps
                if keep(config, shape):
                    return config
        return config
    config["BLOCK_N"] = min(64, _block(n))
    config["BLOCK_DV"] = min(64, bdv_full)
    tiles = -(-dv // config["BLOCK_DV"])
    blocks = -(-n // config["BLOCK_N"])
    want = max(1, TARGET_PROGRAMS // (b * hk * tiles))
    config["SPLIT"] = max(s for s in PARAMS["SPLIT"] if s <= min(want, blocks))
    for warps in PARAMS["num_warps"][1:]:
        config["num_warps"] = warps
        if keep(config, shape):
            return config
    return config


def shape_of(q, k, v, key_mask, feature_map, causal, normalize, power, eps) -> dict[str, Any]:
    """The shape dict of a `rewriter::linear_attention` call."""
    return {"b": int(q.shape[0]), "h": int(q.shape[1]), "hk": int(k.shape[1]), "n": int(k.shape[2]),
            "d": int(q.shape[3]), "dv": int(v.shape[3]), "causal": bool(causal),
            "dtype": str(q.dtype).removeprefix("torch.")}


SPACE = Space("linear_attention", params=PARAMS, keep=keep, default=default, shape_of=shape_of)

# The reference's own knob on the CPU: tokens per chunk of the causal form (chunk.py), which
# trades the L×L intra-chunk product against the number of sequential state updates.
# Non-causal attention has nothing to tune there (one state reduction), so its space holds
# one config.
CPU_PARAMS: dict[str, list] = {"chunk_size": [16, 32, 64, 128, 256, 512]}


def _cpu_keep(config: dict[str, Any], shape: dict[str, Any]) -> bool:
    return config["chunk_size"] == 64 or (shape["causal"] and config["chunk_size"] <= _block(shape["n"]))


CPU_SPACE = Space("linear_attention", params=CPU_PARAMS, keep=_cpu_keep, default=lambda shape: {"chunk_size": 64},
                  shape_of=shape_of)
