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

__all__ = ["RMS_NORM_RULES", "NORM_OP_RULES", "unmatched_reduction_reason"]

D = 8


def _x(dtype=torch.float32):
    return torch.randn(2, 3, D, dtype=dtype)


# --- RMSNorm core: x / sqrt(mean(x²) + eps) -------------------------------------------

def _rms_core(x, *, square: str, inv: str, cast: str):
    h = x.float() if cast != "none" else x
    v = (h.pow(2) if square == "pow" else h * h).mean(-1, keepdim=True)
    src = x if cast == "variance_only" else h
    if inv == "rsqrt":
        n = src * torch.rsqrt(v + 1e-6)
    elif inv == "rsqrt_first":
        n = torch.rsqrt(v + 1e-6) * src
    else:
        n = src / torch.sqrt(v + 1e-6)
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


# --- RMSNorm as an L2 normalisation: F.normalize(x, dim=-1) * sqrt(d) (x-transformers) ------

def _l2_core(x, *, clamp: bool, order: str):
    n = F.normalize(x, dim=-1) if clamp else x / x.norm(dim=-1, keepdim=True)
    return n * D ** 0.5 if order == "n*c" else D ** 0.5 * n


_NORM = (aten.linalg_vector_norm, "norm")
_CLAMP = (aten.clamp_min, "clamp_min")
_MUL = (aten.mul, operator.mul, torch.mul, "mul")


def _l2_parts(m: Match) -> tuple[float, float]:
    """(p of the norm, the clamp's minimum or 0) as written."""
    norm = m.one(*_NORM)
    a = args_of(norm) if isinstance(norm.target, torch._ops.OpOverload) else \
        {"ord": (norm.args[1:2] or [norm.kwargs.get("p", 2)])[0], "dim": norm.kwargs.get("dim"),
         "keepdim": norm.kwargs.get("keepdim", False)}
    clamp = m.one(*_CLAMP)
    low = clamp.args[1] if clamp is not None else 0.0
    return a, low


def _l2_scale(m: Match):
    mul = m.one(*_MUL)
    return mul.args[1] if m.variant["order"] == "n*c" else mul.args[0]


def _check_l2_core(m: Match) -> str | None:
    a, low = _l2_parts(m)
    x = val(m.inputs["x"])
    if a.get("ord") != 2 or not _last_dim_only(a.get("dim"), x.dim()) or not a.get("keepdim"):
        return f"an L2 norm it cannot read (ord {a.get('ord')}, dims {a.get('dim')}, keepdim {a.get('keepdim')})"
    if not is_number(low) or low < 0:
        return "the norm's clamp is not a non-negative constant"
    c, d = _l2_scale(m), x.shape[-1]
    if not is_number(c) or not isinstance(d, int) or abs(c - d ** 0.5) > 1e-6 * d ** 0.5:
        return f"an L2 normalisation scaled by {c!r}, not sqrt(d) = {d ** 0.5:.4g}: not an RMSNorm"
    return None


def _rewrite_l2_core(m: Match, gm) -> torch.fx.Node:
    # x / max(|x|, c) · sqrt(d) = x / sqrt(mean(x²) + eps) with eps = c²/d wherever |x| ≥ c
    _, low = _l2_parts(m)
    d = val(m.inputs["x"]).shape[-1]
    return call(gm.graph, RMS, (m.inputs["x"], None, None, float(low) ** 2 / d, 0.0), like=m.output)


# --- LayerNorm written by hand: (x - mean) / sqrt(var + eps) [* w] [+ b] -> aten.layer_norm -----
# made the ATen op, so the residual-stream conversion and the op rewrite treat it as nn.LayerNorm

def _hand_layer_norm(x, w, b, *, var: str, inv: str, affine: str):
    c = x - x.mean(-1, keepdim=True)
    if var == "var":
        v = x.var(-1, keepdim=True, unbiased=False)
    elif var == "centred_pow":
        v = c.pow(2).mean(-1, keepdim=True)
    else:  # centred_mul
        v = (c * c).mean(-1, keepdim=True)
    if inv == "rsqrt":
        n = c * torch.rsqrt(v + 1e-5)
    else:
        n = c / torch.sqrt(v + 1e-5)
    if affine == "w*n+b":
        return w * n + b
    if affine == "n*w+b":
        return n * w + b
    if affine == "n*w":
        return n * w
    return n


_VAR = (aten.var, "var")
_SUB = (aten.sub, operator.sub, "sub")


def _hand_ln_eps(m: Match) -> float | None:
    add = m.one(*_ADD) if m.variant["affine"] not in ("w*n+b", "n*w+b") else \
        next((a for a in m.find(*_ADD) if not isinstance(a.args[1], torch.fx.Node)), None)
    return float(add.args[1]) if add is not None and is_number(add.args[1]) else None


