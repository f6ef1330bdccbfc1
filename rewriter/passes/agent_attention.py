"""Softmax attention → Agent Attention (Han et al., ECCV 2024): a few agent tokens pooled
from the queries summarise the keys, then broadcast back; usable without training."""
from __future__ import annotations

import torch

from .. import kernels  # noqa: F401  (registers torch.ops.rewriter)
from ..graph import call
from ._layout import infer_grid
from .approximate import Form

OP = torch.ops.rewriter.agent_attention.default


def _build(gm, s, p):
    if s.causal:
        return None, "agent attention is non-causal; this site is causal (use linear or sliding_window)", {}
    n = int(p["num_agents"])
    if n < 1:
        raise ValueError(f"num_agents must be >= 1, not {n}")
    grid, prefix = [], 0
    if s.same_tokens:  # pool agents over the image grid where there is one, else over the sequence
        g, pre, _ = infer_grid(gm.graph, s.n_tokens, p["grid"], p["prefix"])
        if g is not None:
            grid, prefix = list(g), pre
    used = {"num_agents": n, "grid": grid, "prefix": prefix, "scale": s.scale}
    node = call(gm.graph, OP, (s.q, s.k, s.v, s.key_mask, n, s.scale, grid, prefix), like=s.node)
    return node, None, used


FORMS = {
    "agent": Form("agent", "agent_attention", {"num_agents": 49, "grid": None, "prefix": None}, _build),
}
