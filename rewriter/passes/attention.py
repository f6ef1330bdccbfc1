"""Canonicalise every hand-written softmax attention into one SDPA node.

`softmax(q @ kᵀ · scale + mask) @ v`, in its many spellings (matmul, bmm, baddbmm with
an additive bias; scale by mul or div, a constant or a tensor; additive, masked_fill or
where masks, or a position bias and then a mask added (T5); softmax upcast to fp32 and cast back), becomes
`aten.scaled_dot_product_attention(q, k, v, attn_mask, scale=...)`. Approximate passes
rewrite only that node. Grouped-query attention whose K/V heads were repeated with
expand+reshape is folded into `enable_gqa=True`.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..graph import call, is_model_tensor, val
from ._args import args_of, is_number
from ._rules import Match, Rule

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
MASKED_ROWS_GUARD = "rewriter_masked_rows_guard"

__all__ = ["ATTENTION_RULES", "GQA_RULES", "sdpa", "drop_masked_rows_guard"]

B, H, L, E = 2, 2, 5, 4


def _attention(q, kt, v, scale, mask, fill, bias, *, mm: str, scale_op: str, mask_op: str, softmax_cast: str):
    if mm == "baddbmm":  # an additive bias of its own (e.g. ALiBi), scaled with the scores; then any mask
        s = torch.baddbmm(bias, q, kt)
    elif mm == "bmm":
        s = torch.bmm(q, kt)
    else:
        s = q @ kt
    if scale_op == "mul":
        s = s * scale
    elif scale_op == "rmul":
        s = scale * s
    elif scale_op == "div":
        s = s / scale
    if mask_op == "add":
        s = s + mask
    elif mask_op == "radd":
        s = mask + s
    elif mask_op == "add_bias_add":  # a position bias, then the mask (T5: scores + bias + mask)
        s = s + bias + mask
    elif mask_op == "fill":
        s = s.masked_fill(mask, float("-inf"))
    elif mask_op == "where":
        s = torch.where(mask, s, fill)
    elif mask_op == "where_scalar":
        s = torch.where(mask, s, -1e4)
    if softmax_cast == "cast_in":
        p = torch.softmax(s.float(), -1).to(v.dtype)
    elif softmax_cast == "cast_out":
        p = torch.softmax(s, -1, dtype=torch.float32).to(v.dtype)
    else:
        p = torch.softmax(s, -1)
    return torch.bmm(p, v) if mm in ("bmm", "baddbmm") else p @ v


def _inputs(v: dict) -> dict[str, torch.Tensor]:
    dt = torch.bfloat16 if v["softmax_cast"] != "none" else torch.float32
    lead = (B * H,) if v["mm"] in ("bmm", "baddbmm") else (B, H)
    bool_mask = v["mask_op"] in ("fill", "where", "where_scalar")
    return {
        "q": torch.randn(*lead, L, E, dtype=dt),
        "kt": torch.randn(*lead, E, L, dtype=dt),
        "v": torch.randn(*lead, L, E, dtype=dt),
        "scale": torch.tensor(0.5, dtype=dt),
        "mask": torch.rand(*lead, L, L) > 0.5 if bool_mask else torch.randn(*lead, L, L, dtype=dt),
        "fill": torch.tensor(-1e4, dtype=dt),
        "bias": torch.randn(*lead, L, L, dtype=dt),
    }


def _needs(v: dict) -> set[str]:
    ops = {"softmax", "bmm" if v["mm"] != "matmul" else "matmul"}
    if v["mm"] == "baddbmm":
        ops.add("baddbmm")
    ops |= {"mul": {"mul"}, "rmul": {"mul"}, "div": {"div"}, "none": set()}[v["scale_op"]]
    ops |= {"add": {"add"}, "radd": {"add"}, "add_bias_add": {"add"}, "fill": {"masked_fill"}, "where": {"where"},
            "where_scalar": {"where"}, "none": set()}[v["mask_op"]]
    if v["softmax_cast"] != "none":
        ops.add("to")
    return ops


def _variants() -> dict[str, list]:
    return {
        "mm": ["matmul", "bmm", "baddbmm"],
        "scale_op": ["none", "mul", "rmul", "div"],
        "mask_op": ["none", "add", "radd", "add_bias_add", "fill", "where", "where_scalar"],
        "softmax_cast": ["none", "cast_in", "cast_out"],
    }


def _const_scalar(x) -> float | None:
    """The value of a scalar known at rewrite time (a literal, or a constant 0-d tensor op)."""
    if is_number(x):
        return float(x)
    if not isinstance(x, fx.Node):
        return None
    v = val(x)
    if isinstance(v, torch.Tensor) and v.numel() != 1:
        return None
    if x.op == "get_attr":
        t = getattr(x.graph.owning_module, x.target, None) if "." not in x.target else None
        if t is None:
            mod = x.graph.owning_module
            for part in x.target.split("."):
                mod = getattr(mod, part)
            t = mod
        if is_model_tensor(x.graph.owning_module, t):
            return None  # the model's own parameter or buffer (a temperature): read at run time, never baked
        return float(t) if isinstance(t, torch.Tensor) and t.numel() == 1 else None
    if x.op == "call_function" and x.target in (aten.full.default, aten.scalar_tensor.default, aten.tensor.float):
        a = args_of(x)
        fill = a.get("fill_value", a.get("s", a.get("t")))
        return float(fill) if is_number(fill) else None
    if x.op == "call_function" and x.target in (aten.sqrt.default, aten.reciprocal.default):
        inner = _const_scalar(x.args[0])
        if inner is None:
            return None
        return math.sqrt(inner) if x.target == aten.sqrt.default else 1.0 / inner
    return None


def _check(m: Match) -> str | None:
    sm = m.one(aten.softmax, aten._softmax, torch.softmax, torch.nn.functional.softmax)
    a = args_of(sm)
    scores = val(sm.args[0])
    if a.get("dim") not in (-1, scores.dim() - 1):
        return f"softmax over dim {a.get('dim')}, not the key dim"
    if a.get("dtype") not in (None, torch.float32, torch.float64):
        return f"softmax in {a.get('dtype')}"
    q, kt, v = (val(m.inputs[n]) for n in ("q", "kt", "v"))
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (q, kt, v)):
        return "q, k, v are not floating-point tensors"
    if not (q.dim() == kt.dim() == v.dim() and q.dim() in (3, 4)):
        return f"q, k, v have ranks {q.dim()}, {kt.dim()}, {v.dim()}; canonical attention takes equal ranks 3 or 4"
    if not (q.shape[:-2] == kt.shape[:-2] == v.shape[:-2]):
        return "q, k, v batch dims differ (broadcast attention)"
    if m.variant["scale_op"] != "none":
        s = m.inputs["scale"]
        sv = val(s)
        # a literal, a one-element tensor, or a Python number computed at run time (a
        # symbolic_trace graph's `math.sqrt(x.shape[-1])`: the rewrite scales q by that node)
        if not (is_number(s) or is_number(sv) or (isinstance(sv, torch.Tensor) and sv.numel() == 1)):
            return "scores are scaled by a tensor that is not a scalar"
    if m.variant["mm"] == "baddbmm":
        bm = m.one(aten.baddbmm, torch.baddbmm)
        ba = args_of(bm)
        if ba.get("beta", 1) != 1 or ba.get("alpha", 1) != 1:
            return "baddbmm with alpha/beta ≠ 1"
    if m.variant["mm"] == "baddbmm" or m.variant["mask_op"] == "add_bias_add":
        bv = val(m.inputs["bias"])
        if not (isinstance(bv, torch.Tensor) and bv.is_floating_point()):
            return "the bias added to the scores is not a floating-point tensor"
    mask_op = m.variant["mask_op"]
    if mask_op != "none":
        mv = val(m.inputs["mask"])
        if not isinstance(mv, torch.Tensor):
            return "mask is not a tensor"
        want_bool = mask_op in ("fill", "where", "where_scalar")
        if want_bool != (mv.dtype == torch.bool):
            return f"mask dtype {mv.dtype} does not fit a {'boolean' if want_bool else 'additive'} mask"
        if mask_op == "fill":
            fill = m.one(aten.masked_fill, "masked_fill").args[2]
            if not is_number(fill):
                return "masked_fill value is not a constant"
        if mask_op == "where":
            fv = val(m.inputs["fill"])
            if isinstance(fv, torch.Tensor) and fv.numel() != 1:
                return "where() fill is not a scalar"
    return None


def _key_of(kt: fx.Node, graph: fx.Graph) -> fx.Node:
    """k from kᵀ: reuse the transpose's input when kᵀ is a transpose of the last two dims."""
    nd = val(kt).dim()
    last2 = {(-2, -1), (-1, -2), (nd - 2, nd - 1), (nd - 1, nd - 2), (-2, nd - 1), (nd - 2, -1), (-1, nd - 2), (nd - 1, -2)}
    if kt.op == "call_function" and kt.target == aten.transpose.int and tuple(kt.args[1:3]) in last2:
        return kt.args[0]
    if kt.op == "call_function" and kt.target == aten.permute.default:
        perm = [p % nd for p in kt.args[1]]
        if perm == list(range(nd - 2)) + [nd - 1, nd - 2]:
            return kt.args[0]
    return call(graph, aten.transpose.int, (kt, -2, -1), like=kt)