def _check_hand_ln(m: Match) -> str | None:
    x = val(m.inputs["x"])
    for mean in m.find(*_MEAN):
        a = _mean_args(mean)
        if not _last_dim_only(a.get("dim"), val(mean.args[0]).dim()) or not a.get("keepdim"):
            return f"mean over dims {a.get('dim')} (keepdim={a.get('keepdim')}); LayerNorm needs the last dim, keepdim"
    var = m.one(*_VAR)
    if var is not None:
        a = args_of(var) if isinstance(var.target, torch._ops.OpOverload) else dict(var.kwargs)
        correction = a.get("correction", 0 if a.get("unbiased") is False else 1)
        if correction not in (0, 0.0) or not _last_dim_only(a.get("dim"), x.dim()) or not a.get("keepdim"):
            return "the variance is not the biased variance over the last dim (unbiased=False)"
    eps = _hand_ln_eps(m)
    if eps is None or eps < 0:
        return "epsilon is not a non-negative constant"
    for name in ("w", "b"):
        t = val(m.inputs.get(name)) if name in m.inputs else None
        if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != x.shape[-1]):
            return f"{'gain' if name == 'w' else 'bias'} of shape {tuple(getattr(t, 'shape', ()))} is not per-channel [{x.shape[-1]}]"
    if val(m.output).shape != x.shape:
        return "result does not have the input's shape"
    return None


def _rewrite_hand_ln(m: Match, gm) -> torch.fx.Node:
    x = m.inputs["x"]
    return call(gm.graph, aten.layer_norm.default,
                (x, [val(x).shape[-1]], m.inputs.get("w"), m.inputs.get("b"), _hand_ln_eps(m), False), like=m.output)


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
        "hand_layer_norm", "layer_norm", "aten.layer_norm", _hand_layer_norm,
        lambda v: {"x": _x(), "w": torch.randn(D), "b": torch.randn(D)}, _check_hand_ln, _rewrite_hand_ln,
        variants={"var": ["var", "centred_pow", "centred_mul"], "inv": ["rsqrt", "div_sqrt"],
                  "affine": ["w*n+b", "n*w+b", "n*w", "none"]},
    ),
    Rule(
        "rms_norm_core", "rms_norm", "rewriter.rms_norm", _rms_core,
        lambda v: {"x": _x(torch.bfloat16 if v["cast"] != "none" else torch.float32)},
        _check_rms_core, _rewrite_rms_core,
        variants={"square": ["pow", "mul"], "inv": ["rsqrt", "rsqrt_first", "div_sqrt"],
                  "cast": ["none", "roundtrip", "in", "variance_only"]},
    ),
    Rule(
        "rms_norm_l2", "rms_norm", "rewriter.rms_norm", _l2_core, lambda v: {"x": _x()},
        _check_l2_core, _rewrite_l2_core, variants={"clamp": [True, False], "order": ["n*c", "c*n"]},
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


# --- normalisation-like reductions no rule took: each gets a reason -------------------------

_REDUCTIONS = {aten.std.correction: "layer_norm", aten.std.dim: "layer_norm", aten.var.correction: "layer_norm",
               aten.var.dim: "layer_norm", aten.var_mean.correction: "layer_norm",
               aten.linalg_vector_norm.default: "rms_norm", aten.norm.ScalarOpt_dim: "rms_norm"}
_ELEMENTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.sqrt.default,
                aten.rsqrt.default, aten.clamp_min.default, aten.expand_as.default, aten.reciprocal.default}


def _keepdim_last(node: torch.fx.Node) -> bool:
    a = args_of(node)
    x = val(node.args[0])
    return bool(a.get("keepdim")) and isinstance(x, torch.Tensor) and _last_dim_only(a.get("dim"), x.dim())


def _rescales_its_input(node: torch.fx.Node) -> bool:
    """Whether the reduction's value (a few elementwise ops on) divides or multiplies a value
    computed from the reduced input: the shape of a normalisation."""
    x, todo, seen = node.args[0], [(u, 0) for u in node.users], set()
    while todo:
        u, d = todo.pop()
        if u in seen or u.op != "call_function" or u.target not in _ELEMENTWISE or d > 4:
            continue
        seen.add(u)
        if u.target in (aten.div.Tensor, aten.mul.Tensor):
            other = [a for a in u.args[:2] if isinstance(a, torch.fx.Node) and a not in seen and a is not node]
            if any(_reads(o, x) for o in other):
                return True
        todo.extend((w, d + 1) for w in u.users)
    return False


def _reads(node: torch.fx.Node, x: torch.fx.Node, depth: int = 3) -> bool:
    """Whether `node` is `x` or computed from it within `depth` ops."""
    return node is x or (depth > 0 and any(_reads(a, x, depth - 1) for a in node.all_input_nodes))


def unmatched_reduction_reason(node: torch.fx.Node) -> tuple[str, str] | None:
    """(kind, reason) for a normalisation-like reduction that no rule rewrote, else None."""
    kind = _REDUCTIONS.get(node.target) if node.op == "call_function" else None
    if kind is None or not _keepdim_last(node) or not _rescales_its_input(node):
        return None
    a = args_of(node)
    if kind == "layer_norm":
        correction = a.get("correction", 0 if a.get("unbiased") is False else 1)
        after = {u.target for u in node.users}
        if node.target in (aten.std.correction, aten.std.dim) and aten.add.Tensor in after:
            return kind, ("(x - mean) / (std + eps): epsilon outside the root is not a LayerNorm (the Annotated "
                          "Transformer's form); left as written")
        if correction not in (0, 0.0, None):
            return kind, "normalised by the unbiased variance (nn.LayerNorm uses the biased one); left as written"
        return kind, "a LayerNorm-like normalisation written in a form no pattern covers; left as written"
    return kind, ("an L2 normalisation that is not RMSNorm's (not F.normalize(x, dim=-1) · sqrt(d)); left as written")
