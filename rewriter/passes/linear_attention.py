"""Softmax attention → linear attention (Katharopoulos et al.; FLatten's focused map;
TransNormer's output normalisation). Causal sites become the chunked causal form."""
from __future__ import annotations

import torch

from .. import kernels  # noqa: F401  (registers torch.ops.rewriter)
from ..graph import call
from ..kernels.linear_attention.naive import FEATURE_MAPS, NORMALIZATIONS
from .approximate import Form

OP = torch.ops.rewriter.linear_attention.default


def _build(gm, s, p):
    if p["feature_map"] not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, not {p['feature_map']!r}")
    if p["normalize"] not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {p['normalize']!r}")
    if s.causal and not s.same_tokens:
        return None, "causal attention between different query and key lengths", {}
    used = {"feature_map": p["feature_map"], "normalize": p["normalize"], "power": float(p["power"]),
            "eps": float(p["eps"])}
    node = call(gm.graph, OP, (s.q, s.k, s.v, s.key_mask, used["feature_map"], s.causal, used["normalize"],
                               used["power"], used["eps"]), like=s.node)
    return node, None, used


FORMS = {
    "linear": Form("linear", "linear_attention",
                   {"feature_map": "elu", "normalize": "denominator", "power": 3.0, "eps": 1e-6}, _build),
}
