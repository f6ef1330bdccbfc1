"""Triton RMSNorm and compressed RMSNorm, forward and backward.

Both ops normalise rows of width D: `rms_norm` reads them from x [..., D]; `crms_norm`
reads the first D-1 channels from x [..., D-1] and makes the last one, -sum(x), on the
fly (`COMPRESSED`). Accumulation is fp32 whatever the input dtype (fp32, fp16, bf16).

A program walks `ROWS_PER_PROGRAM` rows in tiles of [BLOCK_M, BLOCK_D]. A row that fits in
one block (`ONE_BLOCK`) is loaded once; a wider row (up to 64K and beyond) is walked in
column blocks: twice forward (statistics, then output), and backward by a statistics
kernel followed by a kernel with one program per (row group, column block). Weight and
bias gradients are reduced in two stages: each program writes its fp32 partial sums to
row `i_p` of a [programs, D] buffer, and the launcher sums the rows.

Configs come from `config.py` beside this file (`SPACES`); see there for the parameters.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._launch import on_device
from . import naive
from .config import SPACES

__all__ = ["rms_norm", "crms_norm", "rms_norm_backward", "crms_norm_backward"]


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, B, Y,
    R, D, D_IN,  # rows; row width; columns stored in x (D, or D - 1 when COMPRESSED)
    stride_x, stride_y,
    eps, weight_offset,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, COMPRESSED: tl.constexpr,
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
            m_x = m_m[:, None] & (o_d < D_IN)[None, :]  # [BM, BD]
            b_x = tl.load(p_x + o_d[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BM, BD]
            b_ss = tl.sum(b_x * b_x, axis=1)  # [BM]
            if COMPRESSED:
                b_s = tl.sum(b_x, axis=1)  # [BM]
                b_ss += b_s * b_s
                b_x = tl.where((o_d == D_IN)[None, :], -b_s[:, None], b_x)  # [BM, BD]
            b_r = tl.rsqrt(b_ss / D + eps)  # [BM]
            b_y = b_x * b_r[:, None]  # [BM, BD]
            if HAS_WEIGHT:
                b_y = b_y * (tl.load(W + o_d, mask=m_d, other=0.0).to(tl.float32) + weight_offset)[None, :]
            if HAS_BIAS:
                b_y = b_y + tl.load(B + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
            tl.store(p_y + o_d[None, :], b_y.to(Y.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
        else:
            b_xx = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # [BM, BD]
            b_x1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # [BM, BD]
            for i_d in range(0, D_IN, BLOCK_D):
                o_c = i_d + o_d  # [BD]
                b_x = tl.load(p_x + o_c[None, :], mask=m_m[:, None] & (o_c < D_IN)[None, :], other=0.0).to(tl.float32)
                b_xx += b_x * b_x
                if COMPRESSED:
                    b_x1 += b_x
            b_ss = tl.sum(b_xx, axis=1)  # [BM]
            b_s = tl.sum(b_x1, axis=1)  # [BM]
            if COMPRESSED:
                b_ss += b_s * b_s
            b_r = tl.rsqrt(b_ss / D + eps)  # [BM]
            for i_d in range(0, D, BLOCK_D):
                o_c = i_d + o_d  # [BD]
                m_c = o_c < D
                b_x = tl.load(p_x + o_c[None, :], mask=m_m[:, None] & (o_c < D_IN)[None, :], other=0.0).to(tl.float32)
                if COMPRESSED:
                    b_x = tl.where((o_c == D_IN)[None, :], -b_s[:, None], b_x)
                b_y = b_x * b_r[:, None]  # [BM, BD]
                if HAS_WEIGHT:
                    b_y = b_y * (tl.load(W + o_c, mask=m_c, other=0.0).to(tl.float32) + weight_offset)[None, :]
                if HAS_BIAS:
                    b_y = b_y + tl.load(B + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
                tl.store(p_y + o_c[None, :], b_y.to(Y.dtype.element_ty), mask=m_m[:, None] & m_c[None, :])


@triton.jit
def _rms_norm_bwd_stats_kernel(
    X, W, G, S,
    R, D, D_IN,
    stride_x, stride_g,
    eps, weight_offset,
    HAS_WEIGHT: tl.constexpr, COMPRESSED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):
    """Per-row statistics of a wide row, S: [4, R] fp32.

    S[0] = rstd, S[1] = rstd³·Σ(dy·w·v)/D; when COMPRESSED also S[2] = Σx and
    S[3] = dL/dv_last (v = [x, -Σx] is the full row, dy the output gradient).
    """
    tl.static_assert(ROWS_PER_PROGRAM % BLOCK_M == 0, "ROWS_PER_PROGRAM must be a multiple of BLOCK_M")
    i_p = tl.program_id(0)
    o_d = tl.arange(0, BLOCK_D)  # [BD]
    for i_t in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        o_m = i_p * ROWS_PER_PROGRAM + i_t + tl.arange(0, BLOCK_M)  # [BM]
        m_m = o_m < R
        p_x = X + o_m.to(tl.int64)[:, None] * stride_x  # [BM, 1]
        p_g = G + o_m.to(tl.int64)[:, None] * stride_g  # [BM, 1]
        b_xx = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # [BM, BD]
        b_x1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # [BM, BD]
        b_gx = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # [BM, BD]
        for i_d in range(0, D, BLOCK_D):
            o_c = i_d + o_d  # [BD]
            m_c = o_c < D
            b_x = tl.load(p_x + o_c[None, :], mask=m_m[:, None] & (o_c < D_IN)[None, :], other=0.0).to(tl.float32)
            b_dy = tl.load(p_g + o_c[None, :], mask=m_m[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                b_dy = b_dy * (tl.load(W + o_c, mask=m_c, other=0.0).to(tl.float32) + weight_offset)[None, :]
            b_xx += b_x * b_x
            b_gx += b_dy * b_x
            if COMPRESSED:
                b_x1 += b_x
        b_ss = tl.sum(b_xx, axis=1)  # [BM]
        b_dot = tl.sum(b_gx, axis=1)  # [BM], Σ dy·w·x over the stored columns
        b_s = tl.sum(b_x1, axis=1)  # [BM]
        b_dyl = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM]
        if COMPRESSED:
            b_ss += b_s * b_s
            b_dyl = tl.load(G + o_m.to(tl.int64) * stride_g + D_IN, mask=m_m, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                b_dyl = b_dyl * (tl.load(W + D_IN).to(tl.float32) + weight_offset)
            b_dot -= b_dyl * b_s  # the last channel holds -Σx
        b_r = tl.rsqrt(b_ss / D + eps)  # [BM]
        b_c = b_r * b_r * b_r * b_dot / D  # [BM]
        tl.store(S + o_m, b_r, mask=m_m)
        tl.store(S + R + o_m, b_c, mask=m_m)
        if COMPRESSED:
            tl.store(S + 2 * R + o_m, b_s, mask=m_m)
            tl.store(S + 3 * R + o_m, b_r * b_dyl + b_s * b_c, mask=m_m)


@triton.jit
def _rms_norm_bwd_kernel(
    X, W, G, DX, DW, DB, S,
    R, D, D_IN,
    stride_x, stride_g, stride_dx,
    eps, weight_offset,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, COMPRESSED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    """dx for one (row group, column block); partial dw, db [programs, D] fp32.

    ONE_BLOCK computes the row statistics in place; otherwise they come from S
    (`_rms_norm_bwd_stats_kernel`).
    """
    tl.static_assert(ROWS_PER_PROGRAM % BLOCK_M == 0, "ROWS_PER_PROGRAM must be a multiple of BLOCK_M")
    i_p, i_c = tl.program_id(0), tl.program_id(1)
    o_c = i_c * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    m_c = o_c < D
    m_cx = o_c < D_IN
    if HAS_WEIGHT:
        b_w = tl.load(W + o_c, mask=m_c, other=0.0).to(tl.float32) + weight_offset  # [BD]
    b_dw = tl.zeros([BLOCK_D], dtype=tl.float32)  # [BD]
    b_db = tl.zeros([BLOCK_D], dtype=tl.float32)  # [BD]
    for i_t in range(0, ROWS_PER_PROGRAM, BLOCK_M):
        o_m = i_p * ROWS_PER_PROGRAM + i_t + tl.arange(0, BLOCK_M)  # [BM]
        m_m = o_m < R
        o_r = o_m.to(tl.int64)[:, None]  # [BM, 1]
        m_x = m_m[:, None] & m_cx[None, :]  # [BM, BD]
        m_g = m_m[:, None] & m_c[None, :]  # [BM, BD]
        b_x = tl.load(X + o_r * stride_x + o_c[None, :], mask=m_x, other=0.0).to(tl.float32)  # [BM, BD]
        b_g = tl.load(G + o_r * stride_g + o_c[None, :], mask=m_g, other=0.0).to(tl.float32)  # [BM, BD]
        b_dy = b_g
        if HAS_WEIGHT:
            b_dy = b_g * b_w[None, :]  # [BM, BD]
        if ONE_BLOCK:
            b_ss = tl.sum(b_x * b_x, axis=1)  # [BM]
            if COMPRESSED:
                b_s = tl.sum(b_x, axis=1)  # [BM]
                b_ss += b_s * b_s
                b_x = tl.where((o_c == D_IN)[None, :], -b_s[:, None], b_x)
            b_r = tl.rsqrt(b_ss / D + eps)  # [BM]
            b_c = b_r * b_r * b_r * tl.sum(b_dy * b_x, axis=1) / D  # [BM]
        else:
            b_r = tl.load(S + o_m, mask=m_m, other=0.0)  # [BM]
            b_c = tl.load(S + R + o_m, mask=m_m, other=0.0)  # [BM]
            if COMPRESSED:
                b_s = tl.load(S + 2 * R + o_m, mask=m_m, other=0.0)  # [BM]
                b_x = tl.where((o_c == D_IN)[None, :], -b_s[:, None], b_x)
        b_r = tl.where(m_m, b_r, 0.0)  # rows past R contribute nothing, even with eps = 0
        b_dx = b_dy * b_r[:, None] - b_x * b_c[:, None]  # [BM, BD], dL/dv
        if COMPRESSED:
            # x_j feeds v_j and v_last = -Σx: dL/dx_j = dL/dv_j - dL/dv_last
            if ONE_BLOCK:
                b_dl = tl.sum(tl.where((o_c == D_IN)[None, :], b_dx, 0.0), axis=1)  # [BM]
            else:
                b_dl = tl.load(S + 3 * R + o_m, mask=m_m, other=0.0)  # [BM]
            b_dx = b_dx - b_dl[:, None]
        tl.store(DX + o_r * stride_dx + o_c[None, :], b_dx.to(DX.dtype.element_ty), mask=m_x)
        if HAS_WEIGHT:
            b_dw += tl.sum(b_g * b_x * b_r[:, None], axis=0)
        if HAS_BIAS:
            b_db += tl.sum(b_g, axis=0)
    if HAS_WEIGHT:
        tl.store(DW + i_p.to(tl.int64) * D + o_c, b_dw, mask=m_c)
    if HAS_BIAS:
        tl.store(DB + i_p.to(tl.int64) * D + o_c, b_db, mask=m_c)


# ---------------------------------------------------------------------------- launchers

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CONFIG_KEYS = ("BLOCK_D", "BLOCK_M", "ROWS_PER_PROGRAM", "num_warps")


def pick_config(space, config: dict | None, rows: int, d: int, dtype: torch.dtype) -> dict:
    """`config`, checked, or the space's default for (rows, d, dtype)."""
    if config is None:
        return space.default({"rows": rows, "d": d, "dtype": str(dtype).removeprefix("torch.")})
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(
            f"{space.kernel}: config {config!r} lacks {missing}; give all of {list(CONFIG_KEYS)} "
            f"(choices in rewriter.autotune.space.space({space.kernel!r}).params), or config=None for the default."
        )
    for key in ("BLOCK_D", "BLOCK_M", "ROWS_PER_PROGRAM"):
        value = config[key]
        if not isinstance(value, int) or value < 1 or value & (value - 1):
            raise ValueError(f"{space.kernel}: config[{key!r}] must be a positive power of two; got {value!r}.")
    if config["ROWS_PER_PROGRAM"] % config["BLOCK_M"]:
        raise ValueError(
            f"{space.kernel}: config ROWS_PER_PROGRAM={config['ROWS_PER_PROGRAM']} must be a multiple of "
            f"BLOCK_M={config['BLOCK_M']}."
        )
    return config


