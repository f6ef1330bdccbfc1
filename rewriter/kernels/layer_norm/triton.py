"""Triton LayerNorm, forward and backward.

Same structure as `kernels/rms_norm/triton.py`: a program walks `ROWS_PER_PROGRAM` rows in
[BLOCK_M, BLOCK_D] tiles; a row that fits one block (`ONE_BLOCK`) is loaded once and its
variance taken about the exact mean; a wider row is walked in column blocks, each block's
mean and squared deviations merged into the row's as it goes (Chan et al.), so neither a
large common offset nor an outlier cancels the variance away. Backward: a statistics
kernel for wide rows, then one program per (row group, column block); weight and bias
gradients are two-stage fp32 reductions. Accumulation is fp32 whatever the input dtype
(fp32, fp16, bf16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rms_norm.triton import DTYPES, check_param, on_device, pick_config, reference_backward, rows_of
from . import naive
from .config import SPACE

__all__ = ["layer_norm", "layer_norm_backward"]


@triton.jit
def _layer_norm_fwd_kernel(
    X, W, B, Y,
    R, D,
    stride_x, stride_y,
    eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    tl.static_assert(ROWS_PER_PROGRAM % BLOCK_M == 0, "ROWS_PER_PROGRAM must be a multiple of BLOCK_M")
    i_p = tl.program_id(0)
    o_d = tl.arange(0, BLOCK_D)  # [BD]
    for i_t in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        o_m = i_p * ROWS_PER_PROGRAM + i_t + tl.arange(0, BLOCK_M)  # [BM]
        m_m = o_m < R
        p_x = X + o_m.to(tl.int64)[:, None] * stride_x  # [BM, 1]
        p_y = Y + o_m.to(tl.int64)[:, None] * stride_y  # [BM, 1]
        if ONE_BLOCK:
            m_d = o_d < D
            m_x = m_m[:, None] & m_d[None, :]  # [BM, BD]
            b_x = tl.load(p_x + o_d[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BM, BD]
            b_mean = tl.sum(b_x, axis=1) / D  # [BM]
            b_xc = tl.where(m_x, b_x - b_mean[:, None], 0.0)  # [BM, BD]
            b_r = tl.rsqrt(tl.sum(b_xc * b_xc, axis=1) / D + eps)  # [BM]
            b_y = b_xc * b_r[:, None]  # [BM, BD]
            if HAS_WEIGHT:
                b_y = b_y * tl.load(W + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                b_y = b_y + tl.load(B + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
            tl.store(p_y + o_d[None, :], b_y.to(Y.dtype.element_ty), mask=m_x)
        else:
            # mean and M2 = Σ(x - mean)² of each block, merged block by block (Chan et al.)
            b_n = 0.0  # columns merged so far
            b_mean = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM]
            b_m2 = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM]
            for i_d in range(0, D, BLOCK_D):
                o_c = i_d + o_d  # [BD]
                m_c = o_c < D
                m_x = m_m[:, None] & m_c[None, :]
                b_x = tl.load(p_x + o_c[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BM, BD]
                b_nb = tl.sum(m_c.to(tl.float32), axis=0)  # columns in this block
                b_mb = tl.sum(b_x, axis=1) / b_nb  # [BM]
                b_xc = tl.where(m_x, b_x - b_mb[:, None], 0.0)  # [BM, BD]
                b_delta = b_mb - b_mean  # [BM]
                b_mean += b_delta * (b_nb / (b_n + b_nb))
                b_m2 += tl.sum(b_xc * b_xc, axis=1) + b_delta * b_delta * (b_n * b_nb / (b_n + b_nb))
                b_n += b_nb
            b_r = tl.rsqrt(b_m2 / D + eps)  # [BM]
            for i_d in range(0, D, BLOCK_D):
                o_c = i_d + o_d  # [BD]
                m_c = o_c < D
                m_x = m_m[:, None] & m_c[None, :]
                b_x = tl.load(p_x + o_c[None, :], mask=m_x, other=0.0).to(tl.float32)
                b_y = (b_x - b_mean[:, None]) * b_r[:, None]  # [BM, BD]
                if HAS_WEIGHT:
                    b_y = b_y * tl.load(W + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
                if HAS_BIAS:
                    b_y = b_y + tl.load(B + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
                tl.store(p_y + o_c[None, :], b_y.to(Y.dtype.element_ty), mask=m_x)


@triton.jit
def _layer_norm_bwd_stats_kernel(
    X, W, G, S,
    R, D,
    stride_x, stride_g,
    eps,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):
    """Per-row statistics of a wide row, S: [4, R] fp32.

    S[0] = mean, S[1] = rstd, S[2] = Σ(dy·w)/D, S[3] = Σ(dy·w·x̂)/D, with x̂ = (x - mean)·rstd.
    """
    tl.static_assert(ROWS_PER_PROGRAM % BLOCK_M == 0, "ROWS_PER_PROGRAM must be a multiple of BLOCK_M")
    i_p = tl.program_id(0)
    o_d = tl.arange(0, BLOCK_D)  # [BD]
    for i_t in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        o_m = i_p * ROWS_PER_PROGRAM + i_t + tl.arange(0, BLOCK_M)  # [BM]
        m_m = o_m < R
        p_x = X + o_m.to(tl.int64)[:, None] * stride_x  # [BM, 1]
        p_g = G + o_m.to(tl.int64)[:, None] * stride_g  # [BM, 1]
        # merged block by block (Chan et al.): mean, M2 = Σ(x - mean)², Σdy·w, and
        # Q = Σ dy·w·(x - mean) re-centred on the running mean as it moves
        b_n = 0.0  # columns merged so far
        b_mean = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM]
        b_m2 = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM]
        b_g1 = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM]
        b_q = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM]
        for i_d in range(0, D, BLOCK_D):
            o_c = i_d + o_d  # [BD]
            m_c = o_c < D
            m_x = m_m[:, None] & m_c[None, :]
            b_x = tl.load(p_x + o_c[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BM, BD]
            b_dy = tl.load(p_g + o_c[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BM, BD]
            if HAS_WEIGHT:
                b_dy = b_dy * tl.load(W + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
            b_nb = tl.sum(m_c.to(tl.float32), axis=0)  # columns in this block
            b_mb = tl.sum(b_x, axis=1) / b_nb  # [BM]
            b_xc = tl.where(m_x, b_x - b_mb[:, None], 0.0)  # [BM, BD]
            b_gb = tl.sum(b_dy, axis=1)  # [BM]
            b_new = b_mean + (b_mb - b_mean) * (b_nb / (b_n + b_nb))  # [BM]
            b_m2 += tl.sum(b_xc * b_xc, axis=1) + (b_mb - b_mean) * (b_mb - b_mean) * (b_n * b_nb / (b_n + b_nb))
            b_q += (b_mean - b_new) * b_g1 + tl.sum(b_dy * b_xc, axis=1) + (b_mb - b_new) * b_gb
            b_g1 += b_gb
            b_mean = b_new
            b_n += b_nb
        b_r = tl.rsqrt(b_m2 / D + eps)  # [BM]
        tl.store(S + o_m, b_mean, mask=m_m)
        tl.store(S + R + o_m, b_r, mask=m_m)
        tl.store(S + 2 * R + o_m, b_g1 / D, mask=m_m)
        tl.store(S + 3 * R + o_m, b_r * b_q / D, mask=m_m)


@triton.jit
def _layer_norm_bwd_kernel(
    X, W, G, DX, DW, DB, S,
    R, D,
    stride_x, stride_g, stride_dx,
    eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    """dx for one (row group, column block); partial dw, db [programs, D] fp32.

    ONE_BLOCK computes the row statistics in place; otherwise they come from S
    (`_layer_norm_bwd_stats_kernel`).
    """
    tl.static_assert(ROWS_PER_PROGRAM % BLOCK_M == 0, "ROWS_PER_PROGRAM must be a multiple of BLOCK_M")
    i_p, i_c = tl.program_id(0), tl.program_id(1)
    o_c = i_c * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    m_c = o_c < D
    if HAS_WEIGHT:
        b_w = tl.load(W + o_c, mask=m_c, other=0.0).to(tl.float32)  # [BD]
    b_dw = tl.zeros([BLOCK_D], dtype=tl.float32)  # [BD]
    b_db = tl.zeros([BLOCK_D], dtype=tl.float32)  # [BD]
    for i_t in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        o_m = i_p * ROWS_PER_PROGRAM + i_t + tl.arange(0, BLOCK_M)  # [BM]
        m_m = o_m < R
        m_x = m_m[:, None] & m_c[None, :]  # [BM, BD]
        o_r = o_m.to(tl.int64)[:, None]  # [BM, 1]
        b_x = tl.load(X + o_r * stride_x + o_c[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BM, BD]
        b_g = tl.load(G + o_r * stride_g + o_c[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BM, BD]
        b_dy = b_g
        if HAS_WEIGHT:
            b_dy = b_g * b_w[None, :]  # [BM, BD]
        if ONE_BLOCK:
            b_mean = tl.sum(b_x, axis=1) / D  # [BM]
            b_xc = tl.where(m_x, b_x - b_mean[:, None], 0.0)  # [BM, BD]
            b_r = tl.where(m_m, tl.rsqrt(tl.sum(b_xc * b_xc, axis=1) / D + eps), 0.0)  # [BM]
            b_xh = b_xc * b_r[:, None]  # [BM, BD]
            b_c1 = tl.sum(b_dy, axis=1) / D  # [BM]
            b_c2 = tl.sum(b_dy * b_xh, axis=1) / D  # [BM]
        else:
            b_mean = tl.load(S + o_m, mask=m_m, other=0.0)  # [BM]
            b_r = tl.load(S + R + o_m, mask=m_m, other=0.0)  # [BM]
            b_c1 = tl.load(S + 2 * R + o_m, mask=m_m, other=0.0)  # [BM]
            b_c2 = tl.load(S + 3 * R + o_m, mask=m_m, other=0.0)  # [BM]
            b_xh = tl.where(m_x, (b_x - b_mean[:, None]) * b_r[:, None], 0.0)  # [BM, BD]
        b_dx = b_r[:, None] * (b_dy - b_c1[:, None] - b_xh * b_c2[:, None])  # [BM, BD]
        tl.store(DX + o_r * stride_dx + o_c[None, :], b_dx.to(DX.dtype.element_ty), mask=m_x)
        if HAS_WEIGHT:
            b_dw += tl.sum(b_g * b_xh, axis=0)
        if HAS_BIAS:
            b_db += tl.sum(b_g, axis=0)
    if HAS_WEIGHT:
        tl.store(DW + i_p.to(tl.int64) * D + o_c, b_dw, mask=m_c)
    if HAS_BIAS:
        tl.store(DB + i_p.to(tl.int64) * D + o_c, b_db, mask=m_c)


# ---------------------------------------------------------------------------- launchers


def _fwd(x, weight, bias, eps, config) -> torch.Tensor:
    d = x.shape[-1]
    weight = check_param(weight, d, "weight", "layer_norm", x)
    bias = check_param(bias, d, "bias", "layer_norm", x)
    x2, rows = rows_of(x, d)
    cfg = pick_config(SPACE, config, rows, d, x.dtype)
    y = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    if rows and d:
        grid = (triton.cdiv(rows, cfg["ROWS_PER_PROGRAM"]),)
        with on_device(x):
            _layer_norm_fwd_kernel[grid](
                x2, x2 if weight is None else weight, x2 if bias is None else bias, y,
                rows, d, x2.stride(0), y.stride(0), float(eps),
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], ROWS_PER_PROGRAM=cfg["ROWS_PER_PROGRAM"],
                ONE_BLOCK=d <= cfg["BLOCK_D"], num_warps=cfg["num_warps"],
            )
    return y.view(x.shape)


def _bwd(grad_out, x, weight, bias, eps, config):
    d = x.shape[-1]
    if grad_out.shape != x.shape:
        raise ValueError(f"layer_norm: grad_out must have x's shape {tuple(x.shape)}; got {tuple(grad_out.shape)}.")
    weight = check_param(weight, d, "weight", "layer_norm", x)
    bias = check_param(bias, d, "bias", "layer_norm", x)
    x2, rows = rows_of(x, d)
    g2, _ = rows_of(grad_out, d)
    cfg = pick_config(SPACE, config, rows, d, x.dtype)
    bm, bd, rpp = cfg["BLOCK_M"], cfg["BLOCK_D"], cfg["ROWS_PER_PROGRAM"]
    one_block = d <= bd
    programs = triton.cdiv(rows, rpp)
    dx = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    dw = torch.empty((programs, d), dtype=torch.float32, device=x.device) if weight is not None else None
    db = torch.empty((programs, d), dtype=torch.float32, device=x.device) if bias is not None else None
    if rows and d:
        stats = x2.new_empty((0 if one_block else 4 * rows,), dtype=torch.float32)
        flags = dict(HAS_WEIGHT=weight is not None, BLOCK_M=bm, BLOCK_D=bd, ROWS_PER_PROGRAM=rpp)
        w_arg = x2 if weight is None else weight
        with on_device(x):
            if not one_block:
                _layer_norm_bwd_stats_kernel[(programs,)](
                    x2, w_arg, g2, stats, rows, d, x2.stride(0), g2.stride(0), float(eps),
                    **flags, num_warps=cfg["num_warps"],
                )
            _layer_norm_bwd_kernel[(programs, triton.cdiv(d, bd))](
                x2, w_arg, g2, dx, x2 if dw is None else dw, x2 if db is None else db, x2 if one_block else stats,
                rows, d, x2.stride(0), g2.stride(0), dx.stride(0), float(eps),
                HAS_BIAS=bias is not None, ONE_BLOCK=one_block, **flags, num_warps=cfg["num_warps"],
            )
    grad_w = None if weight is None else dw.sum(0).to(weight.dtype)
    grad_b = None if bias is None else db.sum(0).to(bias.dtype)
    return dx.view(x.shape), grad_w, grad_b


# ---------------------------------------------------------------------------- public


def layer_norm(x, weight, bias, eps, *, config=None):
    """y = (x - mean(x, -1)) / sqrt(var(x, -1) + eps) * weight + bias (see naive.py).

    x: [..., D] fp32/fp16/bf16 (other dtypes run the reference); weight, bias: [D] or None.
    config: a point of the `layer_norm` space (`config.py`), or None for its default.
    Returns [..., D] in x.dtype.
    """
    if x.dtype not in DTYPES:
        return naive.layer_norm(x, weight, bias, eps)
    return _fwd(x, weight, bias, eps, config)


def layer_norm_backward(grad_out, x, weight, bias, eps, *, config=None):
    """Gradients of `layer_norm`: grad_out, x [..., D]; weight, bias [D] or None.

    Returns (grad_x [..., D] in x.dtype, grad_weight [D] in weight.dtype or None,
    grad_bias [D] in bias.dtype or None).
    """
    if x.dtype not in DTYPES:
        return reference_backward(naive.layer_norm, grad_out, x, weight, bias, eps)
    return _bwd(grad_out, x, weight, bias, eps, config)
