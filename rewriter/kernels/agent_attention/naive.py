"""Reference Agent Attention: the specification of `rewriter::agent_attention` and its CPU path.

Agent Attention (Han et al., ECCV 2024) routes softmax attention through n ≪ N agent
tokens A pooled from the queries: the agents first gather from the keys, then every
query reads from the agents,
    out = softmax(Q Aᵀ · scale) · (softmax(A Kᵀ · scale) V),
so the largest intermediate is [N, n], not [N, N]. The paper's trained extras (agent
bias, depthwise conv on V) are left out, so the op drops into a pretrained model
without training. It is non-causal only: agents pooled from every query see the
future, so there is no `causal` parameter and a causal site must not be rewritten.
"""
from __future__ import annotations

import math

import torch

from .._checks import check_attention_inputs
import torch.nn.functional as F

__all__ = ["agent_attention", "agent_tokens"]


def agent_tokens(
    q: torch.Tensor, num_agents: int, grid: tuple[int, int] | None = None, prefix: int = 0
) -> torch.Tensor:
    """Pool agent tokens from the queries; q: [B, H, N, D] -> [B, H, n, D].

    The first `prefix` tokens (CLS, registers, …) are never pooled. With grid=(Hg, Wg)
    the remaining N - prefix = Hg·Wg tokens are a row-major image, average-pooled
    adaptively to (a, a), a = round(sqrt(num_agents)), each side clipped to the grid
    (n = a_h·a_w). Without a grid they are pooled adaptively along the sequence to
    n = min(num_agents, N - prefix).
    """
    B, H, N, D = q.shape
    x = q[:, :, prefix:].reshape(B * H, N - prefix, D).transpose(1, 2)  # [B·H, D, tokens]
    if grid is not None:
        hg, wg = grid
        a = max(1, round(math.sqrt(num_agents)))
        pooled = F.adaptive_avg_pool2d(x.reshape(B * H, D, hg, wg), (min(a, hg), min(a, wg)))
    else:
        pooled = F.adaptive_avg_pool1d(x, min(num_agents, N - prefix))
    return pooled.reshape(B, H, D, -1).transpose(-1, -2)


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_agents: int = 49,
    scale: float | None = None,
    grid: tuple[int, int] | None = None,
    prefix: int = 0,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention through n agent tokens pooled from q; non-causal, linear in N.

    q: [B, H, Nq, D]; k: [B, Hk, Nk, D]; v: [B, Hk, Nk, Dv]; Hk divides H (kv head j serves
    query heads j·H/Hk … (j+1)·H/Hk - 1, as SDPA's enable_gqa). key_mask: bool [B, Nk] or
    None; False keys are left out of the agents' softmax over keys (a batch with no real
    key gets zero output). Returns [B, H, Nq, Dv] in q.dtype; fp16/bf16 are computed in
    fp32, fp64 in fp64.

    Agents A [B, H, n, D] come from `agent_tokens(q, num_agents, grid, prefix)`: with
    grid=(Hg, Wg), Nq must be prefix + Hg·Wg and the grid is pooled to about num_agents
    (a×a, a = round(sqrt(num_agents))); otherwise the tokens after `prefix` are pooled
    to min(num_agents, Nq - prefix). scale defaults to D**-0.5. There is no causal mode.
    """
    _check(q, k, v, num_agents, scale, grid, prefix, key_mask)
    B, H, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hk
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = D**-0.5 if scale is None else float(scale)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)

    agents = agent_tokens(qf, num_agents, grid, prefix)  # [B, H, n, D]
    n = agents.shape[2]

    # agents gather from the keys; the G query heads of one kv head share its k, v
    gather = (agents.reshape(B, Hk, G * n, D) @ kf.transpose(-1, -2)) * scale  # [B, Hk, G·n, Nk]
    if key_mask is not None:  # finite fill: exp underflows to exactly 0, and no NaN anywhere
        gather = gather.masked_fill(~key_mask.reshape(B, 1, 1, Nk), torch.finfo(acc).min)
    weights = gather.softmax(-1)
    if key_mask is not None:  # a batch with no real key would spread evenly over padding
        weights = weights.masked_fill(~key_mask.any(-1).reshape(B, 1, 1, 1), 0.0)
    agent_v = (weights @ vf).reshape(B, H, n, Dv)

    # queries read from the agents
    read = ((qf @ agents.transpose(-1, -2)) * scale).softmax(-1)  # [B, H, Nq, n]
    return (read @ agent_v).to(q.dtype)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(q, k, v, num_agents, scale, grid, prefix, key_mask) -> None:
    check_attention_inputs(q, k, v, key_mask, None, "agent_attention")
    Nq = q.shape[2]
    if not _is_int(num_agents) or num_agents < 1:
        raise ValueError(f"num_agents must be a positive int, got {num_agents!r}")
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
        raise ValueError(f"scale must be a positive number or None (for head_dim**-0.5), got {scale!r}")
    if not _is_int(prefix) or not 0 <= prefix < Nq:
        raise ValueError(f"prefix must be an int in [0, Nq) = [0, {Nq}) so at least one query is pooled, "
                         f"got {prefix!r}")
    if grid is not None:
        if (not isinstance(grid, (tuple, list)) or len(grid) != 2
                or not all(_is_int(g) and g > 0 for g in grid)):
            raise ValueError(f"grid must be (height, width) with positive ints, got {grid!r}")
        if prefix + grid[0] * grid[1] != Nq:
            raise ValueError(f"grid {tuple(grid)} with prefix {prefix} covers {prefix + grid[0] * grid[1]} "
                             f"tokens but q has {Nq}; pass the patch grid and the number of leading "
                             "non-grid tokens (e.g. prefix=1 for a CLS token)")