def rows_of(t: torch.Tensor, width: int) -> tuple[torch.Tensor, int]:
    """`t` [..., width] as [rows, width] with unit column stride (a view where possible)."""
    rows = math.prod(t.shape[:-1])
    t2 = t.reshape(rows, width)
    if width > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2, rows


def check_param(p: torch.Tensor | None, d: int, name: str, op: str, x: torch.Tensor) -> torch.Tensor | None:
    if p is None:
        return None
    if p.shape != (d,):
        raise ValueError(f"{op}: {name} must have shape ({d},) to match the normalised rows; got {tuple(p.shape)}.")
    if p.device != x.device:
        raise ValueError(f"{op}: {name} is on {p.device} but x is on {x.device}; move them to one device.")
    return p.contiguous()




def _fwd(x, weight, bias, eps, weight_offset, config, compressed: bool) -> torch.Tensor:
    op = "crms_norm" if compressed else "rms_norm"
    d_in = x.shape[-1]
    d = d_in + 1 if compressed else d_in
    weight = check_param(weight, d, "weight", op, x)
    bias = check_param(bias, d, "bias", op, x)
    x2, rows = rows_of(x, d_in)
    cfg = pick_config(SPACES[op], config, rows, d_in, x.dtype)
    y = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    if rows and d:
        grid = (triton.cdiv(rows, cfg["ROWS_PER_PROGRAM"]),)
        with on_device(x):
            _rms_norm_fwd_kernel[grid](
                x2, x2 if weight is None else weight, x2 if bias is None else bias, y,
                rows, d, d_in, x2.stride(0), y.stride(0), float(eps), float(weight_offset),
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, COMPRESSED=compressed,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], ROWS_PER_PROGRAM=cfg["ROWS_PER_PROGRAM"],
                ONE_BLOCK=d <= cfg["BLOCK_D"], num_warps=cfg["num_warps"],
            )
    return y.view(*x.shape[:-1], d)


