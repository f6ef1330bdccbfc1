"""Each Triton kernel's search space, as data.

A kernel's space lives beside it in `kernels/<op>/config.py` (no Triton import there):
`SPACE = Space(...)`. This module collects them, so the tuner and the runtime read one
table. `keep(config, shape)` rejects configs that cannot run on a shape before anything
is compiled; `default(shape)` is the config used when the cache has no tuned entry;
`shape_of(*op_args)` turns the arguments the `rewriter::` op was called with into that
`shape` dict (plain ints, bools and strings, so it can key a cache).
"""
from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Space", "space", "KERNELS", "next_pow2", "dot_tile"]


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def dot_tile(n: int) -> int:
    """The tile covering `n` in one block: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(n))


@dataclass(frozen=True)
class Space:
    kernel: str
    params: dict[str, list]  # parameter name -> its choices
    keep: Callable[[dict[str, Any], dict[str, Any]], bool]  # (config, shape) -> runnable?
    default: Callable[[dict[str, Any]], dict[str, Any]]  # shape -> config
    shape_of: Callable[..., dict[str, Any]] | None = None  # the op's call arguments -> shape

    def configs(self, shape: dict[str, Any]) -> list[dict[str, Any]]:
        """Every valid config for `shape` (the grid the exhaustive baseline runs)."""
        names = list(self.params)
        out = []
        for combo in itertools.product(*(self.params[n] for n in names)):
            config = dict(zip(names, combo))
            if self.keep(config, shape):
                out.append(config)
        return out


# kernel name -> the module declaring its SPACE
KERNELS = {
    "rms_norm": "rewriter.kernels.rms_norm.config",
    "layer_norm": "rewriter.kernels.layer_norm.config",
    "crms_norm": "rewriter.kernels.rms_norm.config",
    "linear_attention": "rewriter.kernels.linear_attention.config",
    "agent_attention": "rewriter.kernels.agent_attention.config",
    "sliding_window_attention": "rewriter.kernels.window_attention.config",
    "window_attention_2d": "rewriter.kernels.window_attention.config",
    "neighborhood_attention_2d": "rewriter.kernels.window_attention.config",
}


def space(kernel: str, device: str = "cuda") -> Space | None:
    """The search space of `kernel`'s Triton kernel (device "cuda") or of its reference's own
    knobs (device "cpu": chunk and tile sizes of the CPU path). None where that device has
    nothing to tune (e.g. the norms' references on the CPU)."""
    if kernel not in KERNELS:
        raise KeyError(f"no search space for kernel {kernel!r}; known: {sorted(KERNELS)}")
    module = importlib.import_module(KERNELS[kernel])
    prefix = "CPU_" if str(device).startswith("cpu") else ""
    spaces = getattr(module, prefix + "SPACES", None)
    if spaces is None:
        single = getattr(module, prefix + "SPACE", None)
        spaces = {single.kernel: single} if single is not None else {}
    return spaces.get(kernel)