def sdpa(g: fx.Graph, q, k, v, mask=None, *, scale=None, is_causal=False, enable_gqa=False, like=None) -> fx.Node:
    """An SDPA node with every argument spelled out (see graph.spell_out_arguments)."""
    return call(g, SDPA, (q, k, v, mask, 0.0, is_causal), {"scale": scale, "enable_gqa": enable_gqa}, like=like)


def _rewrite(m: Match, gm: fx.GraphModule) -> fx.Node:
    g = gm.graph
    q, kt, v = m.inputs["q"], m.inputs["kt"], m.inputs["v"]
    dtype = val(q).dtype
    k = _key_of(kt, g)
    scale = 1.0
    op = m.variant["scale_op"]
    if op != "none":
        s = m.inputs["scale"]
        c = _const_scalar(s)
        if c is not None:
            scale = 1.0 / c if op == "div" else c
        else:  # a runtime scalar: scale q by it, exactly as the scores were
            q = call(g, aten.div.Tensor if op == "div" else aten.mul.Tensor, (q, s), like=m.output)
    bias = None
    if m.variant["mm"] == "baddbmm":  # (bias + q·kᵀ)·scale: the scale applies to the bias too
        bias = m.inputs["bias"]
        if val(bias).dtype != dtype:
            bias = call(g, aten.to.dtype, (bias, dtype), like=m.output)
        if op != "none":
            bias = call(g, aten.div.Tensor if op == "div" else aten.mul.Tensor, (bias, m.inputs["scale"]), like=m.output)
    mask = None
    mask_op = m.variant["mask_op"]
    rows = None  # (bool node: rows with every key masked, what the original gives there: "nan" or "uniform")
    if mask_op in ("add", "radd", "add_bias_add"):
        mask = m.inputs["mask"]
        rows = (call(g, aten.all.dim, (call(g, aten.isneginf.default, (mask,), like=m.output), -1, True),
                     like=m.output), "nan")
        if mask_op == "add_bias_add":  # s + b + m = s + (b + m), up to rounding (verification decides)
            mask = call(g, aten.add.Tensor, (m.inputs["bias"], mask), like=m.output)
        if val(mask).dtype != dtype:
            mask = call(g, aten.to.dtype, (mask, dtype), like=m.output)
    elif mask_op == "fill":
        value = m.one(aten.masked_fill, "masked_fill").args[2]
        masked = m.inputs["mask"]
        rows = (call(g, aten.all.dim, (masked, -1, True), like=m.output), "nan" if value == float("-inf") else "uniform")
        if value == float("-inf"):
            mask = call(g, aten.logical_not.default, (masked,), like=m.output)
        else:
            zeros = call(g, aten.zeros_like.default, (masked,), {"dtype": dtype}, like=m.output)
            mask = call(g, aten.masked_fill.Scalar, (zeros, masked, value), like=m.output)
    elif mask_op in ("where", "where_scalar"):
        keep = m.inputs["mask"]
        fill = m.inputs["fill"] if mask_op == "where" else m.one(aten.where, torch.where).args[2]
        rows = (call(g, aten.logical_not.default, (call(g, aten.any.dim, (keep, -1, True), like=m.output),),
                     like=m.output), "nan" if _const_scalar(fill) == float("-inf") else "uniform")
        if _const_scalar(fill) == float("-inf"):
            mask = keep
        else:
            zeros = call(g, aten.zeros_like.default, (keep,), {"dtype": dtype}, like=m.output)
            if isinstance(fill, fx.Node):
                mask = call(g, aten.where.self, (keep, zeros, fill), like=m.output)
            else:
                mask = call(g, aten.masked_fill.Scalar, (zeros, call(g, aten.logical_not.default, (keep,), like=m.output), fill), like=m.output)
            if val(mask).dtype != dtype:
                mask = call(g, aten.to.dtype, (mask, dtype), like=m.output)
    if bias is not None:  # one additive mask: the bias where the mask keeps, -inf where it masks
        if mask is None:
            mask = bias
        elif val(mask).dtype == torch.bool:
            mask = call(g, aten.masked_fill.Scalar, (bias, call(g, aten.logical_not.default, (mask,), like=m.output),
                                                      float("-inf")), like=m.output)
        else:
            mask = call(g, aten.add.Tensor, (bias, mask), like=m.output)
    if val(q).dim() == 3:  # [B·H, L, E] (bmm style): the canonical node is 4-D, with a batch of one
        q, k, v = (call(g, aten.unsqueeze.default, (t, 0), like=m.output) for t in (q, k, v))
        if mask is not None and val(mask).dim() == 3:
            mask = call(g, aten.unsqueeze.default, (mask, 0), like=m.output)
        out = call(g, aten.squeeze.dim, (sdpa(g, q, k, v, mask, scale=scale, like=m.output), 0), like=m.output)
    else:
        out = sdpa(g, q, k, v, mask, scale=scale, like=m.output)
    want = val(m.output).dtype
    out = out if val(out).dtype == want else call(g, aten.to.dtype, (out, want), like=m.output)
    return out if rows is None else _as_the_original_where_fully_masked(g, out, m.inputs["v"], *rows, like=m.output)


