"""Triton kernels for `rewriter::agent_attention`, forward only (the spec is `naive.py` beside this file).

    out = softmax(Q Aᵀ · scale) · (softmax(A Kᵀ · scale) V),   A = pooled queries [n, D]

Three or four launches, none of them with an N×N (or even an N×n) tensor in memory:

1. pool: one program per (agent, query head) averages the agent's window of query tokens
   (1-D adaptive windows along the sequence, or a rectangle of the token grid, after the
   `prefix` tokens) into A [B·H, n, D] fp32.
2. gather (stage 1, few queries × many keys): the agents of the G query heads sharing a kv
   head are G·n rows of one matrix, so every K/V tile loaded serves all of them (GQA
   without repeating k/v). One program takes BLOCK_A agent rows and every SPLIT-th key
   block, keeping a running max, sum and [BLOCK_A, Dv] accumulator (online softmax);
   padded keys (key_mask False) are skipped, exactly as the reference's underflowing fill.
3. combine (only when SPLIT > 1): merges the SPLIT partials of each row in split order
   (deterministic), agent_v = acc / sum; a row with no real key gets 0, as the reference.
4. read (stage 2, many queries × few keys): one program per BLOCK_M queries of one query
   head holds all n agents and their agent_v in one tile: o = softmax(q Aᵀ·scale) agent_v.

Everything is computed in fp32 (exp2 with log2(e) folded into the scale); dots read fp32
operands, exact ("ieee") for fp32 inputs and TF32 for fp16/bf16 inputs. q, k, v are read
through their strides (a [B, N, H, D] layout transposed to [B, H, N, D] is not copied).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rewriter.autotune.space import dot_tile as _block

from .._launch import dot_precision, launch_options
from .config import PARAMS, SPACE, keep, shape_of
from .naive import _check
from .naive import agent_attention as _reference

__all__ = ["agent_attention", "agent_attention_fwd"]

# the widest head dims the kernels take; wider ones, fp64, empty tensors and agent counts
# whose tiles no config holds (see `_runs_here`) run the reference
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


@triton.jit
def _agent_attention_pool_kernel(
    q, a,
    H, PREFIX, HG, WG, AH, AW, D,
    s_qb, s_qh, s_qn, s_qd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """a[i_bh, i_g] = mean of agent i_g's window of query tokens, fp32.

    The tokens after PREFIX are an [HG, WG] row-major grid pooled adaptively to [AH, AW]
    (1-D pooling is HG = AH = 1): agent (r, c) averages rows [⌊r·HG/AH⌋, ⌈(r+1)·HG/AH⌉) ×
    columns [⌊c·WG/AW⌋, ⌈(c+1)·WG/AW⌉). q [B, H, NQ, D] (strides s_q*); a [B·H, AH·AW, D].
    Grid: (AH·AW, B·H).
    """
    tl.static_assert(BLOCK_T >= 16, "blocks of at least 16")
    i_g, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_r, i_c = i_g // AW, i_g % AW
    r0, r1 = i_r * HG // AH, ((i_r + 1) * HG + AH - 1) // AH
    c0, c1 = i_c * WG // AW, ((i_c + 1) * WG + AW - 1) // AW
    W = c1 - c0
    T = (r1 - r0) * W
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D

    p_base = q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh
    b_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)  # [BT, BD]
    for i_t in range(0, T, BLOCK_T):
        o_t = i_t + tl.arange(0, BLOCK_T)
        o_n = PREFIX + (r0 + o_t // W) * WG + c0 + o_t % W  # token index of window element t
        p_q = p_base + o_n[:, None].to(tl.int64) * s_qn + o_d[None, :] * s_qd
        b_acc += tl.load(p_q, mask=(o_t < T)[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    b_a = tl.sum(b_acc, axis=0) / T  # [BD]
    tl.store(a + (i_bh.to(tl.int64) * AH * AW + i_g) * D + o_d, b_a, mask=m_d)


@triton.jit
def _agent_attention_gather_kernel(
    a, k, v, mask, av, m_part, l_part,
    R, NK, HK, D, DV, SCALE_LOG2E,
    s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Stage 1: softmax(A Kᵀ·scale) V for BLOCK_A agent rows over key blocks i_s, i_s + SPLIT, ….

    a [B·HK, R, D] fp32 (R = G·n: the agents of the G query heads of kv head i_bk); k [B, HK,
    NK, D], v [B, HK, NK, DV] (strides s_k*, s_v*); mask [B, NK] uint8. SPLIT == 1: writes
    agent_v into av [B·HK, R, DV] fp32. Otherwise writes the partial accumulator into av
    [SPLIT, B·HK, R, DV] and the running max (log2 units) and sum into m_part, l_part
    [SPLIT, B·HK, R]. Grid: (cdiv(R, BLOCK_A), B·HK, SPLIT).
    """
    tl.static_assert(BLOCK_A >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_DV >= 16, "tl.dot needs blocks of at least 16")
    i_a, i_bk, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bk // HK, i_bk % HK
    o_a = i_a * BLOCK_A + tl.arange(0, BLOCK_A)
    o_d, o_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    m_a, m_d, m_v = o_a < R, o_d < D, o_v < DV

    p_a = a + i_bk.to(tl.int64) * R * D + o_a[:, None] * D + o_d[None, :]
    b_a = tl.load(p_a, mask=m_a[:, None] & m_d[None, :], other=0.0)  # [BA, BD]
    p_k0 = k + i_b.to(tl.int64) * s_kb + i_h.to(tl.int64) * s_kh
    p_v0 = v + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh

    b_m = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)  # [BA] running max, log2 units
    b_l = tl.zeros([BLOCK_A], dtype=tl.float32)  # [BA] running sum
    b_acc = tl.zeros([BLOCK_A, BLOCK_DV], dtype=tl.float32)  # [BA, BDV]
    for i_n in range(i_s, tl.cdiv(NK, BLOCK_N), SPLIT):
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        b_keep = o_n < NK  # [BN]
        if HAS_MASK:
            b_keep = b_keep & (tl.load(mask + i_b.to(tl.int64) * NK + o_n, mask=o_n < NK, other=0) != 0)
        p_k = p_k0 + o_n[:, None].to(tl.int64) * s_kn + o_d[None, :] * s_kd
        b_k = tl.load(p_k, mask=b_keep[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BN, BD]
        b_s = tl.dot(b_a, tl.trans(b_k), input_precision=PRECISION) * SCALE_LOG2E  # [BA, BN]
        b_s = tl.where(b_keep[None, :], b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, axis=1))  # [BA]
        b_mu = tl.where(b_mn == float("-inf"), 0.0, b_mn)  # no -inf - -inf while every key so far is padding
        b_p = tl.exp2(b_s - b_mu[:, None])  # [BA, BN]
        b_alpha = tl.exp2(b_m - b_mu)  # [BA]
        p_v = p_v0 + o_n[:, None].to(tl.int64) * s_vn + o_v[None, :] * s_vd
        b_v = tl.load(p_v, mask=b_keep[:, None] & m_v[None, :], other=0.0).to(tl.float32)  # [BN, BDV]
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p, b_v, input_precision=PRECISION)
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_m = b_mn

    m_av = m_a[:, None] & m_v[None, :]
    if SPLIT == 1:
        b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]  # no real key: acc is 0, and so is agent_v
        p_av = av + i_bk.to(tl.int64) * R * DV + o_a[:, None] * DV + o_v[None, :]
        tl.store(p_av, b_o, mask=m_av)
    else:
        i_p = (i_s * tl.num_programs(1) + i_bk).to(tl.int64)
        p_av = av + i_p * R * DV + o_a[:, None] * DV + o_v[None, :]
        tl.store(p_av, b_acc, mask=m_av)
        tl.store(m_part + i_p * R + o_a, b_m, mask=m_a)
        tl.store(l_part + i_p * R + o_a, b_l, mask=m_a)


