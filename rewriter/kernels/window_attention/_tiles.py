"""Shared machinery of the window-attention references (private).

Every op here is "softmax attention where each query sees a small, structured set of keys".
The ops differ only in *which* keys; so each op describes itself as `Tiles` (which queries
go together, which keys they gather, a small dense mask of who sees whom) and one engine,
`run_tiles`, gathers, attends and scatters back. Memory is O(N · keys per tile), never N².
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_attention_inputs

# Upper bound on the elements of one score block [B, H, tiles, M, K]; tiles are processed
# in chunks under it so peak memory stays a few tens of MB whatever N is.
MAX_SCORES = 1 << 24


@dataclass(frozen=True)
class Tiles:
    """Gather plan for one op call (all long/bool tensors on the inputs' device).

    q_idx:   [T, M]    token index of each query slot (padding slots hold any valid index)
    k_idx:   [T, K]    token index of each key slot (likewise)
    visible: [T, M, K] True where that query may attend to that key (padding is False)
    out_idx: [Nq]      for each output token, its slot in the flattened [T * M] layout
    """

    q_idx: torch.Tensor
    k_idx: torch.Tensor
    visible: torch.Tensor
    out_idx: torch.Tensor


def pair(x, name: str, op: str) -> tuple[int, int]:
    """An int or a pair of ints as a pair; ValueError otherwise."""
    if isinstance(x, int) and not isinstance(x, bool):
        return (x, x)
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(e, int) and not isinstance(e, bool) for e in x):
        return (int(x[0]), int(x[1]))
    raise ValueError(f"{op}: {name} must be an int or a pair of ints (rows, cols); got {x!r}.")


def positive(x, name: str, op: str) -> None:
    if not isinstance(x, int) or isinstance(x, bool) or x < 1:
        raise ValueError(f"{op}: {name} must be a positive int; got {x!r}.")


def check_inputs(q, k, v, key_mask, scale, op: str) -> None:
    """Shapes/dtypes of q [B, H, N, D], k [B, Hk, N, D], v [B, Hk, N, Dv], key_mask [B, N]."""
    check_attention_inputs(q, k, v, key_mask, scale, op, self_attention=True)


def prepare(q, k, v, scale):
    """Compute-dtype copies: q pre-multiplied by the scale, k/v repeated to H heads.

    fp16/bf16 are computed in fp32, fp32/fp64 as they are. Returns q [B, H, N, D],
    k [B, H, N, D], v [B, H, N, Dv].
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return q.to(acc) * scale, k.to(acc), v.to(acc)


# Additive score for a hidden key. Finite, unlike -inf: a row with every key hidden then
# softmaxes to uniform weights instead of NaN (forward and backward) and is zeroed after.
NEG = -1e30


def attend(q, k, v, visible):
    """Masked softmax attention; one dense score block per leading index.

    q: [..., M, D] (already scaled); k: [..., K, D]; v: [..., K, Dv];
    visible: bool, broadcastable to [..., M, K], or None (all visible).
    Returns [..., M, Dv]; a query that sees no key gets zeros (not NaN).
    """
    s = q @ k.transpose(-1, -2)  # [..., M, K]
    if visible is None:
        return torch.softmax(s, dim=-1) @ v
    out = torch.softmax(s.masked_fill(~visible, NEG), dim=-1) @ v
    return out.masked_fill(~visible.any(-1, keepdim=True), 0.0)


def run_tiles(q, k, v, tiles: Tiles, key_mask, max_scores: int = MAX_SCORES):
    """Attention over the plan `tiles`; q, k, v as returned by `prepare`.

    key_mask: bool [B, N] or None. Returns [B, H, Nq, Dv] ordered as `tiles.out_idx`.
    max_scores: elements of one score block (a tuning knob: fewer, larger batched matmuls
    against a working set that stays in cache).
    Relies on every plan giving each real query at least one visible key, so only
    `key_mask` can empty a row (those rows return zeros).
    """
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    T, M = tiles.q_idx.shape
    K = tiles.k_idx.shape[1]
    # [B*H, N, D] views: index_select on dim 1 of a 3-D tensor copies whole rows quickly
    q3, k3, v3 = q.reshape(B * H, N, D), k.reshape(B * H, N, D), v.reshape(B * H, N, Dv)
    chunk = max(1, int(max_scores) // max(1, B * H * M * K))
    zero, neg = q.new_zeros(()), q.new_full((), NEG)
    outs = []
    for t0 in range(0, T, chunk):
        qi, ki, vis = tiles.q_idx[t0:t0 + chunk], tiles.k_idx[t0:t0 + chunk], tiles.visible[t0:t0 + chunk]
        tc = qi.shape[0]
        qt = q3.index_select(1, qi.reshape(-1)).view(B * H * tc, M, D)
        kt = k3.index_select(1, ki.reshape(-1)).view(B * H * tc, K, D)
        vt = v3.index_select(1, ki.reshape(-1)).view(B * H * tc, K, Dv)
        if key_mask is not None:
            vis = vis & key_mask[:, ki].unsqueeze(2)  # [B, Tc, M, K]
        # an additive bias is much cheaper than masked_fill on the big score block
        bias = torch.where(vis, zero, neg)  # [Tc, M, K] or [B, Tc, M, K]
        s = torch.bmm(qt, kt.transpose(1, 2)).view(B, H, tc, M, K)
        s = s.add_(bias.unsqueeze(-4))
        out = torch.bmm(torch.softmax(s, dim=-1).view(-1, M, K), vt).view(B, H, tc, M, Dv)
        if key_mask is not None:
            out = out.masked_fill(~vis.any(-1).unsqueeze(-1).unsqueeze(1), 0.0)
        outs.append(out)
    out = torch.cat(outs, dim=2).view(B * H, T * M, Dv)
    return out.index_select(1, tiles.out_idx).view(B, H, -1, Dv)


def dense_rows(q_rows, k, v, key_mask):
    """Full attention of a few query rows over all keys: q_rows [B, H, P, D] -> [B, H, P, Dv]."""
    vis = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, N]
    return attend(q_rows, k, v, vis)


def inverse(q_pos, q_valid, n_out: int):
    """out_idx for `Tiles`: slot of each output position 0..n_out-1 in the flattened q_pos.

    q_pos, q_valid: [T, M]; the valid slots must cover each position exactly once.
    """
    slots = torch.arange(q_pos.numel(), device=q_pos.device)[q_valid.reshape(-1)]
    out_idx = torch.empty(n_out, dtype=torch.long, device=q_pos.device)
    out_idx[q_pos.reshape(-1)[q_valid.reshape(-1)]] = slots
    return out_idx
