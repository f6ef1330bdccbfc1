"""Normalisation sites → rewriter ops: RMSNorm fusion, and LayerNorm/RMSNorm ops → rewriter::.

RMSNorm is written in many ways (pow or x*x, rsqrt-mul or sqrt-div, casts to fp32 and
back, `w * h`, `h * w`, `(1 + w) * h`). Two rules compose them: the core normalisation
becomes `rewriter::rms_norm(x, None, None, eps)`, then a fold absorbs the gain.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from .. import kernels  # noqa: F401  (registers torch.ops.rewriter)
from ..graph import call, val
from ._args import args_of, is_number
from ._rules import Match, Rule

aten = torch.ops.aten
RMS = torch.ops.rewriter.rms_norm.default
LN = torch.ops.rewriter.layer_norm.default

__all__ = ["RMS_NORM_RULES", "NORM_OP_RULES"]

D = 8


def _x(dtype=torch.float32):
    return torch.randn(2, 3, D, dtype=dtype)


# --- RMSNorm core: x / sqrt(mean(x²) + eps) -------------------------------------------

def _rms_core(x, *, square: str, inv: str, cast: str):
    h = x.float() if cast != "none" else x
    v = (h.pow(2) if square == "pow" else h * h).mean(-1, keepdim=True)
    src = x if cast == "variance_only" else h
    n = src * torch.rsqrt(v + 1e-6) if inv == "rsqrt" else src / torch.sqrt(v + 1e-6)
    return n.to(x.dtype) if cast == "roundtrip" else n


def _last_dim_only(dims, ndim) -> bool:
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return len(dims) == 1 and dims[0] in (-1, ndim - 1)


# symbolic_trace graphs spell these as torch functions, operators and Tensor methods (string targets)
_POW = (aten.pow, torch.pow, torch.Tensor.pow, "pow")
_MEAN = (aten.mean, torch.mean, "mean")
_ADD = (aten.add, operator.add, torch.add, "add")


def _mean_args(mean) -> dict:
    """dim and keepdim of a mean node, an ATen op or a symbolic_trace `x.mean(...)`/`torch.mean(...)`."""
    if mean.op == "call_function" and isinstance(mean.target, torch._ops.OpOverload):
        return args_of(mean)
    a = dict(zip(("input", "dim", "keepdim"), mean.args)) | dict(mean.kwargs)
    return {"dim": a.get("dim"), "keepdim": a.get("keepdim", False)}


def _check_rms_core(m: Match) -> str | None:
    sq = m.one(*_POW)
    exponent = sq.args[1] if sq is not None and len(sq.args) > 1 else (sq.kwargs.get("exponent") if sq is not None else 2)
    if exponent != 2:  # read directly: a Tensor method node (string target) has no schema to normalise
        return "the square is not x**2"
    mean = m.one(*_MEAN)
    if mean is None:
        return "no mean over the last dim"
    a = _mean_args(mean)
    x = val(mean.args[0])
    if not _last_dim_only(a.get("dim"), x.dim()) or not a.get("keepdim"):
        return f"mean over dims {a.get('dim')} (keepdim={a.get('keepdim')}); RMSNorm needs the last dim, keepdim"
    add = m.one(*_ADD)
    if add is None or not is_number(add.args[1]) or add.args[1] < 0:
        return "epsilon is not a non-negative constant"
    if val(m.output).shape != val(m.inputs["x"]).shape:
        return "result does not have the input's shape"
    return None


def _rewrite_rms_core(m: Match, gm) -> torch.fx.Node:
    eps = float(m.one(*_ADD).args[1])
    cast = m.variant["cast"]
    x = m.inputs["x"]
    if cast in ("in", "variance_only"):  # normalise the fp32 copy, as the original did
        x = m.one(aten.to, aten._to_copy)
    return call(gm.graph, RMS, (x, None, None, eps, 0.0), like=m.output)


# --- gain fold: rms_norm(x) * w, (1 + w) * rms_norm(x) ... --------------------------------

def _rms_gain(x, w, *, order: str, wcast: bool, ocast: bool):
    n = RMS(x, None, None, 1e-6, 0.0)
    g = w.float() if wcast else w
    if order == "w*n":
        y = g * n
    elif order == "n*w":
        y = n * g
    elif order == "(c+w)*n":
        y = (1.0 + g) * n
    else:  # "n*(c+w)"
        y = n * (1.0 + g)
    return y.to(torch.bfloat16) if ocast else y


def _gain_inputs(v):
    dt = torch.bfloat16 if (v["wcast"] or v["ocast"]) else torch.float32
    return {"x": _x(torch.float32 if v["ocast"] else dt), "w": torch.randn(D, dtype=dt)}


def _check_rms_gain(m: Match) -> str | None:
    norm = m.one(RMS)
    a = args_of(norm)
    if a["weight"] is not None or a["bias"] is not None:
        return "norm already has a gain"
    w, x = val(m.inputs["w"]), val(norm)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.shape[0] != x.shape[-1]:
        return f"scale of shape {tuple(getattr(w, 'shape', ()))} is not a per-channel gain [{x.shape[-1]}]"
    if m.variant["order"].startswith(("(c", "n*(")) and not is_number(m.one(aten.add).args[1]):
        return "gain offset is not a constant"
    if not isinstance(m.inputs["w"], torch.fx.Node):
        return "gain is not a tensor"
    return None


def _rewrite_rms_gain(m: Match, gm) -> torch.fx.Node:
    norm = m.one(RMS)
    a = args_of(norm)
    offset = float(m.one(aten.add).args[1]) if "c+w" in m.variant["order"] else 0.0
    out = call(gm.graph, RMS, (a["input"] if "input" in a else norm.args[0], m.inputs["w"], None, a["eps"], offset), like=m.output)
    want = val(m.output).dtype
    return out if val(out).dtype == want else call(gm.graph, aten.to.dtype, (out, want), like=m.output)


# --- existing norm ops → rewriter ops ---------------------------------------------------

# the normalized shape is a literal (a wildcard to the matcher; the check reads it), so
# the same pattern matches export graphs and symbolic_trace graphs of nn.LayerNorm
def _layer_norm(x, w, b):
    return F.layer_norm(x, (D,), w, b, 1e-5)


def _rms_norm_op(x, w):
    return F.rms_norm(x, (D,), w, 1e-6)


def _check_norm_op(m: Match) -> str | None:
    node = m.output
    a = args_of(node)
    shape = a.get("normalized_shape")
    if shape is None or len(shape) != 1:
        return f"normalises over {len(shape or [])} trailing dims; rewriter norms cover the last dim only"
    if a.get("eps") is None and node.target != aten.rms_norm.default:
        return "epsilon unknown"
    return None


def _rewrite_layer_norm(m: Match, gm) -> torch.fx.Node:
    a = args_of(m.output)
    return call(gm.graph, LN, (a["input"], a.get("weight"), a.get("bias"), float(a["eps"])), like=m.output)


def _rewrite_rms_op(m: Match, gm) -> torch.fx.Node:
    a = args_of(m.output)
    x = a["input"]
    eps = a.get("eps")
    if eps is None:  # F.rms_norm's default: the dtype's machine epsilon
        eps = torch.finfo(val(x).dtype).eps
    return call(gm.graph, RMS, (x, a.get("weight"), None, float(eps), 0.0), like=m.output)


RMS_NORM_RULES = [
    Rule(
        "rms_norm_core", "rms_norm", "rewriter.rms_norm", _rms_core,
        lambda v: {"x": _x(torch.bfloat16 if v["cast"] != "none" else torch.float32)},
        _check_rms_core, _rewrite_rms_core,
        variants={"square": ["pow", "mul"], "inv": ["rsqrt", "div_sqrt"],
                  "cast": ["none", "roundtrip", "in", "variance_only"]},
    ),
    Rule(
        "rms_norm_gain", "rms_norm", "rewriter.rms_norm", _rms_gain, _gain_inputs,
        _check_rms_gain, _rewrite_rms_gain,
        variants={"order": ["w*n", "n*w", "(c+w)*n", "n*(c+w)"], "wcast": [False, True], "ocast": [False, True]},
        extends=True,  # completes the site the core rule recorded
    ),
    Rule(
        "rms_norm_op", "rms_norm", "rewriter.rms_norm", _rms_norm_op,
        lambda v: {"x": _x(), "w": torch.randn(D)}, _check_norm_op, _rewrite_rms_op,
    ),
]

NORM_OP_RULES = [
    Rule(
        "layer_norm_op", "layer_norm", "rewriter.layer_norm", _layer_norm,
        lambda v: {"x": _x(), "w": torch.randn(D), "b": torch.randn(D)}, _check_norm_op, _rewrite_layer_norm,
    ),
]