def _bwd(grad_out, x, weight, bias, eps, weight_offset, config, compressed: bool):
    op = "crms_norm" if compressed else "rms_norm"
    d_in = x.shape[-1]
    d = d_in + 1 if compressed else d_in
    if grad_out.shape != (*x.shape[:-1], d):
        raise ValueError(f"{op}: grad_out must have shape {(*x.shape[:-1], d)}; got {tuple(grad_out.shape)}.")
    weight = check_param(weight, d, "weight", op, x)
    bias = check_param(bias, d, "bias", op, x)
    x2, rows = rows_of(x, d_in)
    g2, _ = rows_of(grad_out, d)
    cfg = pick_config(SPACES[op], config, rows, d_in, x.dtype)
    bm, bd, rpp = cfg["BLOCK_M"], cfg["BLOCK_D"], cfg["ROWS_PER_PROGRAM"]
    one_block = d <= bd
    programs = triton.cdiv(rows, rpp)
    dx = torch.empty((rows, d_in), dtype=x.dtype, device=x.device)
    dw = torch.empty((programs, d), dtype=torch.float32, device=x.device) if weight is not None else None
    db = torch.empty((programs, d), dtype=torch.float32, device=x.device) if bias is not None else None
    if rows and d:
        stats = x2.new_empty((0 if one_block else 4 * rows,), dtype=torch.float32)
        flags = dict(HAS_WEIGHT=weight is not None, COMPRESSED=compressed, BLOCK_M=bm, BLOCK_D=bd, ROWS_PER_PROGRAM=rpp)
        w_arg = x2 if weight is None else weight
        with on_device(x):
            if not one_block:
                _rms_norm_bwd_stats_kernel[(programs,)](
                    x2, w_arg, g2, stats, rows, d, d_in, x2.stride(0), g2.stride(0),
                    float(eps), float(weight_offset), **flags, num_warps=cfg["num_warps"],
                )
            _rms_norm_bwd_kernel[(programs, triton.cdiv(d, bd))](
                x2, w_arg, g2, dx, x2 if dw is None else dw, x2 if db is None else db, x2 if one_block else stats,
                rows, d, d_in, x2.stride(0), g2.stride(0), dx.stride(0), float(eps), float(weight_offset),
                HAS_BIAS=bias is not None, ONE_BLOCK=one_block, **flags, num_warps=cfg["num_warps"],
            )
    grad_w = None if weight is None else dw.sum(0).to(weight.dtype)
    grad_b = None if bias is None else db.sum(0).to(bias.dtype)
    return dx.view(x.shape), grad_w, grad_b


