"""Causal linear attention computed blockwise (Lightning Attention, Qin et al. 2024).

A token-level prefix sum of φ(k_j)ᵀ v_j would hold an [N, D, Dv] tensor. Instead the
sequence is cut into chunks of L tokens: inside a chunk the masked quadratic form
(φQ_c φK_cᵀ ⊙ tril) V_c is cheap (L×L), and everything before the chunk is summarised
by one running state S = Σ φ(k_j)ᵀ v_j of shape [D, Dv]. Memory is O(N·L + D·Dv) per
head, time O(N·L·(D + Dv) + N·D·Dv).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def chunk_causal_linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, *, chunk_size: int = 64
) -> torch.Tensor:
    """o_i = Σ_{j ≤ i} (φq_i · φk_j) v_j, without normalisation.

    phi_q: [B, H, N, D]; phi_k: [B, Hk, N, D]; v: [B, Hk, N, Dv]; Hk divides H (query head
    h reads kv head h // (H / Hk)). Inputs are already feature-mapped and masked, in the
    dtype to compute in. Returns [B, H, N, Dv]. `chunk_size` (L) trades the L×L intra-chunk
    work against the number of sequential state updates; it is clipped to N.
    """
    B, H, N, D = phi_q.shape
    Hk, Dv = phi_k.shape[1], v.shape[-1]
    G = H // Hk
    L = max(1, min(int(chunk_size), N))
    C = -(-N // L)
    pad = C * L - N
    if pad:  # zero keys add nothing to any sum; padded query rows are dropped below
        phi_q, phi_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v))

    # Query heads sharing a kv head are folded into the chunk's rows, so no k/v is copied
    # per query head:  [B, H, C·L, D] -> [B, Hk, C, G·L, D]
    q = phi_q.reshape(B, Hk, G, C, L, D).transpose(2, 3).reshape(B, Hk, C, G * L, D)
    k = phi_k.reshape(B, Hk, C, L, D)
    vc = v.reshape(B, Hk, C, L, Dv)

    # intra-chunk, all chunks at once: [B, Hk, C, G·L, L], lower-triangular per head
    scores = q @ k.transpose(-1, -2)
    scores.view(B, Hk, C, G, L, L).tril_()
    o = scores @ vc  # [B, Hk, C, G·L, Dv]

    # inter-chunk: chunk c reads the state of chunks < c, then adds its own
    state = k[:, :, 0].transpose(-1, -2) @ vc[:, :, 0]  # [B, Hk, D, Dv]
    for c in range(1, C):
        o[:, :, c] += q[:, :, c] @ state
        if c + 1 < C:
            state = state + k[:, :, c].transpose(-1, -2) @ vc[:, :, c]

    o = o.view(B, Hk, C, G, L, Dv).transpose(2, 3).reshape(B, H, C * L, Dv)
    return o[:, :, :N] if pad else o
