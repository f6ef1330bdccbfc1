"""Triton kernels for `rewriter::window_attention_2d` and `rewriter::neighborhood_attention_2d`
(the specs are `naive.py` beside this file). Forward only: autograd differentiates the
reference.

Both ops are fused attention over a token grid (N = prefix + Hg·Wg, the grid row-major in
the last tokens): a program owns a tile of grid queries of one (batch, head), keeps a
running max, sum and [BM, Dv] accumulator (online softmax, base 2, scale folded into the
scores) and walks key tiles whose token indices and visibility it computes from grid
coordinates; no attention matrix, rolled copy or gather plan ever reaches memory.

- Swin (`_window_attention_2d_fwd_kernel`): a tile is `BLOCK_M` slots of one window of the
  rolled grid; keys are the same window's slots. Rolled coordinate r maps to the token at
  (r + shift) % L (the cyclic shift), slots past the grid's bottom/right edge are padding,
  and two slots see each other iff they share the shifted-window region on both axes
  (region = [r >= L - w] + [r >= L - s], 0 without a shift).
- Neighbourhood (`_neighborhood_attention_2d_fwd_kernel`): a tile is a BLOCK_QH x BLOCK_QW
  patch of one dilation group; NATTEN's window start s(a) = min(max(a - k//2, 0), Lg - k) is
  monotone in a, so the patch's keys form one rectangle of the group, from s(first) to
  s(last) + k per axis, walked flattened in `BLOCK_N` steps; each query keeps the keys in
  [s(a), s(a) + k) on both axes.

Every grid query also sees the `prefix` tokens: extra key tiles before the loop (one tile
of min(prefix, BLOCK_N) keys rounded up to 16 for CLS or a few registers). The prefix
queries see every token: `_prefix_rows_fwd_kernel`, a separate small launch with programs
of 16 prefix rows and, per (batch, head), `SPLIT` slices of the keys, whose partial
results are merged by log-sum-exp in torch ([SPLIT, B·H, prefix, Dv] floats, nothing
N-sized).

Heads: query head h reads kv head h // (H / Hk). Inputs are read through their strides (a
[B, N, H, D] tensor transposed to [B, H, N, D] is not copied); the last dim must be
contiguous. fp16/bf16: q·k accumulates in fp32 (exact products), the probabilities are
rounded to the input dtype for the p·v dot (FlashAttention's choice), softmax statistics
and the accumulator stay fp32. fp32: both dots in exact ("ieee") fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import dot_precision, launch_options, mask_bytes, unit_last
from ._tiles import check_inputs, pair
from .grid_config import SPACES, block
from .naive import _check_grid
from .naive import neighborhood_attention_2d as _neighborhood_reference
from .naive import window_attention_2d as _window_reference

__all__ = ["window_attention_2d", "neighborhood_attention_2d", "MAX_HEAD_DIM"]

# the widest head dims (D and Dv) the kernels take: q [BM, D] and the [BM, Dv] accumulator
# live in registers; wider heads, fp64 and empty tensors run the reference
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
# prefix query rows per program of the prefix-row launch (tl.dot's smallest tile: CLS and a
# few registers fit one)
PREFIX_ROWS = 16


# ---------------------------------------------------------------------------- shared pieces


@triton.jit
def _attend(b_q, b_k, b_v, m_vis, b_m, b_l, b_acc, SCALE_LOG2E, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over a key tile.

    b_q [BM, BD], b_k [BN, BD], b_v [BN, BDV] (input dtype); m_vis bool, broadcastable to
    [BM, BN]; running max b_m [BM] (base-2 units, starts finite so a row with no visible
    key yet stays NaN-free), sum b_l [BM] and accumulator b_acc [BM, BDV], all fp32.
    UPCAST: feed the dots fp32 copies (Triton's interpreter misreads bf16 dot operands);
    the probabilities are still rounded to the input dtype first, as compiled.
    """
    v_dtype = b_v.dtype
    if UPCAST:
        b_q, b_k, b_v = b_q.to(tl.float32), b_k.to(tl.float32), b_v.to(tl.float32)
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * SCALE_LOG2E  # [BM, BN]
    b_s = tl.where(m_vis, b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))  # [BM]
    b_p = tl.exp2(b_s - b_m_new[:, None])  # [BM, BN]; hidden keys give exactly 0
    b_alpha = tl.exp2(b_m - b_m_new)  # [BM]
    b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
    b_p = b_p.to(v_dtype).to(b_v.dtype)  # [BM, BN]; rounded as the p·v dot reads it
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p, b_v, input_precision=PRECISION)  # [BM, BDV]
    return b_m_new, b_l, b_acc


