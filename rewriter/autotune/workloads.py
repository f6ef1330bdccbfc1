"""Standard kernel calls to tune when no model is given (`rewriter autotune` without MODEL):
typical transformer shapes for each kernel, on the device at hand. Tuning a model's own
calls (`rewriter.autotune(model, inputs)`) is better; these cover the common buckets.
"""
from __future__ import annotations

import torch

from .record import OpCall

__all__ = ["standard_calls"]


def standard_calls(device: str = "cpu", kernels: list[str] | None = None, small: bool = False) -> list[OpCall]:
    """One call per kernel (that has something to tune on `device`) at a typical size:
    ViT-S-like 2-D grids, 4K-token 1-D sequences (16K on CUDA); `small` for smoke tests."""
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    n, side, heads = (256, 12, 2) if small else ((16384, 96, 16) if cuda else (4096, 48, 6))

    def qkv(tokens):
        return [torch.randn(1, heads, tokens, 64, generator=g).to(device=device, dtype=dtype) for _ in range(3)]

    q, k, v = qkv(n)
    gq, gk, gv = qkv(side * side)
    x = torch.randn(8 * n if not small else 64, 768, generator=g).to(device=device, dtype=dtype)
    w = torch.ones(768, device=device, dtype=dtype)
    calls = [
        OpCall("rms_norm", (x, w, None, 1e-6, 0.0)),
        OpCall("layer_norm", (x, w, torch.zeros_like(w), 1e-5)),
        OpCall("linear_attention", (q, k, v, None, "elu", True, "denominator", 3.0, 1e-6)),
        OpCall("linear_attention", (q, k, v, None, "elu", False, "denominator", 3.0, 1e-6)),
        OpCall("sliding_window_attention", (q, k, v, None, min(512, n), True, 1, 4, False, 0.125)),
        OpCall("window_attention_2d", (gq, gk, gv, None, [side, side], [8, 8], [4, 4], 0, 0.125)),
        OpCall("neighborhood_attention_2d", (gq, gk, gv, None, [side, side], [7, 7], [1, 1], 0, 0.125)),
        OpCall("agent_attention", (gq, gk, gv, None, 49, 0.125, [side, side], 0)),
    ]
    from .select import choices, device_kind

    kind = device_kind(device)
    return [c for c in calls if (kernels is None or c.kernel in kernels) and choices(c.kernel, c.args, kind) > 1]
