"""Reference RMSNorm: the specification of `rewriter::rms_norm` and its CPU path."""
from __future__ import annotations

import torch


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    weight_offset: float = 0.0,
) -> torch.Tensor:
    """y = x / sqrt(mean(x², -1) + eps) * (weight + weight_offset) + bias.

    x: [..., D]; weight, bias: [D] or None. Accumulates in fp32, returns x.dtype.
    `weight_offset=1.0` is the `(1 + w)` scaling of Gemma-style norms.
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (weight.float() + weight_offset) if weight_offset else y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