@triton.jit
def _attend_prefix(b_q, k_base, v_base, s_kn, s_vn, mask, i_b, N, PREFIX, D, DV, b_m, b_l, b_acc, SCALE_LOG2E,
                   BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_MASK: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The key tiles of the prefix tokens 0..PREFIX-1 (BLOCK_P at a time), visible to every
    grid query."""
    o_d, o_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    for i_p in range(0, PREFIX, BLOCK_P):
        o_p = i_p + tl.arange(0, BLOCK_P)
        m_p = o_p < PREFIX
        if HAS_MASK:
            m_p = m_p & (tl.load(mask + i_b.to(tl.int64) * N + o_p, mask=m_p, other=0) != 0)  # [BP]
        p_k = k_base + o_p[:, None] * s_kn + o_d[None, :]
        b_k = tl.load(p_k, mask=m_p[:, None] & (o_d < D)[None, :], other=0.0)  # [BP, BD]
        p_v = v_base + o_p[:, None] * s_vn + o_v[None, :]
        b_v = tl.load(p_v, mask=m_p[:, None] & (o_v < DV)[None, :], other=0.0)  # [BP, BDV]
        b_m, b_l, b_acc = _attend(b_q, b_k, b_v, m_p[None, :], b_m, b_l, b_acc, SCALE_LOG2E, PRECISION, UPCAST)
    return b_m, b_l, b_acc


# ---------------------------------------------------------------------------- Swin


@triton.jit
def _swin_slots(o_s, i_wy, i_wx, HG, WG, WH, WW, SH, SW, RY1, RY2, RX1, RX2, PREFIX):
    """Slots `o_s` of window (i_wy, i_wx) of the rolled grid: (token index, region code, real).

    Rolled (r_y, r_x) holds the token at ((r_y + SH) % HG, (r_x + SW) % WG); slots past the
    grid (the bottom/right padding) or past the window are not real. The region code is
    3·[r_y >= RY1] + 3·[r_y >= RY2] + [r_x >= RX1] + [r_x >= RX2] (thresholds from the host;
    all regions 0 without a shift).
    """
    r_y = i_wy * WH + o_s // WW  # [BS] rolled row
    r_x = i_wx * WW + o_s % WW  # [BS] rolled column
    m_s = (o_s < WH * WW) & (r_y < HG) & (r_x < WG)
    g_y = (r_y >= RY1).to(tl.int32) + (r_y >= RY2).to(tl.int32)
    g_x = (r_x >= RX1).to(tl.int32) + (r_x >= RX2).to(tl.int32)
    tok = tl.where(m_s, PREFIX + ((r_y + SH) % HG) * WG + (r_x + SW) % WG, 0)
    return tok, g_y * 3 + g_x, m_s


@triton.jit
def _window_attention_2d_fwd_kernel(
    q, k, v, mask, o,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    H, G, N, D, DV, PREFIX, HG, WG, WH, WW, SH, SW, RY1, RY2, RX1, RX2, SCALE_LOG2E,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Swin attention for BLOCK_M query slots of one window of one (batch, head).

    q [B, H, N, D], k [B, HK, N, D], v [B, HK, N, DV] (strided, unit last stride), mask
    [B, N] uint8, o [B, H, N, DV] contiguous; HK = H // G. Grid:
    (windows · cdiv(WH·WW, BLOCK_M), B·H), windows = cdiv(HG, WH) · cdiv(WG, WW).
    """
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_P >= 16, "tl.dot needs blocks of at least 16")
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    T = WH * WW
    n_qt = tl.cdiv(T, BLOCK_M)
    i_w, i_qt = i_t // n_qt, i_t % n_qt
    n_wx = tl.cdiv(WG, WW)
    i_wy, i_wx = i_w // n_wx, i_w % n_wx
    q_base = q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh
    k_base = k + i_b.to(tl.int64) * s_kb + (i_h // G).to(tl.int64) * s_kh
    v_base = v + i_b.to(tl.int64) * s_vb + (i_h // G).to(tl.int64) * s_vh
    o_d, o_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)

    o_m = i_qt * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_m, reg_m, m_m = _swin_slots(o_m, i_wy, i_wx, HG, WG, WH, WW, SH, SW, RY1, RY2, RX1, RX2, PREFIX)
    p_q = q_base + tok_m.to(tl.int64)[:, None] * s_qn + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None] & (o_d < D)[None, :], other=0.0)  # [BM, BD]

    b_m = tl.full([BLOCK_M], -1e30, dtype=tl.float32)  # [BM]
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM]
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)  # [BM, BDV]
    if HAS_PREFIX:
        b_m, b_l, b_acc = _attend_prefix(b_q, k_base, v_base, s_kn, s_vn, mask, i_b, N, PREFIX, D, DV, b_m, b_l,
                                         b_acc, SCALE_LOG2E, BLOCK_P, BLOCK_D, BLOCK_DV, HAS_MASK, PRECISION, UPCAST)
    for i_n in range(0, T, BLOCK_N):
        o_n = i_n + tl.arange(0, BLOCK_N)
        tok_n, reg_n, m_n = _swin_slots(o_n, i_wy, i_wx, HG, WG, WH, WW, SH, SW, RY1, RY2, RX1, RX2, PREFIX)
        if HAS_MASK:
            m_n = m_n & (tl.load(mask + i_b.to(tl.int64) * N + tok_n, mask=m_n, other=0) != 0)  # [BN]
        p_k = k_base + tok_n.to(tl.int64)[:, None] * s_kn + o_d[None, :]
        b_k = tl.load(p_k, mask=m_n[:, None] & (o_d < D)[None, :], other=0.0)  # [BN, BD]
        p_v = v_base + tok_n.to(tl.int64)[:, None] * s_vn + o_v[None, :]
        b_v = tl.load(p_v, mask=m_n[:, None] & (o_v < DV)[None, :], other=0.0)  # [BN, BDV]
        m_vis = m_n[None, :] & (reg_m[:, None] == reg_n[None, :])  # [BM, BN]
        b_m, b_l, b_acc = _attend(b_q, b_k, b_v, m_vis, b_m, b_l, b_acc, SCALE_LOG2E, PRECISION, UPCAST)
    # a row that saw no key has l == 0 and acc == 0: it stores zeros
    b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]  # [BM, BDV]
    p_o = o + i_bh.to(tl.int64) * N * DV + tok_m.to(tl.int64)[:, None] * DV + o_v[None, :]
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_m[:, None] & (o_v < DV)[None, :])


