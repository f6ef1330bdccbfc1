"""Triton forward of `rewriter::sliding_window_attention` (the spec is `naive.sliding_window_attention`).

Flash-style: one program holds a block of BLOCK_M queries in registers and folds key
blocks into an online softmax (running max, running sum, fp32 accumulator), in log2
units so that exp2 stands for exp.

Dilation without copies: tokens fall into δ groups (i % δ) and within a group the band is
undilated. A program's queries are BLOCK_M consecutive members a' of one group (tokens
g + δ·a'), so the keys it reads are one contiguous run c' of group-mates, loaded as
strided rows g + δ·c' straight from k and v; the band test is arithmetic on a' - c'
(causal: 0 <= a' - c' <= window - 1; else |a' - c'| <= window // 2). Each program loops
only over the key blocks meeting its band, plus the `sinks` leading tokens (a sink already
in the band is counted there only; causal sinks only for j <= i). `key_mask` is read as
bytes beside each key block.

`global_sinks` (Longformer global tokens): the first `sinks` queries see every key. A
second, small launch computes those rows over key chunks split across programs (partial
softmax states), which torch combines; the band kernel leaves those rows alone. No N×N
(nor sinks×N) tensor exists anywhere.

Dots read the inputs' dtype with fp32 accumulation: fp16/bf16 products are exact in fp32
(the probabilities are rounded to the input dtype for the second dot, as in
FlashAttention); fp32 inputs take exact ("ieee") dots. Forward only: autograd of the op
differentiates the reference.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rewriter.autotune.space import dot_tile as _block

from .._launch import on_device, unit_last
from .naive import check_sliding_arguments
from .naive import sliding_window_attention as _reference
from .sliding_config import PARAMS, SPACE, band, shape_of

__all__ = ["sliding_window_attention", "MAX_HEAD_DIM"]

# the largest head dims (D and Dv) the kernels take; wider heads, and fp64, run the reference
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
# the global-row launch aims for this many programs, splitting the keys among them
_TARGET_PROGRAMS = 256
# ... but gives each split at least this many key blocks
_MIN_BLOCKS_PER_SPLIT = 2
_MAX_GRID = 65535


@triton.jit
def _attend(b_q, b_k, b_v, m_s, b_acc, b_m, b_l, QK_SCALE, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one key block into a query block's online softmax.

    b_q [BM, BD], b_k [BN, BD], b_v [BN, BDV] in the inputs' dtype; m_s [BM, BN] marks the
    visible (query, key) pairs; b_acc [BM, BDV] (unnormalised output), b_m [BM] (running
    max, log2 units, -inf until a row sees a key), b_l [BM] (running sum) are fp32.
    UPCAST: dot fp32 copies of the operands (same numbers: the probabilities are still
    rounded to the value dtype first). Returns the new b_acc, b_m, b_l.
    """
    if UPCAST:
        b_s = tl.dot(b_q.to(tl.float32), tl.trans(b_k.to(tl.float32)), input_precision=PRECISION)  # [BM, BN]
    else:
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [BM, BN]
    b_s = tl.where(m_s, b_s * QK_SCALE, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, axis=1))  # [BM]
    # a row that has seen no key yet keeps the max at -inf; 0 stands in so exp2 gives 0, not NaN
    b_mr = tl.where(b_mn == float("-inf"), 0.0, b_mn)  # [BM]
    b_p = tl.exp2(b_s - b_mr[:, None])  # [BM, BN]
    b_alpha = tl.exp2(b_m - b_mr)  # [BM]
    b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * b_alpha[:, None]
    if UPCAST:
        b_acc = tl.dot(b_p.to(b_v.dtype).to(tl.float32), b_v.to(tl.float32), b_acc, input_precision=PRECISION)
    else:
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc, input_precision=PRECISION)  # [BM, BDV]
    return b_acc, b_mn, b_l


