"""ONNX translation of `rewriter::agent_attention`.

Pooling the agents is linear in q, so it is one constant matrix P [n, N] (computed by
running the reference's own pooling on an identity basis) and A = P·q.
"""
from __future__ import annotations

import torch
from onnxscript import opset18 as op

from .._onnx import const, dense_attention, repeat_kv, static, to_float
from .naive import agent_tokens


def agent_attention(q, k, v, key_mask, num_agents: int, scale: float, grid, prefix: int):
    heads = static(q, 1, "agent_attention")
    n_tokens = static(q, 2, "agent_attention (agent pooling)")
    basis = torch.eye(n_tokens).reshape(1, 1, n_tokens, n_tokens)
    pool = agent_tokens(basis, num_agents, tuple(grid) if grid else None, prefix)[0, 0]  # [n, N]
    qf = to_float(q)
    kf, vf = to_float(repeat_kv(k, heads)), to_float(repeat_kv(v, heads))
    agents = op.MatMul(const(pool), qf)  # [B, H, n, D]
    s = op.Constant(value_float=scale)
    agent_v = dense_attention(op.Mul(agents, s), kf, vf, key_mask)  # agents read the keys
    return op.CastLike(dense_attention(op.Mul(qf, s), agents, agent_v), q)  # queries read the agents
