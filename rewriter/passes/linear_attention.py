"""Softmax attention → linear attention (Katharopoulos et al.; FLatten's focused map;
TransNormer's output normalisation; Hedgehog's learnable map). Causal sites become the
chunked causal form."""
from __future__ import annotations

import torch

from .. import kernels  # noqa: F401  (registers torch.ops.rewriter)
from ..graph import call, val
from ..kernels.linear_attention.naive import FEATURE_MAPS, NORMALIZATIONS
from .approximate import Form, new_parameter

OP = torch.ops.rewriter.linear_attention.default
aten = torch.ops.aten

# the fixed maps the op computes itself ("identity" is the op's input for a learned map,
# not a choice here), plus Hedgehog's map, computed in the graph before the op
MAPS = tuple(m for m in FEATURE_MAPS if m != "identity") + ("hedgehog",)


def hedgehog(gm, s, x, role: str, dim: int):
    """Hedgehog's map (Zhang et al., ICLR 2024) as graph nodes: per head h,
    φ(x) = softmax([x W_h + b_h, -(x W_h + b_h)]) over 2·dim features, with W [heads, D, dim]
    initialised to the identity (a rectangular one when dim != D) and b [heads, 1, dim] to
    zero. Both are new parameters of the graph module (trained by `rewriter.calibrate`).
    x: [B, heads, N, D] -> [B, heads, N, 2·dim]."""
    fake = val(x)
    heads, d = int(fake.shape[1]), int(fake.shape[-1])
    eye = torch.eye(d, dim, dtype=fake.dtype)
    w = new_parameter(gm, s, f"hedgehog_{role}_weight", eye.expand(heads, d, dim).contiguous())
    b = new_parameter(gm, s, f"hedgehog_{role}_bias", torch.zeros(heads, 1, dim, dtype=fake.dtype))
    y = call(gm.graph, aten.add.Tensor, (call(gm.graph, aten.matmul.default, (x, w), like=s.node), b), like=s.node)
    both = call(gm.graph, aten.cat.default, ([y, call(gm.graph, aten.neg.default, (y,), like=s.node)], -1), like=s.node)
    return call(gm.graph, aten.softmax.int, (both, -1), like=s.node)


def _build(gm, s, p):
    if p["feature_map"] not in MAPS:
        raise ValueError(f"feature_map must be one of {MAPS}, not {p['feature_map']!r}")
    if p["normalize"] not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {p['normalize']!r}")
    if p["feature_dim"] is not None and p["feature_map"] != "hedgehog":
        raise ValueError("feature_dim is the width of feature_map='hedgehog'; the other maps keep the head dim")
    if s.causal and not s.same_tokens:
        return None, "causal attention between different query and key lengths", {}
    used = {"feature_map": p["feature_map"], "normalize": p["normalize"], "power": float(p["power"]),
            "eps": float(p["eps"])}
    q, k, op_map = s.q, s.k, used["feature_map"]
    if op_map == "hedgehog":
        dim = int(p["feature_dim"] or val(s.q).shape[-1])
        if dim < 1:
            raise ValueError(f"feature_dim must be >= 1, not {dim}")
        q, k, op_map = hedgehog(gm, s, s.q, "q", dim), hedgehog(gm, s, s.k, "k", dim), "identity"
        used["feature_dim"] = dim
    node = call(gm.graph, OP, (q, k, s.v, s.key_mask, op_map, s.causal, used["normalize"], used["power"],
                               used["eps"]), like=s.node)
    return node, None, used


FORMS = {
    "linear": Form("linear", "linear_attention",
                   {"feature_map": "elu", "normalize": "denominator", "power": 3.0, "eps": 1e-6, "feature_dim": None},
                   _build),
}
