"""The `rewriter::` custom ops.

Each op is a `torch.library.custom_op` so a rewritten graph still runs, re-exports,
saves as `.pt2` and compiles. CPU tensors run the reference (`<op>/naive.py`, the
spec); CUDA tensors run `<op>/triton.py` when that module and Triton are present,
else the reference. Triton is imported only on the first CUDA call.
"""
from __future__ import annotations

import functools
import importlib

import torch

from .layer_norm.naive import layer_norm as _layer_norm_ref
from .rms_norm.naive import crms_norm as _crms_norm_ref
from .rms_norm.naive import rms_norm as _rms_norm_ref

__all__ = ["rms_norm", "crms_norm", "layer_norm", "triton_impl", "reference"]


# ops whose kernels live in another op's folder
_FOLDER = {"crms_norm": "rms_norm", "sliding_window_attention": "window_attention",
           "window_attention_2d": "window_attention", "neighborhood_attention_2d": "window_attention"}


@functools.lru_cache(maxsize=None)
def triton_impl(op: str, suffix: str = ""):
    """The Triton implementation of `op` (suffix "_backward": its backward), or None where
    Triton or the kernel is missing."""
    try:
        module = importlib.import_module(f"{__name__}.{_FOLDER.get(op, op)}.triton")
    except ImportError:
        return None
    return getattr(module, op + suffix, None)


def _dispatch(op: str, reference, x: torch.Tensor, *args):
    """Run `op`: its Triton kernel on CUDA (else the reference), with the autotuner cache's
    config for this call's shape bucket where one was tuned (else the kernel's default)."""
    from ..autotune.select import tuned_config  # no Triton, no Optuna

    if x.is_cuda:
        fast = triton_impl(op)
        if fast is not None:
            return fast(x, *args, config=tuned_config(op, (x, *args), x.device))
        return reference(x, *args)
    return reference(x, *args, **(tuned_config(op, (x, *args), x.device) or {}))


@torch.library.custom_op("rewriter::rms_norm", mutates_args=())
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    weight_offset: float = 0.0,
) -> torch.Tensor:
    """RMSNorm over the last dim; see `kernels/rms_norm/naive.py`."""
    return _dispatch("rms_norm", _rms_norm_ref, x, weight, bias, eps, weight_offset)


@rms_norm.register_fake
def _(x, weight, bias, eps, weight_offset=0.0):
    return torch.empty_like(x)


@torch.library.custom_op("rewriter::crms_norm", mutates_args=())
def crms_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of a zero-mean stream stored in D-1 channels: [..., D-1] -> [..., D]."""
    return _dispatch("crms_norm", _crms_norm_ref, x, weight, bias, eps)


@crms_norm.register_fake
def _(x, weight, bias, eps):
    return x.new_empty((*x.shape[:-1], x.shape[-1] + 1))


@torch.library.custom_op("rewriter::layer_norm", mutates_args=())
def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm over the last dim; see `kernels/layer_norm/naive.py`."""
    return _dispatch("layer_norm", _layer_norm_ref, x, weight, bias, eps)


@layer_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])
    ctx.inputs = inputs


def _backward_through(reference, op: str):
    """Autograd for an op: its Triton backward on CUDA where one exists (it returns the
    gradients of the leading tensor inputs), else differentiate the reference."""

    def backward(ctx, grad):
        inputs = ctx.inputs
        fast = triton_impl(op, "_backward") if grad.is_cuda else None
        if fast is not None:
            try:
                grads = list(fast(grad, *inputs))
            except NotImplementedError:  # e.g. causal linear attention: no backward kernel
                grads = None
            if grads is not None:
                grads += [None] * (len(inputs) - len(grads))
                return tuple(g if isinstance(t, torch.Tensor) and t.requires_grad else None
                             for g, t in zip(grads, inputs))
        with torch.enable_grad():
            leaves = [
                t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                for t in inputs
            ]
            out = reference(*leaves)
            wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True)) if wanted else iter(())
        return tuple(
            next(grads) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves
        )

    return backward


rms_norm.register_autograd(_backward_through(_rms_norm_ref, "rms_norm"), setup_context=_setup_context)
crms_norm.register_autograd(_backward_through(_crms_norm_ref, "crms_norm"), setup_context=_setup_context)
layer_norm.register_autograd(_backward_through(_layer_norm_ref, "layer_norm"), setup_context=_setup_context)

from . import attention_ops  # noqa: E402,F401  (registers the approximate-attention ops)


_REFERENCES = {"rms_norm": _rms_norm_ref, "crms_norm": _crms_norm_ref, "layer_norm": _layer_norm_ref,
               **{o._name.split("::")[-1]: ref for o, ref in attention_ops.OPS.items()}}


def reference(op: str):
    """The reference of `op`: called with the op's positional arguments, then (keywords)
    the CPU knobs its config space declares."""
    if op not in _REFERENCES:
        raise KeyError(f"no rewriter op {op!r}; known: {sorted(_REFERENCES)}")
    return _REFERENCES[op]
