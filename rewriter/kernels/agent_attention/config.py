"""Search space of the agent-attention kernels (`triton.py` beside this file), as data.

No Triton import here: the tuner and the runtime read this without a GPU.

One call runs a pooling kernel (agents A [n, D] per query head, averaged from the
queries), stage 1 (every agent attends over all keys: agent_v = softmax(A Kᵀ·scale) V,
the key axis split over programs, flash-decoding style), a combine kernel (merges the
splits' partial max / sum / accumulator in a fixed order; skipped when SPLIT is 1) and
stage 2 (every query attends over all agents, held in one tile). One config dict drives
them all:

- `BLOCK_N`: keys per step of stage 1's key loop; also tokens per step of the pooling
  kernel's loop over an agent's window.
- `BLOCK_A`: agent rows per stage-1 (and combine) program. The rows are the agents of all
  G = H / Hk query heads sharing one kv head (G·n rows), so a K/V tile loaded once serves
  up to BLOCK_A agents; more row tiles re-read K and V, fewer hold more accumulators.
- `SPLIT`: programs that share one row tile's key loop in stage 1, each taking every
  SPLIT-th key block and keeping its own partial max, sum and [BLOCK_A, Dv] accumulator.
  Few agents and few heads give few row tiles: SPLIT fills the GPU on long sequences.
- `BLOCK_M`: query rows per stage-2 program (all n agents are one tile beside them).
- `num_warps`, `num_stages`: the usual Triton launch options, for every launch.

The head dims D, Dv and the agent count n are each one block (a power of two >= 16), so
they are not knobs. Block sizes larger than the dimension they tile are clamped by the
launcher and rejected by `keep`, so the grid holds no duplicates.

`shape` (from `shape_of`) is `{"b", "h", "hk", "nq", "nk", "d", "dv", "agents", "masked",
"dtype"}`: batch, query heads, k/v heads, queries, keys, the q/k head dim, the v head dim,
the number of agents n the pooling yields, whether a key mask is given and the dtype's name.
"""
from __future__ import annotations

import math
from typing import Any

from rewriter.autotune.space import Space, next_pow2
from rewriter.autotune.space import dot_tile as _block

__all__ = ["SPACE", "PARAMS", "keep", "default", "shape_of", "num_agents_of", "next_pow2"]

# fp32 elements one thread may hold before the estimate says the registers spill
MAX_PER_THREAD = 192
# stage-1 programs the default aims for: a few per SM on a large GPU
TARGET_PROGRAMS = 512

PARAMS: dict[str, list] = {
    "BLOCK_N": [16, 32, 64, 128],
    "BLOCK_A": [16, 32, 64, 128],
    "SPLIT": [1, 2, 4, 8, 16, 32, 64],
    "BLOCK_M": [16, 32, 64, 128],
    "num_warps": [2, 4, 8],
    "num_stages": [1, 2, 3],
}


def num_agents_of(nq: int, num_agents: int, grid, prefix: int) -> int:
    """How many agents the reference's pooling yields (`naive.agent_tokens`)."""
    if grid:
        a = max(1, round(math.sqrt(num_agents)))
        return min(a, int(grid[0])) * min(a, int(grid[1]))
    return min(int(num_agents), int(nq) - int(prefix))


def shape_of(q, k, v, key_mask, num_agents, scale, grid, prefix) -> dict[str, Any]:
    """The `shape` dict of a `rewriter::agent_attention` call (its arguments, in op order)."""
    return {
        "b": int(q.shape[0]), "h": int(q.shape[1]), "hk": int(k.shape[1]),
        "nq": int(q.shape[2]), "nk": int(k.shape[2]), "d": int(q.shape[3]), "dv": int(v.shape[3]),
        "agents": int(num_agents_of(q.shape[2], num_agents, grid, prefix)),
        "masked": key_mask is not None, "dtype": str(q.dtype).removeprefix("torch."),
    }


def _held(config: dict[str, Any], shape: dict[str, Any]) -> int:
    """fp32 elements the largest kernel's tiles hold (stage 1 or stage 2)."""
    bd, bdv, bag = _block(shape["d"]), _block(shape["dv"]), _block(shape["agents"])
    ba, bn, bm = config["BLOCK_A"], config["BLOCK_N"], config["BLOCK_M"]
    # stage 1: agents [BA, D], keys [BN, D], values [BN, Dv], scores [BA, BN], accumulator [BA, Dv]
    gather = ba * bd + bn * bd + bn * bdv + ba * bn + ba * bdv
    # stage 2: queries [BM, D], agents [n, D], agent values [n, Dv], scores [BM, n], output [BM, Dv]
    read = bm * bd + bag * bd + bag * bdv + bm * bag + bm * bdv
    return max(gather, read)


def keep(config: dict[str, Any], shape: dict[str, Any]) -> bool:
    """Whether `config` is worth running on `shape`."""
    nq, nk = max(int(shape["nq"]), 1), max(int(shape["nk"]), 1)
    rows = max(int(shape["h"]) // max(int(shape["hk"]), 1), 1) * max(int(shape["agents"]), 1)
    bn, ba, bm, split = config["BLOCK_N"], config["BLOCK_A"], config["BLOCK_M"], config["SPLIT"]
    if bn > _block(nk) or ba > _block(rows) or bm > _block(nq):  # tiles longer than what they tile
        return False
    if split > -(-nk // bn):  # splits with no key block to take
        return False
    return _held(config, shape) <= 32 * config["num_warps"] * MAX_PER_THREAD


def default(shape: dict[str, Any]) -> dict[str, Any]:
    """A config that is kept and is reasonable for `shape` without tuning.

    Not yet measured on a GPU: set by analogy with the linear-attention kernels' measured
    default (64-wide key and query tiles, SPLIT aiming at ~512 stage-1 programs, 4 warps,
    or 8 where 4 would spill). Tune it (`rewriter autotune`) for real numbers.
    """
    b, hk = max(int(shape["b"]), 1), max(int(shape["hk"]), 1)
    nq, nk = max(int(shape["nq"]), 1), max(int(shape["nk"]), 1)
    rows = max(int(shape["h"]) // hk, 1) * max(int(shape["agents"]), 1)
    config = {
        "BLOCK_N": min(64, _block(nk)),
        "BLOCK_A": min(64, _block(rows)),
        "SPLIT": 1,
        "BLOCK_M": min(64, _block(nq)),
        "num_warps": 4,
        "num_stages": 2,
    }
    tiles = -(-rows // config["BLOCK_A"])
    blocks = -(-nk // config["BLOCK_N"])
    want = max(1, TARGET_PROGRAMS // (b * hk * tiles))
    config["SPLIT"] = max(s for s in PARAMS["SPLIT"] if s <= min(want, blocks))
    for warps in PARAMS["num_warps"][1:]:
        config["num_warps"] = warps
        if keep(config, shape):
            return config
    # very wide heads or many agents: shrink the tiles until 8 warps hold them
    for name in ("BLOCK_M", "BLOCK_A", "BLOCK_N"):
        while config[name] > 16 and not keep(config, shape):
            config[name] //= 2  # (a shorter key block only adds blocks: SPLIT stays valid)
    return config


SPACE = Space("agent_attention", params=PARAMS, keep=keep, default=default, shape_of=shape_of)
