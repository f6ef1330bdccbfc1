"""Argument checks shared by the attention references: one wording for one mistake."""
from __future__ import annotations

import torch

__all__ = ["check_attention_inputs"]


def check_attention_inputs(q, k, v, key_mask, scale, op: str, self_attention: bool = False) -> None:
    """q [B, H, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv], key_mask bool [B, Nk] or None;
    Hk divides H; `self_attention` also requires Nq == Nk."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: {name} must be a 4-D tensor [B, H, N, D]; got {got}.")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point; got {t.dtype}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{op}: q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}. Cast them first.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k, v must be on one device; got {q.device}, {k.device}, {v.device}.")
    B, H, Nq, D = q.shape
    N = k.shape[2]
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{op}: batch sizes differ: q {B}, k {k.shape[0]}, v {v.shape[0]}.")
    if v.shape[2] != N:
        raise ValueError(f"{op}: k and v need the same number of tokens; got k {N}, v {v.shape[2]}.")
    if self_attention and Nq != N:
        raise ValueError(
            f"{op}: this op is self-attention over one sequence, so q, k, v need the same N; "
            f"got q {Nq}, k {N}, v {v.shape[2]}."
        )
    if k.shape[3] != D:
        raise ValueError(f"{op}: q and k need the same head dim D; got q {D}, k {k.shape[3]}.")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{op}: k and v need the same number of heads; got k {k.shape[1]}, v {v.shape[1]}.")
    if k.shape[1] < 1 or H % k.shape[1] != 0:
        raise ValueError(
            f"{op}: k/v have {k.shape[1]} heads, which must divide q's {H} heads "
            "(grouped-query attention repeats each k/v head H // Hk times)."
        )
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, N):
            got = f"{key_mask.dtype} {tuple(key_mask.shape)}" if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__
            raise ValueError(
                f"{op}: key_mask must be a bool tensor [B, N] = [{B}, {N}] (True = real key); got {got}. "
                "Convert an additive/float mask with `mask == 0` or `mask > 0` first."
            )
        if key_mask.device != q.device:
            raise ValueError(f"{op}: key_mask is on {key_mask.device} but q on {q.device}.")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"{op}: scale must be a float or None (None means D**-0.5); got {type(scale).__name__}.")
