"""The approximate-attention `rewriter::` ops: linear, agent, 1-D sliding window, 2-D
window (Swin) and 2-D neighbourhood attention.

Every op takes q [B, H, Nq, D], k [B, Hk, Nk, D], v [B, Hk, Nk, Dv] (Hk divides H), an
optional bool key mask [B, Nk] (False = padding), then its own options as plain scalars
and int lists (so a graph holding them exports and saves as `.pt2`), and returns
[B, H, Nq, Dv]. Tile and chunk sizes are not op arguments: they are the kernels'
configuration, picked at dispatch (defaults until the autotuner's cache says otherwise).
The references live in `<op>/naive.py`; each one is the spec of its op.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _dispatch  # noqa: E402  (this module is imported at the end of kernels/__init__)
from .agent_attention.naive import agent_attention as _agent
from .linear_attention.naive import linear_attention as _linear
from .window_attention.naive import neighborhood_attention_2d as _neighborhood
from .window_attention.naive import sliding_window_attention as _sliding
from .window_attention.naive import window_attention_2d as _window2d

__all__ = ["linear_attention", "agent_attention", "sliding_window_attention", "window_attention_2d",
           "neighborhood_attention_2d"]


# The references' trailing keyword arguments are their CPU knobs (`CPU_SPACE(S)` in each
# kernel's config.py), which the dispatch passes from the autotuner's cache.


def _linear_ref(q, k, v, key_mask, feature_map, causal, normalize, power, eps, chunk_size=64):
    return _linear(q, k, v, feature_map=feature_map, causal=causal, normalize=normalize, power=power, eps=eps,
                   key_mask=key_mask, chunk_size=chunk_size)


def _agent_ref(q, k, v, key_mask, num_agents, scale, grid, prefix):
    return _agent(q, k, v, num_agents=num_agents, scale=scale, grid=tuple(grid) if grid else None, prefix=prefix,
                  key_mask=key_mask)


def _sliding_ref(q, k, v, key_mask, window, causal, dilation, sinks, global_sinks, scale, **knobs):
    return _sliding(q, k, v, window=window, causal=causal, dilation=dilation, sinks=sinks,
                    global_sinks=global_sinks, scale=scale, key_mask=key_mask, **knobs)


def _window2d_ref(q, k, v, key_mask, grid, window, shift, prefix, scale, **knobs):
    return _window2d(q, k, v, grid=tuple(grid), window=tuple(window), shift=tuple(shift), prefix=prefix, scale=scale,
                     key_mask=key_mask, **knobs)


def _neighborhood_ref(q, k, v, key_mask, grid, kernel_size, dilation, prefix, scale, TILE_Y=8, TILE_X=8,  # noqa: N803
                      **knobs):
    return _neighborhood(q, k, v, grid=tuple(grid), kernel_size=tuple(kernel_size), dilation=tuple(dilation),
                         prefix=prefix, scale=scale, key_mask=key_mask, tile=(TILE_Y, TILE_X), **knobs)


@torch.library.custom_op("rewriter::linear_attention", mutates_args=())
def linear_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, feature_map: str, causal: bool,
                     normalize: str, power: float, eps: float) -> Tensor:
    """φ(q)·Σφ(k)ᵀv with φ ∈ {elu, relu, focused}; see linear_attention/naive.py."""
    return _dispatch("linear_attention", _linear_ref, q, k, v, key_mask, feature_map, causal, normalize, power, eps)


@torch.library.custom_op("rewriter::agent_attention", mutates_args=())
def agent_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, num_agents: int, scale: float,
                    grid: list[int], prefix: int) -> Tensor:
    """softmax(QAᵀ)·softmax(AKᵀ)V with agents A pooled from Q (grid [] = 1-D pooling)."""
    return _dispatch("agent_attention", _agent_ref, q, k, v, key_mask, num_agents, scale, grid, prefix)


@torch.library.custom_op("rewriter::sliding_window_attention", mutates_args=())
def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, window: int, causal: bool,
                             dilation: int, sinks: int, global_sinks: bool, scale: float) -> Tensor:
    """1-D local attention with dilation and sink/global tokens; see window_attention/naive.py."""
    return _dispatch("sliding_window_attention", _sliding_ref, q, k, v, key_mask, window, causal, dilation, sinks,
                     global_sinks, scale)


@torch.library.custom_op("rewriter::window_attention_2d", mutates_args=())
def window_attention_2d(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, grid: list[int],
                        window: list[int], shift: list[int], prefix: int, scale: float) -> Tensor:
    """Swin window attention over a token grid, shift folded into the indexing."""
    return _dispatch("window_attention_2d", _window2d_ref, q, k, v, key_mask, grid, window, shift, prefix, scale)


@torch.library.custom_op("rewriter::neighborhood_attention_2d", mutates_args=())
def neighborhood_attention_2d(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, grid: list[int],
                              kernel_size: list[int], dilation: list[int], prefix: int, scale: float) -> Tensor:
    """NAT/DiNAT neighbourhood attention over a token grid, with dilation."""
    return _dispatch("neighborhood_attention_2d", _neighborhood_ref, q, k, v, key_mask, grid, kernel_size, dilation,
                     prefix, scale)


OPS = {
    linear_attention: _linear_ref,
    agent_attention: _agent_ref,
    sliding_window_attention: _sliding_ref,
    window_attention_2d: _window2d_ref,
    neighborhood_attention_2d: _neighborhood_ref,
}


def _register_fake_and_autograd() -> None:
    from . import _backward_through, _setup_context

    for op, reference in OPS.items():
        op.register_fake(lambda q, k, v, *rest: q.new_empty((*q.shape[:-1], v.shape[-1])))
        op.register_autograd(_backward_through(reference, op._name.split("::")[-1]), setup_context=_setup_context)


_register_fake_and_autograd()