@triton.jit
def _agent_attention_combine_kernel(
    acc, m_part, l_part, av,
    R, DV, SPLIT,
    BLOCK_A: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """agent_v = Σ_s 2^(m_s - M) acc_s / Σ_s 2^(m_s - M) l_s, splits merged in order s = 0, 1, ….

    acc [SPLIT, B·HK, R, DV], m_part, l_part [SPLIT, B·HK, R] fp32 (from the gather kernel);
    av [B·HK, R, DV] fp32. Grid: (cdiv(R, BLOCK_A), B·HK).
    """
    i_a, i_bk = tl.program_id(0), tl.program_id(1)
    o_a = i_a * BLOCK_A + tl.arange(0, BLOCK_A)
    o_v = tl.arange(0, BLOCK_DV)
    m_a, m_v = o_a < R, o_v < DV
    m_av = m_a[:, None] & m_v[None, :]

    b_m = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)  # [BA]
    b_l = tl.zeros([BLOCK_A], dtype=tl.float32)  # [BA]
    b_acc = tl.zeros([BLOCK_A, BLOCK_DV], dtype=tl.float32)  # [BA, BDV]
    for i_s in range(0, SPLIT):
        i_p = (i_s * tl.num_programs(1) + i_bk).to(tl.int64)
        b_ms = tl.load(m_part + i_p * R + o_a, mask=m_a, other=float("-inf"))  # [BA]
        b_ls = tl.load(l_part + i_p * R + o_a, mask=m_a, other=0.0)  # [BA]
        b_accs = tl.load(acc + i_p * R * DV + o_a[:, None] * DV + o_v[None, :], mask=m_av, other=0.0)  # [BA, BDV]
        b_mn = tl.maximum(b_m, b_ms)
        b_mu = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_alpha, b_beta = tl.exp2(b_m - b_mu), tl.exp2(b_ms - b_mu)  # [BA]
        b_acc = b_acc * b_alpha[:, None] + b_accs * b_beta[:, None]
        b_l = b_l * b_alpha + b_ls * b_beta
        b_m = b_mn
    b_o = b_acc / tl.where(b_l > 0, b_l, 1.0)[:, None]  # [BA, BDV]
    tl.store(av + i_bk.to(tl.int64) * R * DV + o_a[:, None] * DV + o_v[None, :], b_o, mask=m_av)