# ---------------------------------------------------------------------------- neighbourhood


@triton.jit
def _na_patch(i_a, NT, L, K, DIL, BLOCK: tl.constexpr):
    """Axis tile i_a (NT tiles per dilation group): (group g, group length, first query index,
    key range [c0, c1) in group coordinates); an empty tile (first index >= length) has c1 <= c0."""
    g = i_a // NT
    a0 = (i_a % NT) * BLOCK
    lg = (L - g + DIL - 1) // DIL
    c0 = tl.minimum(tl.maximum(a0 - K // 2, 0), lg - K)  # the first query's window start
    c1 = tl.minimum(tl.maximum(tl.minimum(a0 + BLOCK, lg) - 1 - K // 2, 0), lg - K) + K  # the last one's end
    c1 = tl.where(a0 < lg, c1, c0)
    return g, lg, a0, c0, c1


@triton.jit
def _neighborhood_attention_2d_fwd_kernel(
    q, k, v, mask, o,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    H, G, N, D, DV, PREFIX, HG, WG, KH, KW, DH, DW, NTY, NTX, SCALE_LOG2E,
    BLOCK_QH: tl.constexpr, BLOCK_QW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Neighbourhood attention for a BLOCK_QH x BLOCK_QW query patch of one dilation group
    of one (batch, head).

    Tensors as the Swin kernel. NTY / NTX: patches per dilation group along rows / columns
    (cdiv of the longest group's length). Grid: (DH·NTY · DW·NTX, B·H).
    """
    BLOCK_M: tl.constexpr = BLOCK_QH * BLOCK_QW
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_P >= 16, "tl.dot needs blocks of at least 16")
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    g_y, lg_y, a_y0, c_y0, c_y1 = _na_patch(i_t // (DW * NTX), NTY, HG, KH, DH, BLOCK_QH)
    g_x, lg_x, a_x0, c_x0, c_x1 = _na_patch(i_t % (DW * NTX), NTX, WG, KW, DW, BLOCK_QW)
    q_base = q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh
    k_base = k + i_b.to(tl.int64) * s_kb + (i_h // G).to(tl.int64) * s_kh
    v_base = v + i_b.to(tl.int64) * s_vb + (i_h // G).to(tl.int64) * s_vh
    o_d, o_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)

    o_m = tl.arange(0, BLOCK_M)
    a_y = a_y0 + o_m // BLOCK_QW  # [BM] query row within the group
    a_x = a_x0 + o_m % BLOCK_QW  # [BM] query column within the group
    m_m = (a_y < lg_y) & (a_x < lg_x)
    s_y = tl.minimum(tl.maximum(a_y - KH // 2, 0), lg_y - KH)  # [BM] window start (NATTEN)
    s_x = tl.minimum(tl.maximum(a_x - KW // 2, 0), lg_x - KW)  # [BM]
    tok_m = tl.where(m_m, PREFIX + (g_y + DH * a_y) * WG + g_x + DW * a_x, 0)
    p_q = q_base + tok_m.to(tl.int64)[:, None] * s_qn + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None] & (o_d < D)[None, :], other=0.0)  # [BM, BD]

    b_m = tl.full([BLOCK_M], -1e30, dtype=tl.float32)  # [BM]
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM]
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)  # [BM, BDV]
    if HAS_PREFIX:
        b_m, b_l, b_acc = _attend_prefix(b_q, k_base, v_base, s_kn, s_vn, mask, i_b, N, PREFIX, D, DV, b_m, b_l,
                                         b_acc, SCALE_LOG2E, BLOCK_P, BLOCK_D, BLOCK_DV, HAS_MASK, PRECISION, UPCAST)
    # the patch's key rectangle [c_y0, c_y1) x [c_x0, c_x1), flattened row-major
    n_kx = c_x1 - c_x0
    n_keys = (c_y1 - c_y0) * n_kx
    for i_n in range(0, n_keys, BLOCK_N):
        o_n = i_n + tl.arange(0, BLOCK_N)
        m_n = o_n < n_keys
        c_y = c_y0 + o_n // n_kx  # [BN] key row within the group
        c_x = c_x0 + o_n % n_kx  # [BN] key column within the group
        tok_n = tl.where(m_n, PREFIX + (g_y + DH * c_y) * WG + g_x + DW * c_x, 0)
        if HAS_MASK:
            m_n = m_n & (tl.load(mask + i_b.to(tl.int64) * N + tok_n, mask=m_n, other=0) != 0)  # [BN]
        p_k = k_base + tok_n.to(tl.int64)[:, None] * s_kn + o_d[None, :]
        b_k = tl.load(p_k, mask=m_n[:, None] & (o_d < D)[None, :], other=0.0)  # [BN, BD]
        p_v = v_base + tok_n.to(tl.int64)[:, None] * s_vn + o_v[None, :]
        b_v = tl.load(p_v, mask=m_n[:, None] & (o_v < DV)[None, :], other=0.0)  # [BN, BDV]
        m_y = (c_y[None, :] >= s_y[:, None]) & (c_y[None, :] < s_y[:, None] + KH)  # [BM, BN]
        m_x = (c_x[None, :] >= s_x[:, None]) & (c_x[None, :] < s_x[:, None] + KW)  # [BM, BN]
        b_m, b_l, b_acc = _attend(b_q, b_k, b_v, m_n[None, :] & m_y & m_x, b_m, b_l, b_acc, SCALE_LOG2E,
                                  PRECISION, UPCAST)
    # a row that saw no key has l == 0 and acc == 0: it stores zeros
    b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]  # [BM, BDV]
    p_o = o + i_bh.to(tl.int64) * N * DV + tok_m.to(tl.int64)[:, None] * DV + o_v[None, :]
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_m[:, None] & (o_v < DV)[None, :])


# ---------------------------------------------------------------------------- prefix rows


@triton.jit
def _prefix_rows_fwd_kernel(
    q, k, v, mask, o, o_part, ml_part,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    H, G, N, D, DV, PREFIX, P_PAD, CHUNK, SCALE_LOG2E,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPLIT: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Prefix queries [i_p·BLOCK_P, (i_p+1)·BLOCK_P) ∩ [0, PREFIX) of one (batch, head) over the
    keys [i_s·CHUNK, (i_s+1)·CHUNK).

    SPLIT == 1: writes those rows of o [B, H, N, DV]. Else writes the unnormalised partial
    accumulator o_part [SPLIT, B·H, P_PAD, DV] and ml_part [SPLIT, B·H, 2, P_PAD] (running
    max in base-2 units, sum), fp32; P_PAD = cdiv(PREFIX, BLOCK_P)·BLOCK_P.
    Grid: (B·H, SPLIT, cdiv(PREFIX, BLOCK_P)).
    """
    tl.static_assert(BLOCK_P >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs blocks of at least 16")
    i_bh, i_s, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    q_base = q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh
    k_base = k + i_b.to(tl.int64) * s_kb + (i_h // G).to(tl.int64) * s_kh
    v_base = v + i_b.to(tl.int64) * s_vb + (i_h // G).to(tl.int64) * s_vh
    o_d, o_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < PREFIX
    p_q = q_base + o_p[:, None] * s_qn + o_d[None, :]
    b_q = tl.load(p_q, mask=m_p[:, None] & (o_d < D)[None, :], other=0.0)  # [BP, BD]

    b_m = tl.full([BLOCK_P], -1e30, dtype=tl.float32)  # [BP]
    b_l = tl.zeros([BLOCK_P], dtype=tl.float32)  # [BP]
    b_acc = tl.zeros([BLOCK_P, BLOCK_DV], dtype=tl.float32)  # [BP, BDV]
    for i_n in range(i_s * CHUNK, tl.minimum(i_s * CHUNK + CHUNK, N), BLOCK_N):
        o_n = i_n + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        if HAS_MASK:
            m_n = m_n & (tl.load(mask + i_b.to(tl.int64) * N + o_n, mask=m_n, other=0) != 0)  # [BN]
        p_k = k_base + o_n.to(tl.int64)[:, None] * s_kn + o_d[None, :]
        b_k = tl.load(p_k, mask=m_n[:, None] & (o_d < D)[None, :], other=0.0)  # [BN, BD]
        p_v = v_base + o_n.to(tl.int64)[:, None] * s_vn + o_v[None, :]
        b_v = tl.load(p_v, mask=m_n[:, None] & (o_v < DV)[None, :], other=0.0)  # [BN, BDV]
        b_m, b_l, b_acc = _attend(b_q, b_k, b_v, m_n[None, :], b_m, b_l, b_acc, SCALE_LOG2E, PRECISION, UPCAST)
    if SPLIT == 1:
        b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]  # [BP, BDV]
        p_o = o + i_bh.to(tl.int64) * N * DV + o_p[:, None] * DV + o_v[None, :]
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_p[:, None] & (o_v < DV)[None, :])
    else:
        i_part = (i_s * tl.num_programs(0) + i_bh).to(tl.int64)
        p_acc = o_part + i_part * P_PAD * DV + o_p[:, None] * DV + o_v[None, :]
        tl.store(p_acc, b_acc, mask=(o_v < DV)[None, :])
        tl.store(ml_part + i_part * 2 * P_PAD + o_p, b_m)
        tl.store(ml_part + i_part * 2 * P_PAD + P_PAD + o_p, b_l)


# ---------------------------------------------------------------------------- launchers




# whether Triton's interpreter runs these kernels (TRITON_INTERPRET=1 when they were defined)
_INTERPRETED = not isinstance(_window_attention_2d_fwd_kernel, triton.runtime.jit.JITFunction)
# the largest grid dim 1 (where B·H goes) CUDA launches
_MAX_GRID_Y = 65535


def _upcast(dtype: torch.dtype) -> bool:
    """Whether the dots need fp32 operands: bf16 under Triton's interpreter, whose tl.dot
    reads bf16 tensors as raw integers."""
    return dtype == torch.bfloat16 and _INTERPRETED




def _strides(q, k, v) -> tuple[int, ...]:
    return (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])


_POW2 = ("BLOCK_M", "BLOCK_N", "BLOCK_QH", "BLOCK_QW", "num_warps")


def _resolve(op: str, config: dict | None, args: tuple) -> dict:
    """`config`, or the space's default for this call when None; checked for what the kernels need."""
    sp = SPACES[op]
    if config is None:
        return sp.default(sp.shape_of(*args))
    if not isinstance(config, dict):
        raise ValueError(f"{op}: config must be a dict over {list(sp.params)}; got {type(config).__name__}.")
    missing = [name for name in sp.params if name not in config]
    unknown = [name for name in config if name not in sp.params]
    if missing or unknown:
        raise ValueError(f"{op}: config {config} lacks {missing} / has unknown {unknown}; give exactly "
                         f"{list(sp.params)} (rewriter.autotune.space.space({op!r}).default(shape) makes one).")
    for name, value in config.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{op}: config[{name!r}] must be a positive int; got {value!r}.")
        if name in _POW2 and value & (value - 1):
            raise ValueError(f"{op}: config[{name!r}] must be a power of two; got {value!r}.")
    tiles = {"BLOCK_N": config["BLOCK_N"]}
    if "BLOCK_M" in config:
        tiles["BLOCK_M"] = config["BLOCK_M"]
    else:
        tiles["BLOCK_QH * BLOCK_QW"] = config["BLOCK_QH"] * config["BLOCK_QW"]
    for name, value in tiles.items():
        if value < 16:
            raise ValueError(f"{op}: config {name} = {value} is under 16, tl.dot's smallest tile; use >= 16.")
    return config






def _scale_log2e(q: torch.Tensor, scale) -> float:
    return (q.shape[-1] ** -0.5 if scale is None else float(scale)) * _LOG2E


def _prefix_rows(q, k, v, mask, has_mask, o, prefix, scale_log2e, config, precision):
    """Fill o[:, :, :prefix] (rows that see every token): one launch, PREFIX_ROWS query rows and
    SPLIT key slices per program. mask: the key mask as from `_mask_bytes` (read if has_mask)."""
    B, H, N, D = q.shape
    DV = v.shape[3]
    BLOCK_N = config["BLOCK_N"]
    split = max(1, min(config["SPLIT"], triton.cdiv(N, BLOCK_N)))
    chunk = triton.cdiv(triton.cdiv(N, split), BLOCK_N) * BLOCK_N
    split = triton.cdiv(N, chunk)
    p_pad = triton.cdiv(prefix, PREFIX_ROWS) * PREFIX_ROWS
    parts = ml = o
    if split > 1:
        parts = torch.empty(split, B * H, p_pad, DV, device=q.device, dtype=torch.float32)
        ml = torch.empty(split, B * H, 2, p_pad, device=q.device, dtype=torch.float32)
    _prefix_rows_fwd_kernel[(B * H, split, p_pad // PREFIX_ROWS)](
        q, k, v, mask, o, parts, ml,
        *_strides(q, k, v),
        H, H // k.shape[1], N, D, DV, prefix, p_pad, chunk, scale_log2e,
        BLOCK_P=PREFIX_ROWS, BLOCK_N=BLOCK_N, BLOCK_D=block(D), BLOCK_DV=block(DV), SPLIT=split,
        HAS_MASK=has_mask, PRECISION=precision, UPCAST=_upcast(q.dtype), **launch_options(config),
    )
    if split > 1:  # log-sum-exp merge, in a fixed order
        m, l = ml[:, :, 0, :prefix], ml[:, :, 1, :prefix]  # [S, BH, P]
        w = torch.exp2(m - m.amax(0))  # [S, BH, P]
        den = (w * l).sum(0)  # [BH, P]
        num = (w[..., None] * parts[:, :, :prefix]).sum(0)  # [BH, P, DV]
        out = torch.where(den[..., None] > 0, num / den.clamp_min(1e-30)[..., None], 0.0)
        o[:, :, :prefix] = out.view(B, H, prefix, DV).to(o.dtype)


def _window_fwd(q, k, v, key_mask, grid, window, shift, prefix, scale, config):
    B, H, N, D = q.shape
    DV = v.shape[3]
    (hg, wg), (wh, ww), (sh, sw) = grid, window, shift
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    o = torch.empty(B, H, N, DV, device=q.device, dtype=q.dtype)
    mask = mask_bytes(key_mask, o)
    scale_log2e, precision = _scale_log2e(q, scale), dot_precision(q.dtype)
    # region thresholds on the rolled axis; without a shift every real slot is region 0
    ry1, ry2 = (hg - wh, hg - sh) if sh else (hg, hg)
    rx1, rx2 = (wg - ww, wg - sw) if sw else (wg, wg)
    windows = triton.cdiv(hg, wh) * triton.cdiv(wg, ww)
    launch = (windows * triton.cdiv(wh * ww, config["BLOCK_M"]), B * H)
    _window_attention_2d_fwd_kernel[launch](
        q, k, v, mask, o,
        *_strides(q, k, v),
        H, H // k.shape[1], N, D, DV, prefix, hg, wg, wh, ww, sh, sw, ry1, ry2, rx1, rx2, scale_log2e,
        BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_P=min(block(prefix), config["BLOCK_N"]),
        BLOCK_D=block(D),
        BLOCK_DV=block(DV), HAS_PREFIX=prefix > 0, HAS_MASK=key_mask is not None, PRECISION=precision,
        UPCAST=_upcast(q.dtype), **launch_options(config),
    )
    if prefix:
        _prefix_rows(q, k, v, mask, key_mask is not None, o, prefix, scale_log2e, config, precision)
    return o


def _neighborhood_fwd(q, k, v, key_mask, grid, kernel, dilation, prefix, scale, config):
    B, H, N, D = q.shape
    DV = v.shape[3]
    (hg, wg), (kh, kw), (dh, dw) = grid, kernel, dilation
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    o = torch.empty(B, H, N, DV, device=q.device, dtype=q.dtype)
    mask = mask_bytes(key_mask, o)
    scale_log2e, precision = _scale_log2e(q, scale), dot_precision(q.dtype)
    qh, qw = config["BLOCK_QH"], config["BLOCK_QW"]
    nty, ntx = triton.cdiv(triton.cdiv(hg, dh), qh), triton.cdiv(triton.cdiv(wg, dw), qw)
    _neighborhood_attention_2d_fwd_kernel[(dh * nty * dw * ntx, B * H)](
        q, k, v, mask, o,
        *_strides(q, k, v),
        H, H // k.shape[1], N, D, DV, prefix, hg, wg, kh, kw, dh, dw, nty, ntx, scale_log2e,
        BLOCK_QH=qh, BLOCK_QW=qw, BLOCK_N=config["BLOCK_N"], BLOCK_P=min(block(prefix), config["BLOCK_N"]),
        BLOCK_D=block(D),
        BLOCK_DV=block(DV), HAS_PREFIX=prefix > 0, HAS_MASK=key_mask is not None, PRECISION=precision,
        UPCAST=_upcast(q.dtype), **launch_options(config),
    )
    if prefix:
        _prefix_rows(q, k, v, mask, key_mask is not None, o, prefix, scale_log2e, config, precision)
    return o


# ---------------------------------------------------------------------------- public


def _runs_here(q, k, v) -> bool:
    """Whether the kernels take these tensors (else the reference runs)."""
    return (q.dtype in _DTYPES and q.shape[3] <= MAX_HEAD_DIM and v.shape[3] <= MAX_HEAD_DIM
            and min(q.numel(), k.numel(), v.numel()) > 0 and q.shape[0] * q.shape[1] <= _MAX_GRID_Y
            and (q.is_cuda or _INTERPRETED))


def window_attention_2d(q, k, v, key_mask, grid, window, shift, prefix, scale, *, config=None):
    """`rewriter::window_attention_2d` with a Triton kernel; the same result as
    `naive.window_attention_2d`.

    q: [B, H, N, D]; k: [B, Hk, N, D]; v: [B, Hk, N, Dv]; Hk divides H (query head h reads kv
    head h // (H / Hk)); key_mask: bool [B, N] or None (False = padding, zero weight).
    grid = [Hg, Wg] with N = prefix + Hg·Wg (the grid row-major in the last tokens);
    window = [wh, ww]; shift = [sh, sw] with 0 <= shift < window (the cyclic shift and the
    shifted-window mask, folded into the kernel's indexing); prefix: leading tokens that see
    and are seen by every token; scale: None means D**-0.5. A grid not divisible by the
    window gets partial windows at the bottom/right of the rolled grid. Returns
    [B, H, N, Dv] in q.dtype; a query that sees no key (all masked) returns zeros.

    config: a dict over `grid_config.WINDOW_PARAMS` (None: the search space's default for the
    call), validated either way. fp16/bf16/fp32 CUDA tensors with D, Dv <= MAX_HEAD_DIM run the
    kernels; fp64, wider heads, empty tensors, B·H > 65535 and (unless Triton interprets)
    CPU tensors run the reference. Forward only: the kernels' output carries no autograd graph;
    the `rewriter::` op differentiates the reference.
    """
    op = "window_attention_2d"
    check_inputs(q, k, v, key_mask, scale, op)
    grid = _check_grid(q, grid, prefix, op)
    window, shift = pair(window, "window", op), pair(shift, "shift", op)
    if min(window) < 1 or not (0 <= shift[0] < window[0] and 0 <= shift[1] < window[1]):
        # invalid: the reference raises its own ValueError
        return _window_reference(q, k, v, grid=grid, window=window, shift=shift, prefix=prefix, scale=scale,
                                 key_mask=key_mask)
    config = _resolve(op, config, (q, k, v, key_mask, grid, window, shift, prefix, scale))
    if not _runs_here(q, k, v):
        return _window_reference(q, k, v, grid=grid, window=window, shift=shift, prefix=prefix, scale=scale,
                                 key_mask=key_mask)
    return _window_fwd(q, k, v, key_mask, grid, window, shift, prefix, scale, config)


def neighborhood_attention_2d(q, k, v, key_mask, grid, kernel_size, dilation, prefix, scale, *, config=None):
    """`rewriter::neighborhood_attention_2d` with a Triton kernel; the same result as
    `naive.neighborhood_attention_2d`.

    q: [B, H, N, D]; k: [B, Hk, N, D]; v: [B, Hk, N, Dv]; Hk divides H; key_mask: bool [B, N]
    or None. grid = [Hg, Wg] with N = prefix + Hg·Wg; kernel_size = [kh, kw] and dilation =
    [dh, dw] (ints are taken for both axes); each axis needs length >= kernel·dilation.
    Per axis, query i (group g = i % δ, index a = i // δ among the group's Lg members) sees
    the k group members from s = min(max(a - k//2, 0), Lg - k) (NATTEN: clamped inward at the
    borders, always k keys); plus the prefix tokens, which in turn see every token.
    scale: None means D**-0.5. Returns [B, H, N, Dv] in q.dtype; a query that sees no key
    (all masked) returns zeros.

    config: a dict over `grid_config.NEIGHBORHOOD_PARAMS` (None: the search space's default).
    Fallbacks and autograd as `window_attention_2d`.
    """
    op = "neighborhood_attention_2d"
    check_inputs(q, k, v, key_mask, scale, op)
    grid = _check_grid(q, grid, prefix, op)
    kernel, dil = pair(kernel_size, "kernel_size", op), pair(dilation, "dilation", op)
    if min(kernel) < 1 or min(dil) < 1 or grid[0] < kernel[0] * dil[0] or grid[1] < kernel[1] * dil[1]:
        # invalid: the reference raises its own ValueError
        return _neighborhood_reference(q, k, v, grid=grid, kernel_size=kernel, dilation=dil, prefix=prefix,
                                       scale=scale, key_mask=key_mask)
    config = _resolve(op, config, (q, k, v, key_mask, grid, kernel, dil, prefix, scale))
    if not _runs_here(q, k, v):
        return _neighborhood_reference(q, k, v, grid=grid, kernel_size=kernel, dilation=dil, prefix=prefix,
                                       scale=scale, key_mask=key_mask)
    return _neighborhood_fwd(q, k, v, key_mask, grid, kernel, dil, prefix, scale, config)