@triton.jit
def _sliding_window_attention_fwd_kernel(
    q, k, v, mask, o,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_on,
    N, H, G, D, DV, QK_SCALE,
    DILATION, LO, HI, SINKS, N_GLOBAL,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Band (+ sink) attention for BLOCK_M consecutive queries of one dilation group.

    q [B, H, N, D], k [B, HK, N, D], v [B, HK, N, DV], o [B, H, N, DV] (strided, unit last
    stride; query head h reads kv head h // G), mask uint8 [B, N]. In group coordinates query
    a' sees group-mate c' when -HI <= a' - c' <= LO; query i also sees tokens j < SINKS
    outside its band (j <= i when CAUSAL). Rows i < N_GLOBAL are not written (the global-row
    kernel owns them). Grid: (cdiv(ceil(N / DILATION), BLOCK_M), min(DILATION, N), B·H).
    """
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_DV >= 16, "tl.dot needs blocks of at least 16")
    i_m, i_g, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    n_g = (N - i_g + DILATION - 1) // DILATION  # members of this dilation group
    o_a = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query index within the group
    o_i = i_g + o_a * DILATION  # [BM] query token
    o_d, o_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    m_a, m_d, m_v = o_a < n_g, o_d < D, o_v < DV

    p_q = q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh + o_i.to(tl.int64)[:, None] * s_qn + o_d[None, :]
    b_q = tl.load(p_q, mask=m_a[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
    p_kh = k + i_b.to(tl.int64) * s_kb + i_hk.to(tl.int64) * s_kh
    p_vh = v + i_b.to(tl.int64) * s_vb + i_hk.to(tl.int64) * s_vh
    p_mask = mask + i_b.to(tl.int64) * N

    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)  # [BM, BDV]
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # [BM]
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM]

    # the sink tokens 0..SINKS-1, except those the band below already covers
    for i_j in range(0, SINKS, BLOCK_N):
        o_j = i_j + tl.arange(0, BLOCK_N)  # [BN] key token
        m_j = o_j < SINKS
        p_k = p_kh + o_j.to(tl.int64)[:, None] * s_kn + o_d[None, :]
        b_k = tl.load(p_k, mask=m_j[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
        p_v = p_vh + o_j.to(tl.int64)[:, None] * s_vn + o_v[None, :]
        b_v = tl.load(p_v, mask=m_j[:, None] & m_v[None, :], other=0.0)  # [BN, BDV]
        if HAS_MASK:
            m_j = m_j & (tl.load(p_mask + o_j, mask=m_j, other=0) != 0)
        b_diff = o_i[:, None] - o_j[None, :]  # [BM, BN]
        m_band = (b_diff % DILATION == 0) & (b_diff <= LO * DILATION) & (b_diff >= -HI * DILATION)
        m_s = m_j[None, :] & (m_band == 0)  # [BM, BN]
        if CAUSAL:
            m_s = m_s & (b_diff >= 0)
        b_acc, b_m, b_l = _attend(b_q, b_k, b_v, m_s, b_acc, b_m, b_l, QK_SCALE, UPCAST, PRECISION)

    # the band: group-mates c' with i_m·BM - LO <= c' < (i_m + 1)·BM + HI
    c_lo = tl.maximum(i_m * BLOCK_M - LO, 0)
    c_hi = tl.minimum(i_m * BLOCK_M + BLOCK_M + HI, n_g)
    for i_c in range(c_lo, c_hi, BLOCK_N):
        o_c = i_c + tl.arange(0, BLOCK_N)  # [BN] key index within the group
        m_c = o_c < c_hi
        o_j = i_g + o_c * DILATION  # [BN] key token
        p_k = p_kh + o_j.to(tl.int64)[:, None] * s_kn + o_d[None, :]
        b_k = tl.load(p_k, mask=m_c[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
        p_v = p_vh + o_j.to(tl.int64)[:, None] * s_vn + o_v[None, :]
        b_v = tl.load(p_v, mask=m_c[:, None] & m_v[None, :], other=0.0)  # [BN, BDV]
        if HAS_MASK:
            m_c = m_c & (tl.load(p_mask + o_j, mask=m_c, other=0) != 0)
        b_rel = o_a[:, None] - o_c[None, :]  # [BM, BN]
        m_s = m_c[None, :] & (b_rel <= LO) & (b_rel >= -HI)  # [BM, BN]
        b_acc, b_m, b_l = _attend(b_q, b_k, b_v, m_s, b_acc, b_m, b_l, QK_SCALE, UPCAST, PRECISION)

    # a query that saw no key (all padding) has l = 0 and acc = 0: it returns zeros
    b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]  # [BM, BDV]
    p_o = o + i_b.to(tl.int64) * s_ob + i_h.to(tl.int64) * s_oh + o_i.to(tl.int64)[:, None] * s_on + o_v[None, :]
    m_o = m_a & (o_i >= N_GLOBAL)
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_o[:, None] & m_v[None, :])


@triton.jit
def _sliding_window_attention_global_kernel(
    q, k, v, mask, acc, stats,
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    N, NG, H, G, D, DV, QK_SCALE, CHUNK,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial attention of the global rows (queries 0..NG-1) over keys [i_s·CHUNK, (i_s+1)·CHUNK).

    q, k, v, mask as the band kernel; acc [SPLIT, B·H, NG, DV] gets the unnormalised output,
    stats [2, SPLIT, B·H, NG] the running max (log2 units) and sum, all fp32, for the launcher
    to combine. Grid: (cdiv(NG, BLOCK_M), B·H, SPLIT).
    """
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_DV >= 16, "tl.dot needs blocks of at least 16")
    i_m, i_bh, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    o_i = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query token
    o_d, o_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    m_i, m_d, m_v = o_i < NG, o_d < D, o_v < DV

    p_q = q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh + o_i.to(tl.int64)[:, None] * s_qn + o_d[None, :]
    b_q = tl.load(p_q, mask=m_i[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
    p_kh = k + i_b.to(tl.int64) * s_kb + i_hk.to(tl.int64) * s_kh
    p_vh = v + i_b.to(tl.int64) * s_vb + i_hk.to(tl.int64) * s_vh

    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)  # [BM, BDV]
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # [BM]
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM]
    j_hi = tl.minimum(i_s * CHUNK + CHUNK, N)
    for i_j in range(i_s * CHUNK, j_hi, BLOCK_N):
        o_j = i_j + tl.arange(0, BLOCK_N)  # [BN] key token
        m_j = o_j < j_hi
        p_k = p_kh + o_j.to(tl.int64)[:, None] * s_kn + o_d[None, :]
        b_k = tl.load(p_k, mask=m_j[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
        p_v = p_vh + o_j.to(tl.int64)[:, None] * s_vn + o_v[None, :]
        b_v = tl.load(p_v, mask=m_j[:, None] & m_v[None, :], other=0.0)  # [BN, BDV]
        if HAS_MASK:
            m_j = m_j & (tl.load(mask + i_b.to(tl.int64) * N + o_j, mask=m_j, other=0) != 0)
        m_s = m_i[:, None] & m_j[None, :]  # [BM, BN]
        b_acc, b_m, b_l = _attend(b_q, b_k, b_v, m_s, b_acc, b_m, b_l, QK_SCALE, UPCAST, PRECISION)

    i_row = (i_s * tl.num_programs(1) + i_bh).to(tl.int64) * NG  # this (split, head)'s first row
    p_acc = acc + (i_row + o_i)[:, None] * DV + o_v[None, :]
    tl.store(p_acc, b_acc, mask=m_i[:, None] & m_v[None, :])
    n_rows = tl.num_programs(2) * tl.num_programs(1) * NG  # rows of one stats plane
    tl.store(stats + i_row + o_i, b_m, mask=m_i)
    tl.store(stats + n_rows + i_row + o_i, b_l, mask=m_i)


# ---------------------------------------------------------------------------- launchers


def _interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _resolve(config: dict | None, shape: dict) -> dict:
    """`config`, checked, or the space's default for `shape` when None."""
    op = "sliding_window_attention"
    if config is None:
        return SPACE.default(shape)
    if not isinstance(config, dict):
        raise ValueError(f"{op}: config must be a dict over {list(PARAMS)} or None; got {type(config).__name__}.")
    missing = [name for name in PARAMS if name not in config]
    if missing:
        raise ValueError(f"{op}: config {config} lacks {missing}; give every one of {list(PARAMS)} "
                         "(rewriter.kernels.window_attention.sliding_config.SPACE.default(shape) makes one).")
    unknown = [name for name in config if name not in PARAMS]
    if unknown:
        raise ValueError(f"{op}: config has unknown keys {unknown}; the kernel takes {list(PARAMS)}.")
    for name in ("BLOCK_M", "BLOCK_N"):
        value = config[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 16 or value & (value - 1):
            raise ValueError(f"{op}: config[{name!r}] must be a power of two >= 16 (tl.dot's smallest tile); "
                             f"got {value!r}.")
    warps = config["num_warps"]
    if not isinstance(warps, int) or isinstance(warps, bool) or warps < 1 or warps > 32 or warps & (warps - 1):
        raise ValueError(f"{op}: config['num_warps'] must be a power of two from 1 to 32; got {warps!r}.")
    stages = config["num_stages"]
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise ValueError(f"{op}: config['num_stages'] must be a positive int; got {stages!r}.")
    return config


def _runs_here(q, k, v, dilation: int) -> bool:
    """Whether the kernels take these tensors (else the reference runs)."""
    return (
        q.dtype in _DTYPES
        and q.shape[3] <= MAX_HEAD_DIM and v.shape[3] <= MAX_HEAD_DIM
        and min(q.numel(), k.numel(), v.numel()) > 0
        and (q.is_cuda or (q.device.type == "cpu" and _interpreting()))
        # grid axes 1 and 2 (dilation groups, batch x heads) are limited to 65535 on CUDA
        and min(dilation, q.shape[2]) <= _MAX_GRID and q.shape[0] * q.shape[1] <= _MAX_GRID
    )




def _global_split(n: int, rows: int, bh: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(programs per row block sharing the keys, keys per program) for the global-row launch."""
    row_blocks = triton.cdiv(rows, block_m)
    want = max(1, _TARGET_PROGRAMS // (bh * row_blocks))
    split = max(1, min(want, n // (_MIN_BLOCKS_PER_SPLIT * block_n)))
    chunk = triton.cdiv(triton.cdiv(n, split), block_n) * block_n
    return triton.cdiv(n, chunk), chunk


def _global_rows(q, k, v, mask, o, rows: int, qk_scale: float, config: dict, precision: str, upcast: bool) -> None:
    """Write o[:, :, :rows] = attention of the first `rows` queries over every key."""
    B, H, N, D = q.shape
    HK, DV = k.shape[1], v.shape[3]
    BM, BN = config["BLOCK_M"], config["BLOCK_N"]
    split, chunk = _global_split(N, rows, B * H, BM, BN)
    acc = torch.empty(split, B * H, rows, DV, device=q.device, dtype=torch.float32)
    stats = torch.empty(2, split, B * H, rows, device=q.device, dtype=torch.float32)
    _sliding_window_attention_global_kernel[(triton.cdiv(rows, BM), B * H, split)](
        q, k, v, q if mask is None else mask, acc, stats,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        N, rows, H, H // HK, D, DV, qk_scale, chunk,
        HAS_MASK=mask is not None, UPCAST=upcast, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=_block(D), BLOCK_DV=_block(DV),
        PRECISION=precision, num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    # combine the splits' partial softmax states (in a fixed order)
    m, l = stats[0], stats[1]  # [S, BH, rows]
    m_max = m.amax(0)
    w = torch.exp2(m - torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max))  # -inf -> 0
    den = (l * w).sum(0)  # [BH, rows]
    out = (acc * w[..., None]).sum(0) / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    o[:, :, :rows].copy_(out.view(B, H, rows, DV))


def sliding_window_attention_fwd(q, k, v, key_mask, window, causal, dilation, sinks, global_sinks, scale,
                                 config: dict) -> torch.Tensor:
    """Launch the kernels on checked arguments that `_runs_here`; returns [B, H, N, Dv] in q.dtype."""
    B, H, N, D = q.shape
    HK, DV = k.shape[1], v.shape[3]
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    mask = None if key_mask is None else key_mask.contiguous().view(torch.uint8)
    lmax, lo, hi = band(N, window, causal, dilation)
    sinks = min(sinks, N)
    n_global = sinks if global_sinks else 0
    scale = D ** -0.5 if scale is None else float(scale)
    qk_scale = scale * _LOG2E
    # the interpreter's bf16 tl.dot multiplies the raw bit patterns (Triton 3.9): dot fp32 copies
    upcast = q.dtype == torch.bfloat16 and not q.is_cuda
    # fp32 dots exact; fp16/bf16 products are exact in fp32 whatever this says (Triton's default)
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    o = torch.empty(B, H, N, DV, device=q.device, dtype=q.dtype)
    BM, BN = config["BLOCK_M"], config["BLOCK_N"]
    with on_device(q):
        if n_global < N:
            _sliding_window_attention_fwd_kernel[(triton.cdiv(lmax, BM), min(dilation, N), B * H)](
                q, k, v, q if mask is None else mask, o,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
                N, H, H // HK, D, DV, qk_scale,
                dilation, lo, hi, sinks, n_global,
                CAUSAL=bool(causal), HAS_MASK=mask is not None, UPCAST=upcast,
                BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=_block(D), BLOCK_DV=_block(DV), PRECISION=precision,
                num_warps=config["num_warps"], num_stages=config["num_stages"],
            )
        if n_global:
            _global_rows(q, k, v, mask, o, n_global, qk_scale, config, precision, upcast)
    return o




# ---------------------------------------------------------------------------- public


def sliding_window_attention(q, k, v, key_mask, window, causal, dilation, sinks, global_sinks, scale, *,
                             config=None):
    """`rewriter::sliding_window_attention` with Triton kernels; the same result as
    `naive.sliding_window_attention` (forward only; autograd of the op differentiates the
    reference).

    q: [B, H, N, D]; k: [B, Hk, N, D]; v: [B, Hk, N, Dv]; Hk divides H (query head h reads
    kv head h // (H / Hk)); key_mask: bool [B, N] or None (False = padding, zero weight).
    Query i sees key j when (i - j) % dilation == 0 and 0 <= i - j < window·dilation
    (causal) or |i - j| <= (window // 2)·dilation (not causal), plus the first `sinks`
    tokens (j <= i when causal); global_sinks (not causal) also lets those first `sinks`
    queries see every key. scale: None for D**-0.5. Returns [B, H, N, Dv] in q.dtype; a
    query that sees no real key returns zeros. Any strides with a unit last stride are read
    in place.

    config: a dict over `sliding_config.PARAMS` (None: the space's default for the shape);
    a malformed one raises ValueError. fp16/bf16/fp32 with D, Dv <= 256 on CUDA (or on CPU
    under TRITON_INTERPRET=1) run the kernels; anything else (fp64, wider heads, empty
    tensors, CPU tensors without the interpreter, more than 65535 batch x heads or
    dilation groups) runs the reference.
    """
    check_sliding_arguments(q, k, v, key_mask, window, causal, dilation, sinks, global_sinks, scale)
    shape = shape_of(q, k, v, key_mask, window, causal, dilation, sinks, global_sinks, scale)
    config = _resolve(config, shape)
    if not _runs_here(q, k, v, dilation):
        return _reference(q, k, v, window=window, causal=causal, dilation=dilation, sinks=sinks,
                          global_sinks=global_sinks, scale=scale, key_mask=key_mask)
    return sliding_window_attention_fwd(q, k, v, key_mask, int(window), bool(causal), int(dilation), int(sinks),
                                        bool(global_sinks), scale, config)