@triton.jit
def _agent_attention_read_kernel(
    q, a, av, o,
    NQ, H, NA, D, DV, SCALE_LOG2E,
    s_qb, s_qh, s_qn, s_qd,
    BLOCK_M: tl.constexpr, BLOCK_AG: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Stage 2: o = softmax(q Aᵀ·scale) agent_v for BLOCK_M queries of one query head.

    q [B, H, NQ, D] (strides s_q*); a [B·H, NA, D], av [B·H, NA, DV] fp32; o [B·H, NQ, DV].
    BLOCK_AG covers all NA agents. Grid: (cdiv(NQ, BLOCK_M), B·H).
    """
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_AG >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs blocks of at least 16")
    tl.static_assert(BLOCK_DV >= 16, "tl.dot needs blocks of at least 16")
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_g, o_d, o_v = tl.arange(0, BLOCK_AG), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    m_m, m_g, m_d, m_v = o_m < NQ, o_g < NA, o_d < D, o_v < DV

    p_q = q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh + o_m[:, None].to(tl.int64) * s_qn + o_d[None, :] * s_qd
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BM, BD]
    p_a = a + i_bh.to(tl.int64) * NA * D + o_g[:, None] * D + o_d[None, :]
    b_a = tl.load(p_a, mask=m_g[:, None] & m_d[None, :], other=0.0)  # [BAG, BD]
    p_av = av + i_bh.to(tl.int64) * NA * DV + o_g[:, None] * DV + o_v[None, :]
    b_av = tl.load(p_av, mask=m_g[:, None] & m_v[None, :], other=0.0)  # [BAG, BDV]

    b_s = tl.dot(b_q, tl.trans(b_a), input_precision=PRECISION) * SCALE_LOG2E  # [BM, BAG]
    b_s = tl.where(m_g[None, :], b_s, float("-inf"))
    b_p = tl.exp2(b_s - tl.max(b_s, axis=1)[:, None])  # [BM, BAG]; NA >= 1, so the max is finite
    b_o = tl.dot(b_p, b_av, input_precision=PRECISION) / tl.sum(b_p, axis=1)[:, None]  # [BM, BDV]
    p_o = o + i_bh.to(tl.int64) * NQ * DV + o_m[:, None] * DV + o_v[None, :]
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_m[:, None] & m_v[None, :])


# ---------------------------------------------------------------------------- launchers




def _is_pow2_at_least(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and not value & (value - 1)


def _resolve(config: dict | None, shape: dict) -> dict:
    """`config`, or the space's default for this shape when None; checked for what the kernels need."""
    if config is None:
        return SPACE.default(shape)
    if not isinstance(config, dict):
        raise ValueError(f"agent_attention: config must be a dict over {list(PARAMS)} or None; "
                         f"got {type(config).__name__}.")
    missing = [name for name in PARAMS if name not in config]
    if missing:
        raise ValueError(f"agent_attention: config {config} lacks {missing}; give every one of {list(PARAMS)} "
                         "(rewriter.autotune.space.space('agent_attention').default(shape) makes one).")
    for name in ("BLOCK_N", "BLOCK_A", "BLOCK_M"):
        if not _is_pow2_at_least(config[name], 16):
            raise ValueError(f"agent_attention: config[{name!r}] must be a power of two >= 16 (tl.dot's "
                             f"smallest tile); got {config[name]!r}.")
    if not _is_pow2_at_least(config["num_warps"], 1):
        raise ValueError(f"agent_attention: config['num_warps'] must be a power of two >= 1; "
                         f"got {config['num_warps']!r}.")
    for name in ("SPLIT", "num_stages"):
        value = config[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"agent_attention: config[{name!r}] must be a positive int; got {value!r}.")
    return config




def _pool_geometry(nq: int, num_agents: int, grid, prefix: int) -> tuple[int, int, int, int]:
    """(HG, WG, AH, AW): the token grid after `prefix` and the agent grid it pools to."""
    if grid:
        hg, wg = int(grid[0]), int(grid[1])
        a = max(1, round(math.sqrt(num_agents)))
        return hg, wg, min(a, hg), min(a, wg)
    tokens = nq - prefix
    return 1, tokens, 1, min(num_agents, tokens)


def agent_attention_fwd(q, k, v, key_mask, num_agents, scale, grid, prefix, config: dict | None = None):
    """The kernels' forward: (o [B, H, Nq, Dv] in q.dtype, agents [B, H, n, D] fp32,
    agent_v [B, H, n, Dv] fp32). Arguments as `agent_attention` (checked there)."""
    config = _resolve(config, shape_of(q, k, v, key_mask, num_agents, scale, grid, prefix))
    B, H, NQ, D = q.shape
    HK, NK, DV = k.shape[1], k.shape[2], v.shape[3]
    G = H // HK
    scale = D**-0.5 if scale is None else float(scale)
    hg, wg, ah, aw = _pool_geometry(NQ, num_agents, grid, prefix)
    NA = ah * aw
    R = G * NA  # agent rows per kv head
    BLOCK_D, BLOCK_DV = _block(D), _block(DV)
    BLOCK_N = min(config["BLOCK_N"], _block(NK))
    BLOCK_A = min(config["BLOCK_A"], _block(R))
    BLOCK_M = min(config["BLOCK_M"], _block(NQ))
    split = max(1, min(config["SPLIT"], triton.cdiv(NK, BLOCK_N)))
    precision, options = dot_precision(q.dtype), launch_options(config)
    f32 = dict(device=q.device, dtype=torch.float32)

    # agents; the G query heads of a kv head are adjacent, so [B·H, n, D] is [B·HK, G·n, D]
    agents = torch.empty(B * H, NA, D, **f32)
    _agent_attention_pool_kernel[(NA, B * H)](
        q, agents,
        H, prefix, hg, wg, ah, aw, D,
        *q.stride(),
        BLOCK_T=BLOCK_N, BLOCK_D=BLOCK_D, **options,
    )

    agent_v = torch.empty(B * HK, R, DV, **f32)
    mask = q if key_mask is None else key_mask.contiguous().view(torch.uint8)  # a dummy pointer when absent
    if split == 1:
        acc = m_part = l_part = agent_v
    else:
        acc = torch.empty(split, B * HK, R, DV, **f32)
        m_part, l_part = torch.empty(split, B * HK, R, **f32), torch.empty(split, B * HK, R, **f32)
    _agent_attention_gather_kernel[(triton.cdiv(R, BLOCK_A), B * HK, split)](
        agents, k, v, mask, acc, m_part, l_part,
        R, NK, HK, D, DV, scale * _LOG2E,
        *k.stride(), *v.stride(),
        HAS_MASK=key_mask is not None, SPLIT=split,
        BLOCK_A=BLOCK_A, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, PRECISION=precision,
        **options,
    )
    if split > 1:
        _agent_attention_combine_kernel[(triton.cdiv(R, BLOCK_A), B * HK)](
            acc, m_part, l_part, agent_v,
            R, DV, split,
            BLOCK_A=BLOCK_A, BLOCK_DV=BLOCK_DV, **options,
        )

    o = torch.empty(B, H, NQ, DV, device=q.device, dtype=q.dtype)
    _agent_attention_read_kernel[(triton.cdiv(NQ, BLOCK_M), B * H)](
        q, agents, agent_v, o,
        NQ, H, NA, D, DV, scale * _LOG2E,
        *q.stride(),
        BLOCK_M=BLOCK_M, BLOCK_AG=_block(NA), BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, PRECISION=precision,
        **options,
    )
    return o, agents.view(B, H, NA, D), agent_v.view(B, H, NA, DV)


# ---------------------------------------------------------------------------- autograd


def _reference_call(q, k, v, key_mask, num_agents, scale, grid, prefix):
    return _reference(q, k, v, num_agents=num_agents, scale=scale, grid=tuple(grid) if grid else None,
                      prefix=prefix, key_mask=key_mask)


class _AgentAttentionFunction(torch.autograd.Function):
    """The Triton forward; the backward differentiates the reference (recomputed), as the op does."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, num_agents, scale, grid, prefix, config):
        ctx.save_for_backward(q, k, v, key_mask)
        ctx.options = (num_agents, scale, grid, prefix)
        return agent_attention_fwd(q, k, v, key_mask, num_agents, scale, grid, prefix, config)[0]

    @staticmethod
    def backward(ctx, do):
        q, k, v, key_mask = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
            wanted = [t for t in leaves if t.requires_grad]
            out = _reference_call(*leaves, key_mask, *ctx.options)
            grads = iter(torch.autograd.grad(out, wanted, do))
        return (*(next(grads) if t.requires_grad else None for t in leaves), None, None, None, None, None, None)


# ---------------------------------------------------------------------------- public


def _runs_here(q, k, v, shape: dict) -> bool:
    """Whether the kernels take these tensors (else the reference runs)."""
    return (q.dtype in _DTYPES and max(q.shape[3], v.shape[3]) <= MAX_HEAD_DIM
            and min(q.numel(), k.numel(), v.numel()) > 0
            and keep(SPACE.default(shape), shape))  # the default (shrunk to fit if need be) holds n agents


def agent_attention(q, k, v, key_mask, num_agents, scale, grid, prefix, *, config=None):
    """`rewriter::agent_attention` with Triton kernels; the same result as `naive.agent_attention`.

    out = softmax(Q Aᵀ·scale) · softmax(A Kᵀ·scale) V, agents A pooled from q.

    q: [B, H, Nq, D]; k: [B, Hk, Nk, D]; v: [B, Hk, Nk, Dv]; Hk divides H (query head h reads
    kv head h // (H / Hk)); key_mask: bool [B, Nk] or None (False = padding, left out of the
    agents' softmax over keys; a batch with no real key gets zero output). num_agents: how
    many agents to pool; scale: float, or None for D**-0.5; grid: [Hg, Wg] (the tokens after
    `prefix` are a row-major Hg×Wg image, pooled to about num_agents = a×a agents) or [] /
    None (1-D pooling to min(num_agents, Nq - prefix) agents); prefix: leading tokens (CLS,
    registers) never pooled, though they read from the agents like every query.
    Returns [B, H, Nq, Dv] in q.dtype, computed in fp32.

    config: a dict over `config.PARAMS` (None: the search space's default for the shape).
    fp16/bf16/fp32 with D, Dv <= 256 run the kernels when some config's tiles hold all n
    agents beside the head dims (e.g. n <= 256 at D = Dv = 64, n <= 128 at 128); anything
    else (fp64, wider heads, more agents, empty tensors) runs the reference. Forward only:
    where a gradient is asked for, the backward differentiates the reference.
    """
    grid = list(grid) if grid else []
    _check(q, k, v, num_agents, scale, tuple(grid) if grid else None, prefix, key_mask)
    shape = shape_of(q, k, v, key_mask, num_agents, scale, grid, prefix)
    config = _resolve(config, shape)  # a bad config raises whichever path runs
    if not _runs_here(q, k, v, shape):
        return _reference_call(q, k, v, key_mask, num_agents, scale, grid, prefix)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _AgentAttentionFunction.apply(q, k, v, key_mask, num_agents, scale, grid, prefix, config)
    return agent_attention_fwd(q, k, v, key_mask, num_agents, scale, grid, prefix, config)[0]
