"""Reference linear attention: the specification of `rewriter::linear_attention` and its CPU path.

Softmax attention costs O(N²). Replacing exp(q·k) by a feature-map product φ(q)·φ(k)
lets the sum over keys be taken once, S = Σ_j φ(k_j)ᵀ v_j ([D, Dv]), so time and
memory are linear in N. Causal attention is computed blockwise in `chunk.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_attention_inputs
from .chunk import chunk_causal_linear_attention

__all__ = ["linear_attention", "apply_feature_map", "FEATURE_MAPS", "NORMALIZATIONS"]

FEATURE_MAPS = ("elu", "relu", "focused", "identity")
NORMALIZATIONS = ("denominator", "output_norm")


def apply_feature_map(x: torch.Tensor, kind: str, power: float = 3.0) -> torch.Tensor:
    """φ(x) over the last (head) dim; x: [..., D] -> [..., D], non-negative.

    "elu": elu(x) + 1 (Katharopoulos et al. 2020). "relu": relu(x). "focused": FLatten's
    map ‖relu(x)‖ · relu(x)^p / ‖relu(x)^p‖, which sharpens the direction while keeping
    the norm; relu(x) is divided by its row max first (the map is scale-invariant there)
    so x^p cannot underflow, and an all-zero row maps to zero. "identity": x unchanged, for
    inputs that already are features (a learned map computed in the graph before the op,
    e.g. the Hedgehog map of `rewriter.calibrate`); they must be non-negative for the
    denominator to stay positive.
    """
    if kind == "identity":
        return x
    if kind == "elu":
        return F.elu(x) + 1.0
    if kind == "relu":
        return F.relu(x)
    if kind == "focused":
        r = F.relu(x)
        tiny = torch.finfo(r.dtype).tiny
        u = (r / r.amax(-1, keepdim=True).clamp_min(tiny)).pow(power)
        return u * (r.norm(dim=-1, keepdim=True) / u.norm(dim=-1, keepdim=True).clamp_min(tiny))
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {kind!r}")


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu",
    causal: bool = False,
    normalize: str = "denominator",
    power: float = 3.0,
    eps: float = 1e-6,
    key_mask: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Kernelised attention with φ = `feature_map`, linear in sequence length.

    q: [B, H, Nq, D]; k: [B, Hk, Nk, D]; v: [B, Hk, Nk, Dv]; Hk divides H (kv head j serves
    query heads j·H/Hk … (j+1)·H/Hk - 1, as SDPA's enable_gqa). key_mask: bool [B, Nk] or
    None, False marks padding that gets zero weight. Returns [B, H, Nq, Dv] in q.dtype;
    fp16/bf16 are computed in fp32, fp64 in fp64.

    With S = Σ_j φ(k_j)ᵀ v_j ([D, Dv]) and z = Σ_j φ(k_j) ([D]), over all keys or over
    j ≤ i when `causal` (needs Nq == Nk):
      normalize="denominator":  o_i = φ(q_i) S / (φ(q_i) · z + eps)
      normalize="output_norm":  o_i = RMSNorm(φ(q_i) S) over Dv, no gain, eps inside the
                                sqrt (TransNormer, Qin et al. 2022).
    `power` is the focusing power p of feature_map="focused". `chunk_size` is the block
    length of the causal algorithm (a tuning knob; it does not change the result).
    """
    _check(q, k, v, feature_map, causal, normalize, power, eps, key_mask, chunk_size)
    B, H, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)

    phi_q = apply_feature_map(q.to(acc), feature_map, power)
    phi_k = apply_feature_map(k.to(acc), feature_map, power)
    if key_mask is not None:
        phi_k = phi_k * key_mask.reshape(B, 1, Nk, 1).to(acc)
    vf = v.to(acc)
    if normalize == "denominator":  # a ones column makes the last output column φ(q)·z
        vf = F.pad(vf, (0, 1), value=1.0)

    if causal:
        o = chunk_causal_linear_attention(phi_q, phi_k, vf, chunk_size=chunk_size)
    else:
        state = phi_k.transpose(-1, -2) @ vf  # [B, Hk, D, Dv(+1)]
        o = (phi_q.reshape(B, Hk, (H // Hk) * Nq, D) @ state).view(B, H, Nq, vf.shape[-1])

    if normalize == "denominator":
        o = o[..., :-1] / (o[..., -1:] + eps)
    else:
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps)
    return o.to(q.dtype)


def _check(q, k, v, feature_map, causal, normalize, power, eps, key_mask, chunk_size) -> None:
    check_attention_inputs(q, k, v, key_mask, None, "linear_attention")
    Nq, Nk = q.shape[2], k.shape[2]
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if causal and Nq != Nk:
        raise ValueError(f"causal linear attention needs as many queries as keys, got Nq={Nq}, Nk={Nk}; "
                         "pass causal=False for cross-attention")
    if not power > 0:
        raise ValueError(f"power must be > 0 (1 makes 'focused' equal 'relu'), got {power}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
