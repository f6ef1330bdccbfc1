"""Reference LayerNorm: the specification of `rewriter::layer_norm` and its CPU path."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """y = (x - mean(x, -1)) / sqrt(var(x, -1) + eps) * weight + bias, over the last dim.

    x: [..., D]; weight, bias: [D] or None. Same numerics as `F.layer_norm`.
    """
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