def _as_the_original_where_fully_masked(g, out, v, rows, what: str, like) -> fx.Node:
    """Rows whose every key is masked: the original's softmax gives NaN (-inf scores) or is
    uniform over the keys (a finite fill replaces every score), where SDPA would not."""
    if what == "nan":
        guard = call(g, aten.where.ScalarSelf, (rows, float("nan"), out), like=like)
    else:
        mean = call(g, aten.mean.dim, (v, [-2], True), like=like)
        if val(mean).dtype != val(out).dtype:
            mean = call(g, aten.to.dtype, (mean, val(out).dtype), like=like)
        guard = call(g, aten.where.self, (rows, mean, out), like=like)
    guard.meta[MASKED_ROWS_GUARD] = True
    return guard


def drop_masked_rows_guard(attention: fx.Node, steps: int = 4) -> None:
    """Bypass the fully-masked-rows guard on an attention node's output (a few users on, past
    casts and squeezes) when its mask is known to leave every row a key (causal, a band)."""
    todo = [(u, 1) for u in attention.users]
    while todo:
        u, d = todo.pop()
        if u.meta.get(MASKED_ROWS_GUARD):
            u.replace_all_uses_with(u.args[2])
        elif d < steps:
            todo.extend((w, d + 1) for w in u.users)


