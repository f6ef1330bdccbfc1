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

    x: [..., D]; weight, bias: [D] or None. Accumulates in at least fp32 (fp64 stays
    fp64), returns x.dtype. `weight_offset=1.0` is the `(1 + w)` scaling of Gemma norms.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (weight.to(acc) + weight_offset) if weight_offset else y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def crms_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Compressed RMSNorm (Jiang et al. 2023) of a zero-mean stream stored in D−1 channels.

    x: [..., D−1], the first D−1 channels of a zero-mean vector whose last channel is
    −sum(x); weight, bias: [D] or None. Returns RMSNorm of the full vector: [..., D].
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    total = xf.sum(-1, keepdim=True)
    d = x.shape[-1] + 1
    inv = torch.rsqrt((xf.pow(2).sum(-1, keepdim=True) + total.pow(2)) / d + eps)
    y = torch.cat([xf, -total], dim=-1) * inv
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
