"""Triton kernels for `rewriter::linear_attention` (the spec is `naive.py` beside this file).

Non-causal, two launches forward. The state kernel sums, per (batch, kv head) and value
tile, S = φ(K)ᵀV [D, Dv] and z = Σ φ(K) [D] over key blocks (padded keys weigh zero);
`SPLIT` programs may share one key loop, each keeping its own partial state, added up
afterwards. The output kernel then gives every query block of every query head
o = φ(Q)S / (φ(Q)·z + eps), or RMSNorm(φ(Q)S) over Dv; query heads sharing a kv head (GQA)
read the same S. Backward, the same state kernel summed over queries (all query heads of a
group, which are contiguous rows of q) gives dS = φ(Q)ᵀ dNum and dz = Σ dDen φ(Q); a query
kernel gives dq and dNum, dDen; a key kernel gives dk and dv.

Causal (Lightning Attention): one program per (batch, query head, value tile) walks the
chunks in order; chunk c gets (φQ_c φK_cᵀ ⊙ tril) V_c + φQ_c S_{<c}, then adds φK_cᵀV_c to S.

φ is applied inside the kernels, forward and backward (its vector-Jacobian product is
`_feature_map_bwd`): the head dim is one block, so the focused map's row max and norms are
register reductions, and φ(Q), φ(K) never go to memory. Everything is computed in fp32;
dots read fp32 operands, exact ("ieee") for fp32 inputs and TF32 for fp16/bf16 inputs
(at least as precise as the inputs, and the summed state would overflow fp16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rewriter.autotune.space import dot_tile as _block

from .._launch import dot_precision, launch_options, mask_bytes
from .config import PARAMS, SPACE
from .naive import _check
from .naive import linear_attention as _reference

__all__ = ["linear_attention", "linear_attention_backward", "linear_attention_fwd", "linear_attention_chunk_fwd"]

# the largest head dims the kernels take (S [D, Dv] lives in registers); larger ones, and
# fp64, run the reference
MAX_HEAD_DIM = 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _focused_parts(b_x, POWER):
    """The pieces of FLatten's map for a [BN, BD] fp32 tile: r = relu(x), its row max m,
    t = r / m, u = t^p, ‖r‖ and ‖u‖ (φ = u · ‖r‖ / ‖u‖)."""
    b_r = tl.maximum(b_x, 0.0)  # [BN, BD]
    b_m = tl.maximum(tl.max(b_r, axis=1), 1.1754943508222875e-38)  # [BN]
    b_t = b_r / b_m[:, None]  # [BN, BD], in [0, 1]
    b_u = tl.where(b_t > 0, tl.exp2(POWER * tl.log2(tl.where(b_t > 0, b_t, 1.0))), 0.0)  # [BN, BD]
    b_nr = tl.sqrt(tl.sum(b_r * b_r, axis=1))  # [BN]
    b_nu = tl.maximum(tl.sqrt(tl.sum(b_u * b_u, axis=1)), 1.1754943508222875e-38)  # [BN]
    return b_r, b_m, b_t, b_u, b_nr, b_nu


@triton.jit
def _feature_map(b_x, m_d, FEATURE_MAP: tl.constexpr, POWER):
    """φ(x) over the last dim of a [BN, BD] fp32 tile; columns outside `m_d` come out 0."""
    if FEATURE_MAP == "identity":
        b_phi = b_x
    elif FEATURE_MAP == "elu":
        b_phi = tl.where(b_x > 0, b_x + 1.0, tl.exp(tl.minimum(b_x, 0.0)))
    elif FEATURE_MAP == "relu":
        b_phi = tl.maximum(b_x, 0.0)
    else:
        b_r, b_m, b_t, b_u, b_nr, b_nu = _focused_parts(b_x, POWER)
        b_phi = b_u * (b_nr / b_nu)[:, None]
    return tl.where(m_d[None, :], b_phi, 0.0)  # [BN, BD]


@triton.jit
def _feature_map_bwd(b_x, b_g, FEATURE_MAP: tl.constexpr, POWER):
    """dL/dx given g = dL/dφ(x), both [BN, BD] fp32 (the feature map's vector-Jacobian product)."""
    if FEATURE_MAP == "identity":
        b_dx = b_g
    elif FEATURE_MAP == "elu":
        b_dx = tl.where(b_x > 0, b_g, b_g * tl.exp(tl.minimum(b_x, 0.0)))
    elif FEATURE_MAP == "relu":
        b_dx = tl.where(b_x > 0, b_g, 0.0)
    else:
        # φ = ‖r‖ w / ‖w‖ with w = r^p (the row max cancels). With u = w / m^p:
        # dr = r (g·u) / (‖r‖‖u‖) + ‖r‖ p (r/m)^(p-1) / (m‖u‖) · (g - u (g·u) / ‖u‖²)
        b_r, b_m, b_t, b_u, b_nr, b_nu = _focused_parts(b_x, POWER)
        b_gu = tl.sum(b_g * b_u, axis=1)  # [BN]
        b_tp = tl.where(b_t > 0, tl.exp2((POWER - 1.0) * tl.log2(tl.where(b_t > 0, b_t, 1.0))), 0.0)  # [BN, BD]
        b_dr = b_r * (b_gu / b_nu / tl.maximum(b_nr, 1.1754943508222875e-38))[:, None]  # no tiny² underflow
        b_dr += (b_nr / b_nu / b_m)[:, None] * POWER * b_tp * (b_g - b_u * (b_gu / b_nu / b_nu)[:, None])
        b_dx = tl.where(b_x > 0, b_dr, 0.0)
    return b_dx  # [BN, BD]


@triton.jit
def _linear_attention_state_kernel(
    x, y, w, mask, s, z,
    R, D, DV, HK, POWER,
    FEATURE_MAP: tl.constexpr, HAS_W: tl.constexpr, HAS_MASK: tl.constexpr, HAS_Z: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial S = Σ_j φ(x_j)ᵀ y_j and z = Σ_j w_j φ(x_j) over rows j = i_s, i_s + SPLIT, … blocks.

    x [BHK, R, D], y [BHK, R, DV], w [BHK, R] (1 when absent), mask [B, R] (row j of batch
    b = i_bh // HK counts only where set); s [SPLIT, BHK, D, DV], z [SPLIT, BHK, D] fp32.
    Grid: (cdiv(DV, BLOCK_DV), BHK, SPLIT).
    """
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_DV >= 16, "tl.dot needs blocks of at least 16")
    i_v, i_bh, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_bh // HK
    o_d = tl.arange(0, BLOCK_D)
    o_v = i_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_d, m_v = o_d < D, o_v < DV

    b_s = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)  # [BD, BDV]
    b_z = tl.zeros([BLOCK_D], dtype=tl.float32)  # [BD]
    for i_n in range(i_s, tl.cdiv(R, BLOCK_N), SPLIT):
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < R
        p_x = x + i_bh.to(tl.int64) * R * D + o_n[:, None] * D + o_d[None, :]
        b_x = tl.load(p_x, mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BN, BD]
        b_keep = m_n
        if HAS_MASK:
            b_keep = b_keep & (tl.load(mask + i_b.to(tl.int64) * R + o_n, mask=m_n, other=0) != 0)
        b_phi = tl.where(b_keep[:, None], _feature_map(b_x, m_d, FEATURE_MAP, POWER), 0.0)  # [BN, BD]
        p_y = y + i_bh.to(tl.int64) * R * DV + o_n[:, None] * DV + o_v[None, :]
        b_y = tl.load(p_y, mask=m_n[:, None] & m_v[None, :], other=0.0).to(tl.float32)  # [BN, BDV]
        b_s += tl.dot(tl.trans(b_phi), b_y, input_precision=PRECISION)
        if HAS_Z:
            if HAS_W:
                b_w = tl.load(w + i_bh.to(tl.int64) * R + o_n, mask=m_n, other=0.0).to(tl.float32)  # [BN]
                b_z += tl.sum(b_phi * b_w[:, None], axis=0)
            else:
                b_z += tl.sum(b_phi, axis=0)

    i_out = (i_s * tl.num_programs(1) + i_bh).to(tl.int64)
    p_s = s + i_out * D * DV + o_d[:, None] * DV + o_v[None, :]
    tl.store(p_s, b_s, mask=m_d[:, None] & m_v[None, :])
    if HAS_Z:
        # every value tile sums the same z: the first one writes it
        m_z = m_d & (tl.zeros([BLOCK_D], dtype=tl.int32) + i_v == 0)
        tl.store(z + i_out * D + o_d, b_z, mask=m_z)


@triton.jit
def _linear_attention_fwd_kernel(
    q, s, z, o,
    NQ, H, G, D, DV, POWER, EPS,
    FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """o = normalize(φ(q) S) for one query block of one query head.

    q [B·H, NQ, D]; s [B·HK, D, DV], z [B·HK, D] fp32; o [B·H, NQ, DV]; HK = H // G, and
    query head h reads kv head h // G. BLOCK_DV covers all of DV. Grid: (cdiv(NQ, BLOCK_N), B·H).
    """
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_DV >= 16, "tl.dot needs blocks of at least 16")
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_bk = (i_bh // H) * (H // G) + (i_bh % H) // G
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d, o_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    m_n, m_d, m_v = o_n < NQ, o_d < D, o_v < DV

    p_q = q + i_bh.to(tl.int64) * NQ * D + o_n[:, None] * D + o_d[None, :]
    b_x = tl.load(p_q, mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BN, BD]
    b_phi = _feature_map(b_x, m_d, FEATURE_MAP, POWER)  # [BN, BD]
    p_s = s + i_bk.to(tl.int64) * D * DV + o_d[:, None] * DV + o_v[None, :]
    b_s = tl.load(p_s, mask=m_d[:, None] & m_v[None, :], other=0.0)  # [BD, BDV]
    b_o = tl.dot(b_phi, b_s, input_precision=PRECISION)  # [BN, BDV]
    if NORMALIZE == "denominator":
        b_z = tl.load(z + i_bk.to(tl.int64) * D + o_d, mask=m_d, other=0.0)  # [BD]
        b_o = b_o / (tl.sum(b_phi * b_z[None, :], axis=1) + EPS)[:, None]
    else:
        b_o = b_o / tl.sqrt(tl.sum(b_o * b_o, axis=1) / DV + EPS)[:, None]
    p_o = o + i_bh.to(tl.int64) * NQ * DV + o_n[:, None] * DV + o_v[None, :]
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_n[:, None] & m_v[None, :])


@triton.jit
def _linear_attention_bwd_dq_kernel(
    q, s, z, do, dq, dnum, dden,
    NQ, H, G, D, DV, POWER, EPS,
    FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq, and the gradients dnum [B·H, NQ, DV] of num = φ(q) S and dden [B·H, NQ] of
    den = φ(q)·z + eps (fp32, for the dS/dz sums). Shapes and grid as the forward kernel.
    """
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_DV >= 16, "tl.dot needs blocks of at least 16")
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_bk = (i_bh // H) * (H // G) + (i_bh % H) // G
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d, o_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    m_n, m_d, m_v = o_n < NQ, o_d < D, o_v < DV
    m_nd, m_nv = m_n[:, None] & m_d[None, :], m_n[:, None] & m_v[None, :]

    p_q = q + i_bh.to(tl.int64) * NQ * D + o_n[:, None] * D + o_d[None, :]
    b_x = tl.load(p_q, mask=m_nd, other=0.0).to(tl.float32)  # [BN, BD]
    b_phi = _feature_map(b_x, m_d, FEATURE_MAP, POWER)  # [BN, BD]
    p_s = s + i_bk.to(tl.int64) * D * DV + o_d[:, None] * DV + o_v[None, :]
    b_s = tl.load(p_s, mask=m_d[:, None] & m_v[None, :], other=0.0)  # [BD, BDV]
    b_num = tl.dot(b_phi, b_s, input_precision=PRECISION)  # [BN, BDV]
    p_do = do + i_bh.to(tl.int64) * NQ * DV + o_n[:, None] * DV + o_v[None, :]
    b_do = tl.load(p_do, mask=m_nv, other=0.0).to(tl.float32)  # [BN, BDV]
    if NORMALIZE == "denominator":
        b_z = tl.load(z + i_bk.to(tl.int64) * D + o_d, mask=m_d, other=0.0)  # [BD]
        b_den = tl.sum(b_phi * b_z[None, :], axis=1) + EPS  # [BN]
        b_o = b_num / b_den[:, None]  # [BN, BDV]
        b_dnum = b_do / b_den[:, None]  # [BN, BDV]
        b_dden = -tl.sum(b_do * b_o, axis=1) / b_den  # [BN]
        b_dphi = tl.dot(b_dnum, tl.trans(b_s), input_precision=PRECISION) + b_dden[:, None] * b_z[None, :]
        tl.store(dden + i_bh.to(tl.int64) * NQ + o_n, b_dden, mask=m_n)
    else:
        b_rstd = 1.0 / tl.sqrt(tl.sum(b_num * b_num, axis=1) / DV + EPS)  # [BN]
        b_o = b_num * b_rstd[:, None]  # [BN, BDV]
        b_dnum = b_rstd[:, None] * (b_do - b_o * (tl.sum(b_do * b_o, axis=1) / DV)[:, None])  # [BN, BDV]
        b_dphi = tl.dot(b_dnum, tl.trans(b_s), input_precision=PRECISION)  # [BN, BD]
    p_dnum = dnum + i_bh.to(tl.int64) * NQ * DV + o_n[:, None] * DV + o_v[None, :]
    tl.store(p_dnum, b_dnum, mask=m_nv)
    b_dq = _feature_map_bwd(b_x, b_dphi, FEATURE_MAP, POWER)  # [BN, BD]
    p_dq = dq + i_bh.to(tl.int64) * NQ * D + o_n[:, None] * D + o_d[None, :]
    tl.store(p_dq, b_dq.to(p_dq.dtype.element_ty), mask=m_nd)


@triton.jit
def _linear_attention_bwd_dkv_kernel(
    k, v, mask, ds, dz, dk, dv,
    NK, HK, D, DV, POWER,
    FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """dv = φ(k) dS and dk = φ'ᵀ(dS vᵀ + dz) for one key block of one kv head.

    k [B·HK, NK, D], v [B·HK, NK, DV], mask [B, NK]; ds [B·HK, D, DV], dz [B·HK, D] fp32.
    BLOCK_DV covers all of DV. Grid: (cdiv(NK, BLOCK_N), B·HK).
    """
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_DV >= 16, "tl.dot needs blocks of at least 16")
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d, o_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    m_n, m_d, m_v = o_n < NK, o_d < D, o_v < DV
    m_nd, m_nv = m_n[:, None] & m_d[None, :], m_n[:, None] & m_v[None, :]

    b_keep = m_n
    if HAS_MASK:
        b_keep = b_keep & (tl.load(mask + (i_bh // HK).to(tl.int64) * NK + o_n, mask=m_n, other=0) != 0)
    p_k = k + i_bh.to(tl.int64) * NK * D + o_n[:, None] * D + o_d[None, :]
    b_x = tl.load(p_k, mask=m_nd, other=0.0).to(tl.float32)  # [BN, BD]
    b_phi = tl.where(b_keep[:, None], _feature_map(b_x, m_d, FEATURE_MAP, POWER), 0.0)  # [BN, BD]
    p_v = v + i_bh.to(tl.int64) * NK * DV + o_n[:, None] * DV + o_v[None, :]
    b_v = tl.load(p_v, mask=m_nv, other=0.0).to(tl.float32)  # [BN, BDV]
    p_ds = ds + i_bh.to(tl.int64) * D * DV + o_d[:, None] * DV + o_v[None, :]
    b_ds = tl.load(p_ds, mask=m_d[:, None] & m_v[None, :], other=0.0)  # [BD, BDV]

    b_dv = tl.dot(b_phi, b_ds, input_precision=PRECISION)  # [BN, BDV]
    b_dphi = tl.dot(b_v, tl.trans(b_ds), input_precision=PRECISION)  # [BN, BD]
    if NORMALIZE == "denominator":
        b_dz = tl.load(dz + i_bh.to(tl.int64) * D + o_d, mask=m_d, other=0.0)  # [BD]
        b_dphi += b_dz[None, :]
    b_dphi = tl.where(b_keep[:, None], b_dphi, 0.0)
    b_dk = _feature_map_bwd(b_x, b_dphi, FEATURE_MAP, POWER)  # [BN, BD]
    p_dk = dk + i_bh.to(tl.int64) * NK * D + o_n[:, None] * D + o_d[None, :]
    tl.store(p_dk, b_dk.to(p_dk.dtype.element_ty), mask=m_nd)
    p_dv = dv + i_bh.to(tl.int64) * NK * DV + o_n[:, None] * DV + o_v[None, :]
    tl.store(p_dv, b_dv.to(p_dv.dtype.element_ty), mask=m_nv)


@triton.jit
def _linear_attention_chunk_fwd_kernel(
    q, k, v, mask, o,
    N, H, G, D, DV, POWER, EPS,
    FEATURE_MAP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """Causal o_i = normalize(Σ_{j≤i} (φq_i·φk_j) v_j) for one query head and value tile,
    chunk by chunk with a running state S = Σ φ(k_j)ᵀ v_j [D, BDV] (and z = Σ φ(k_j)).

    q [B·H, N, D], k [B·HK, N, D], v [B·HK, N, DV], mask [B, N], o [B·H, N, DV]; HK = H // G.
    NORMALIZE="output_norm" needs BLOCK_DV to cover all of DV. Grid: (cdiv(DV, BLOCK_DV), B·H).
    """
    tl.static_assert(CHUNK >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_DV >= 16, "tl.dot needs blocks of at least 16")
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = i_bh // H
    i_bk = i_b * (H // G) + (i_bh % H) // G
    o_c = tl.arange(0, CHUNK)
    o_d = tl.arange(0, BLOCK_D)
    o_v = i_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_d, m_v = o_d < D, o_v < DV
    m_causal = o_c[:, None] >= o_c[None, :]  # [L, L]

    b_s = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)  # [BD, BDV]
    b_z = tl.zeros([BLOCK_D], dtype=tl.float32)  # [BD]
    for i_c in range(0, tl.cdiv(N, CHUNK)):
        o_n = i_c * CHUNK + o_c
        m_n = o_n < N
        m_nd, m_nv = m_n[:, None] & m_d[None, :], m_n[:, None] & m_v[None, :]
        p_q = q + i_bh.to(tl.int64) * N * D + o_n[:, None] * D + o_d[None, :]
        b_q = _feature_map(tl.load(p_q, mask=m_nd, other=0.0).to(tl.float32), m_d, FEATURE_MAP, POWER)  # [L, BD]
        b_keep = m_n
        if HAS_MASK:
            b_keep = b_keep & (tl.load(mask + i_b.to(tl.int64) * N + o_n, mask=m_n, other=0) != 0)
        p_k = k + i_bk.to(tl.int64) * N * D + o_n[:, None] * D + o_d[None, :]
        b_k = _feature_map(tl.load(p_k, mask=m_nd, other=0.0).to(tl.float32), m_d, FEATURE_MAP, POWER)
        b_k = tl.where(b_keep[:, None], b_k, 0.0)  # [L, BD]
        p_v = v + i_bk.to(tl.int64) * N * DV + o_n[:, None] * DV + o_v[None, :]
        b_v = tl.load(p_v, mask=m_nv, other=0.0).to(tl.float32)  # [L, BDV]

        b_a = tl.where(m_causal, tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION), 0.0)  # [L, L]
        b_o = tl.dot(b_a, b_v, input_precision=PRECISION) + tl.dot(b_q, b_s, input_precision=PRECISION)  # [L, BDV]
        if NORMALIZE == "denominator":
            b_den = tl.sum(b_a, axis=1) + tl.sum(b_q * b_z[None, :], axis=1) + EPS  # [L]
            b_o = b_o / b_den[:, None]
            b_z += tl.sum(b_k, axis=0)
        else:
            b_o = b_o / tl.sqrt(tl.sum(b_o * b_o, axis=1) / DV + EPS)[:, None]
        p_o = o + i_bh.to(tl.int64) * N * DV + o_n[:, None] * DV + o_v[None, :]
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_nv)
        b_s += tl.dot(tl.trans(b_k), b_v, input_precision=PRECISION)


# ---------------------------------------------------------------------------- launchers




def _resolve(config: dict | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> dict:
    """`config`, or the space's default for this shape when None; checked for what the kernels need."""
    if config is None:
        shape = {"b": q.shape[0], "h": q.shape[1], "hk": k.shape[1], "n": k.shape[2], "d": q.shape[3],
                 "dv": v.shape[3], "causal": bool(causal), "dtype": str(q.dtype).removeprefix("torch.")}
        return SPACE.default(shape)
    missing = [name for name in PARAMS if name not in config]
    if missing:
        raise ValueError(f"linear_attention: config {config} lacks {missing}; give every one of {list(PARAMS)} "
                         "(rewriter.autotune.space.space('linear_attention').default(shape) makes one).")
    for name in ("BLOCK_N", "BLOCK_DV", "CHUNK"):
        value = config[name]
        if not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"linear_attention: config[{name!r}] must be a power of two >= 16 (tl.dot's "
                             f"smallest tile); got {value!r}.")
    if not isinstance(config["SPLIT"], int) or config["SPLIT"] < 1:
        raise ValueError(f"linear_attention: config['SPLIT'] must be a positive int; got {config['SPLIT']!r}.")
    return config






def _state(x, y, w, key_mask, heads: int, feature_map: str, power: float, has_z: bool, config: dict,
           precision: str):
    """S = Σ φ(x)ᵀ y [BHK, D, DV] and z = Σ w φ(x) [BHK, D] (fp32; z None unless has_z).

    x [BHK, R, D], y [BHK, R, DV], w [BHK, R] or None, key_mask bool [BHK // heads, R] or None
    (`heads` rows of x per batch: row i_bh belongs to batch i_bh // heads).
    """
    BHK, R, D = x.shape
    DV = y.shape[-1]
    BLOCK_N, BLOCK_DV = config["BLOCK_N"], min(config["BLOCK_DV"], _block(DV))
    split = max(1, min(config["SPLIT"], triton.cdiv(R, BLOCK_N)))
    s = torch.empty(split, BHK, D, DV, device=x.device, dtype=torch.float32)
    z = torch.empty(split, BHK, D, device=x.device, dtype=torch.float32) if has_z else s
    grid = (triton.cdiv(DV, BLOCK_DV), BHK, split)
    _linear_attention_state_kernel[grid](
        x, y, x if w is None else w, mask_bytes(key_mask, x), s, z,
        R, D, DV, heads, power,
        FEATURE_MAP=feature_map, HAS_W=w is not None, HAS_MASK=key_mask is not None, HAS_Z=has_z,
        SPLIT=split, BLOCK_N=BLOCK_N, BLOCK_D=_block(D), BLOCK_DV=BLOCK_DV, PRECISION=precision,
        **launch_options(config),
    )
    # the partial states are added in a fixed order: the result does not depend on scheduling
    s = s.sum(0) if split > 1 else s[0]
    z = (z.sum(0) if split > 1 else z[0]) if has_z else None
    return s, z


def linear_attention_fwd(q, k, v, key_mask, feature_map, normalize, power, eps, config: dict | None = None):
    """Non-causal forward: (o [B, H, Nq, Dv], S [B·Hk, D, Dv] fp32, z [B·Hk, D] fp32 or None).

    q [B, H, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv], key_mask bool [B, Nk] or None.
    S and z are what the backward needs; z is None for normalize="output_norm".
    """
    config = _resolve(config, q, k, v, causal=False)
    B, H, NQ, D = q.shape
    HK, NK, DV = k.shape[1], k.shape[2], v.shape[3]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    precision = dot_precision(q.dtype)
    denominator = normalize == "denominator"
    s, z = _state(k.view(B * HK, NK, D), v.view(B * HK, NK, DV), None, key_mask, HK, feature_map, power,
                  denominator, config, precision)
    o = torch.empty(B, H, NQ, DV, device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(NQ, config["BLOCK_N"]), B * H)
    _linear_attention_fwd_kernel[grid](
        q, s, s if z is None else z, o,
        NQ, H, H // HK, D, DV, power, eps,
        FEATURE_MAP=feature_map, NORMALIZE=normalize,
        BLOCK_N=config["BLOCK_N"], BLOCK_D=_block(D), BLOCK_DV=_block(DV), PRECISION=precision,
        **launch_options(config),
    )
    return o, s, z


def _bwd(do, q, k, v, key_mask, s, z, feature_map, normalize, power, eps, config: dict):
    """(dq, dk, dv) from the forward's state S, z (see `linear_attention_fwd`)."""
    B, H, NQ, D = q.shape
    HK, NK, DV = k.shape[1], k.shape[2], v.shape[3]
    G = H // HK
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    precision = dot_precision(q.dtype)
    denominator = normalize == "denominator"
    BLOCK_N, BLOCK_D, BLOCK_DV = config["BLOCK_N"], _block(D), _block(DV)

    dq = torch.empty_like(q)
    dnum = torch.empty(B, H, NQ, DV, device=q.device, dtype=torch.float32)
    dden = torch.empty(B, H, NQ, device=q.device, dtype=torch.float32) if denominator else dnum
    _linear_attention_bwd_dq_kernel[(triton.cdiv(NQ, BLOCK_N), B * H)](
        q, s, s if z is None else z, do, dq, dnum, dden,
        NQ, H, G, D, DV, power, eps,
        FEATURE_MAP=feature_map, NORMALIZE=normalize,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, PRECISION=precision,
        **launch_options(config),
    )
    # dS = Σ φ(q)ᵀ dnum over every query row of the G heads sharing a kv head: those heads
    # are adjacent in q, so each group is one run of G·Nq rows
    ds, dz = _state(q.view(B * HK, G * NQ, D), dnum.view(B * HK, G * NQ, DV),
                    dden.view(B * HK, G * NQ) if denominator else None, None, HK, feature_map, power,
                    denominator, config, precision)

    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _linear_attention_bwd_dkv_kernel[(triton.cdiv(NK, BLOCK_N), B * HK)](
        k, v, mask_bytes(key_mask, k), ds, ds if dz is None else dz, dk, dv,
        NK, HK, D, DV, power,
        FEATURE_MAP=feature_map, NORMALIZE=normalize, HAS_MASK=key_mask is not None,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, PRECISION=precision,
        **launch_options(config),
    )
    return dq, dk, dv


def linear_attention_chunk_fwd(q, k, v, key_mask, feature_map, normalize, power, eps, config: dict | None = None):
    """Causal forward, chunked (Lightning Attention): o [B, H, N, Dv].

    q [B, H, N, D], k [B, Hk, N, D], v [B, Hk, N, Dv], key_mask bool [B, N] or None.
    """
    config = _resolve(config, q, k, v, causal=True)
    B, H, N, D = q.shape
    HK, DV = k.shape[1], v.shape[3]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # the RMS of output_norm is over whole rows: one tile holds all of Dv then
    BLOCK_DV = min(config["BLOCK_DV"], _block(DV)) if normalize == "denominator" else _block(DV)
    o = torch.empty(B, H, N, DV, device=q.device, dtype=q.dtype)
    _linear_attention_chunk_fwd_kernel[(triton.cdiv(DV, BLOCK_DV), B * H)](
        q, k, v, mask_bytes(key_mask, q), o,
        N, H, H // HK, D, DV, power, eps,
        FEATURE_MAP=feature_map, NORMALIZE=normalize, HAS_MASK=key_mask is not None,
        CHUNK=config["CHUNK"], BLOCK_D=_block(D), BLOCK_DV=BLOCK_DV, PRECISION=dot_precision(q.dtype),
        **launch_options(config),
    )
    return o


# ---------------------------------------------------------------------------- autograd


class LinearAttentionFunction(torch.autograd.Function):
    """Non-causal linear attention with the Triton backward; keeps S and z for it."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, feature_map, normalize, power, eps, config):
        config = _resolve(config, q, k, v, causal=False)
        o, s, z = linear_attention_fwd(q, k, v, key_mask, feature_map, normalize, power, eps, config)
        ctx.save_for_backward(q, k, v, key_mask, s, z)
        ctx.options = (feature_map, normalize, power, eps, config)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, key_mask, s, z = ctx.saved_tensors
        dq, dk, dv = _bwd(do, q, k, v, key_mask, s, z, *ctx.options)
        return dq, dk, dv, None, None, None, None, None, None


class _CausalFunction(torch.autograd.Function):
    """The causal forward; its backward is not written yet and says so."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, feature_map, normalize, power, eps, config):
        return linear_attention_chunk_fwd(q, k, v, key_mask, feature_map, normalize, power, eps, config)

    @staticmethod
    def backward(ctx, do):
        raise NotImplementedError(_NO_CAUSAL_BACKWARD)


_NO_CAUSAL_BACKWARD = (
    "linear_attention: the Triton kernels have no causal backward yet. Differentiate the reference "
    "(rewriter.kernels.linear_attention.naive.linear_attention, or the rewriter::linear_attention op, whose "
    "autograd runs through it), or use causal=False."
)


# ---------------------------------------------------------------------------- public


def _runs_here(q, k, v) -> bool:
    """Whether the kernels take these tensors (else the reference runs)."""
    return (q.dtype in _DTYPES and q.shape[3] <= MAX_HEAD_DIM and v.shape[3] <= MAX_HEAD_DIM
            and min(q.numel(), k.numel(), v.numel()) > 0)


def _reference_call(q, k, v, key_mask, feature_map, causal, normalize, power, eps):
    return _reference(q, k, v, feature_map=feature_map, causal=causal, normalize=normalize, power=power, eps=eps,
                      key_mask=key_mask)


def linear_attention(q, k, v, key_mask, feature_map, causal, normalize, power, eps, *, config=None):
    """`rewriter::linear_attention` with Triton kernels; the same result as `naive.linear_attention`.

    q: [B, H, Nq, D]; k: [B, Hk, Nk, D]; v: [B, Hk, Nk, Dv]; Hk divides H (query head h reads
    kv head h // (H / Hk)); key_mask: bool [B, Nk] or None (False = padding, zero weight).
    feature_map: "elu" | "relu" | "focused" (power p) | "identity" (q, k are features already);
    causal needs Nq == Nk; normalize: "denominator" (o = φ(q)S / (φ(q)·z + eps)) or "output_norm"
    (RMSNorm over Dv, eps inside the sqrt). Returns [B, H, Nq, Dv] in q.dtype, computed in fp32.

    config: a dict over `config.PARAMS` (None: the search space's default for the shape).
    fp16/bf16/fp32 with D, Dv <= 128 run the kernels; anything else (fp64, wider heads,
    empty tensors) runs the reference. Non-causal calls are differentiable (Triton
    backward); a causal call's backward raises NotImplementedError.
    """
    _check(q, k, v, feature_map, causal, normalize, power, eps, key_mask, 64)
    if not _runs_here(q, k, v):
        return _reference_call(q, k, v, key_mask, feature_map, causal, normalize, power, eps)
    power, eps = float(power), float(eps)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if causal:
        if grad:
            return _CausalFunction.apply(q, k, v, key_mask, feature_map, normalize, power, eps, config)
        return linear_attention_chunk_fwd(q, k, v, key_mask, feature_map, normalize, power, eps, config)
    if grad:
        return LinearAttentionFunction.apply(q, k, v, key_mask, feature_map, normalize, power, eps, config)
    return linear_attention_fwd(q, k, v, key_mask, feature_map, normalize, power, eps, config)[0]


def linear_attention_backward(grad_out, q, k, v, key_mask, feature_map, causal, normalize, power, eps, *,
                              config=None):
    """(dq, dk, dv) of `linear_attention` for upstream gradient grad_out [B, H, Nq, Dv].

    Shapes as `linear_attention`; dq [B, H, Nq, D], dk [B, Hk, Nk, D], dv [B, Hk, Nk, Dv] in
    the inputs' dtype. Recomputes the state S, z (one state-kernel launch). Non-causal only.
    """
    if causal:
        raise NotImplementedError(_NO_CAUSAL_BACKWARD)
    _check(q, k, v, feature_map, causal, normalize, power, eps, key_mask, 64)
    if tuple(grad_out.shape) != (*q.shape[:3], v.shape[3]):
        raise ValueError(f"linear_attention_backward: grad_out must be [B, H, Nq, Dv] = "
                         f"{[*q.shape[:3], v.shape[3]]}; got {list(grad_out.shape)}.")
    if not _runs_here(q, k, v):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = _reference_call(*leaves, key_mask, feature_map, causal, normalize, power, eps)
            return torch.autograd.grad(out, leaves, grad_out)
    power, eps = float(power), float(eps)
    config = _resolve(config, q, k, v, causal=False)
    B, HK, NK, D = k.shape
    s, z = _state(k.contiguous().view(B * HK, NK, D), v.contiguous().view(B * HK, NK, v.shape[3]), None,
                  key_mask, HK, feature_map, power, normalize == "denominator", config, dot_precision(q.dtype))
    return _bwd(grad_out, q, k, v, key_mask, s, z, feature_map, normalize, power, eps, config)