def _supported(x: torch.Tensor) -> bool:
    return x.dtype in DTYPES


# ---------------------------------------------------------------------------- public


def rms_norm(x, weight, bias, eps, weight_offset=0.0, *, config=None):
    """y = x / sqrt(mean(x², -1) + eps) * (weight + weight_offset) + bias (see naive.py).

    x: [..., D] fp32/fp16/bf16 (other dtypes run the reference); weight, bias: [D] or None.
    config: a point of `SPACES["rms_norm"]`, or None for its default. Returns [..., D], x.dtype.
    """
    if not _supported(x):
        return naive.rms_norm(x, weight, bias, eps, weight_offset)
    return _fwd(x, weight, bias, eps, weight_offset, config, compressed=False)


def crms_norm(x, weight, bias, eps, *, config=None):
    """Compressed RMSNorm (see naive.py): rows [x, -sum(x)] normalised.

    x: [..., D-1]; weight, bias: [D] or None. config: a point of `SPACES["crms_norm"]`
    (its shape's `d` is D-1), or None. Returns [..., D], x.dtype.
    """
    if not _supported(x):
        return naive.crms_norm(x, weight, bias, eps)
    return _fwd(x, weight, bias, eps, 0.0, config, compressed=True)


def rms_norm_backward(grad_out, x, weight, bias, eps, weight_offset=0.0, *, config=None):
    """Gradients of `rms_norm`: grad_out [..., D], x [..., D], weight, bias [D] or None.

    Returns (grad_x [..., D] in x.dtype, grad_weight [D] in weight.dtype or None,
    grad_bias [D] in bias.dtype or None).
    """
    if not _supported(x):
        return reference_backward(naive.rms_norm, grad_out, x, weight, bias, eps, weight_offset)
    return _bwd(grad_out, x, weight, bias, eps, weight_offset, config, compressed=False)


def crms_norm_backward(grad_out, x, weight, bias, eps, *, config=None):
    """Gradients of `crms_norm`: grad_out [..., D], x [..., D-1], weight, bias [D] or None.

    Returns (grad_x [..., D-1] in x.dtype, grad_weight [D] or None, grad_bias [D] or None).
    """
    if not _supported(x):
        return reference_backward(naive.crms_norm, grad_out, x, weight, bias, eps)
    return _bwd(grad_out, x, weight, bias, eps, 0.0, config, compressed=True)


def reference_backward(reference, grad_out, x, weight, bias, *extra):
    """Autograd through the reference, for dtypes the kernels do not take (fp64)."""
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(True) for t in (x, weight, bias)]
        out = reference(*leaves, *extra)
        wanted = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return tuple(None if t is None else next(grads) for t in leaves)
