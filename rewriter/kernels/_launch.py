"""Small pieces every Triton launcher needs, in one place (no Triton import here)."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["dot_precision", "launch_options", "mask_bytes", "unit_last", "on_device"]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: exact ("ieee") for fp32 inputs; fp16/bf16 products are exact
    in fp32 whatever this says."""
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_options(config: dict) -> dict:
    """The launch keywords of a tile config."""
    return {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}


def mask_bytes(key_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The key mask as uint8 [B, N] (a dummy pointer when absent; HAS_MASK then skips it)."""
    return like if key_mask is None else key_mask.contiguous().view(torch.uint8)


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dim is contiguous (the kernels read other dims by stride), else a copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def on_device(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