ATTENTION_RULES = [
    Rule("softmax_attention", "attention", "sdpa", _attention, _inputs, _check, _rewrite,
         variants=_variants(), needs=_needs),
]


# --- grouped-query attention: fold repeat_kv (expand + reshape) into enable_gqa ----------

def _repeat_kv(x, n_rep: int = 2):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _gqa(q, k, v, mask, *, masked: bool):
    # is_causal, scale and enable_gqa are literals: wildcards to the matcher, read by the check
    return SDPA(q, _repeat_kv(k), _repeat_kv(v), mask if masked else None, 0.0, False, scale=0.5)


def _gqa_inputs(variant):
    return {"q": torch.randn(B, 4, L, E), "k": torch.randn(B, 2, L, E), "v": torch.randn(B, 2, L, E),
            "mask": torch.randn(B, 1, L, L)}


def _expand_of(m: Match) -> list[fx.Node]:
    return m.find(aten.expand)


def _check_gqa(m: Match) -> str | None:
    sd = m.output
    a = args_of(sd)
    if a.get("enable_gqa"):
        return "already grouped"
    if a.get("dropout_p"):
        return "attention dropout is active (a training-mode graph)"
    k, v, q = val(m.inputs["k"]), val(m.inputs["v"]), val(m.inputs["q"])
    if k.dim() != 4 or k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1] != 0:
        return "K/V heads do not divide the query heads"
    for e in _expand_of(m):  # each expand must repeat along the new group dim only
        src, out = val(e.args[0]), val(e)
        if out.dim() != 5 or src.shape[2] != 1 or out.shape[1] != src.shape[1] or out.shape[3:] != src.shape[3:]:
            return "K/V are expanded along a dim other than the head group"
        if out.shape[1] * out.shape[2] != q.shape[1]:
            return "repeated K/V heads do not match the query heads"
    return None


def _rewrite_gqa(m: Match, gm: fx.GraphModule) -> fx.Node:
    a = args_of(m.output)
    return sdpa(gm.graph, m.inputs["q"], m.inputs["k"], m.inputs["v"], a.get("attn_mask"), scale=a.get("scale"),
                is_causal=bool(a.get("is_causal")), enable_gqa=True, like=m.output)


GQA_RULES = [
    Rule("gqa_fold", "attention", "sdpa", _gqa, _gqa_inputs, _check_gqa, _rewrite_gqa,
         variants={"masked": [True, False]}, extends=True),
]
