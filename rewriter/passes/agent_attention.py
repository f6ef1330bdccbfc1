"""Softmax attention → Agent Attention (Han et al., ECCV 2024): a few agent tokens pooled
from the queries summarise the keys, then broadcast back; usable without training.

With `learnable=`, trainable per-head maps of q and k are put in the graph before the op
(for `rewriter.calibrate`): the op pools its agents from the mapped queries, so
"temperature" (q·t_q, k·t_k) sets both softmaxes' temperatures per head (t_q² for the
queries reading the agents, t_q·t_k for the agents reading the keys), and "projection"
(q W_q, k W_k, D×D per head) learns the bilinear forms of both softmaxes. Both start at
the identity: before calibration the result is the plain rewrite's.
"""
from __future__ import annotations

import torch

from .. import kernels  # noqa: F401  (registers torch.ops.rewriter)
from ..graph import call, val
from ._layout import infer_grid
from .approximate import Form, new_parameter

OP = torch.ops.rewriter.agent_attention.default
aten = torch.ops.aten
LEARNABLE = (False, "temperature", "projection")


def _learned_map(gm, s, x, role: str, kind: str):
    """x [B, heads, N, D] -> x·t (t [heads, 1, 1]) or x W (W [heads, D, D]), starting at the identity."""
    fake = val(x)
    heads, d = int(fake.shape[1]), int(fake.shape[-1])
    if kind == "temperature":
        t = new_parameter(gm, s, f"agent_{role}_temperature", torch.ones(heads, 1, 1, dtype=fake.dtype))
        return call(gm.graph, aten.mul.Tensor, (x, t), like=s.node)
    w = new_parameter(gm, s, f"agent_{role}_projection", torch.eye(d, dtype=fake.dtype).expand(heads, d, d).contiguous())
    return call(gm.graph, aten.matmul.default, (x, w), like=s.node)


def _build(gm, s, p):
    if s.causal:
        return None, "causal attention: agent attention is non-causal only (use linear or sliding_window)", {}
    n = int(p["num_agents"])
    if n < 1:
        raise ValueError(f"num_agents must be >= 1, not {n}")
    learnable = "projection" if p["learnable"] is True else p["learnable"]
    if learnable not in LEARNABLE:
        raise ValueError(f"learnable must be one of {LEARNABLE} (True = 'projection'), not {p['learnable']!r}")
    grid, prefix = [], 0
    if s.same_tokens:  # pool agents over the image grid where there is one, else over the sequence
        g, pre, _ = infer_grid(gm.graph, s.n_tokens, p["grid"], p["prefix"])
        if g is not None:
            grid, prefix = list(g), pre
    used = {"num_agents": n, "grid": grid, "prefix": prefix, "scale": s.scale}
    q, k = s.q, s.k
    if learnable:
        q, k = _learned_map(gm, s, s.q, "q", learnable), _learned_map(gm, s, s.k, "k", learnable)
        used["learnable"] = learnable
    node = call(gm.graph, OP, (q, k, s.v, s.key_mask, n, s.scale, grid, prefix), like=s.node)
    return node, None, used


FORMS = {
    "agent": Form("agent", "agent_attention", {"num_agents": 49, "grid": None, "prefix": None, "learnable": False},
                  _build),
}
