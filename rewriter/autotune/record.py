"""The `rewriter::` op calls a model makes: what `rewriter.autotune(model, inputs)` tunes.

The model runs once on the example inputs under a dispatch mode that notes every call of
an op in the `rewriter` namespace with its arguments (the real tensors, so the tuner
measures on exactly what the model computes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils import _pytree as pytree

__all__ = ["OpCall", "op_calls"]


@dataclass
class OpCall:
    kernel: str  # op name in the rewriter namespace, e.g. "linear_attention"
    args: tuple  # the op's positional arguments, defaults filled in


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[OpCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "rewriter":
            schema = func._schema
            full = list(args)
            for argument in schema.arguments[len(args):]:
                full.append(kwargs[argument.name] if argument.name in kwargs else argument.default_value)
            snapshot = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), tuple(full))
            self.calls.append(OpCall(kernel=func._schema.name.split("::")[-1], args=snapshot))
        return func(*args, **kwargs)


def op_calls(module: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> list[OpCall]:
    """Every `rewriter::` op call of one forward of `module` (in order, repeats included)."""
    recorder = _Recorder()
    with torch.no_grad(), recorder:
        module(*args, **(kwargs or {}))
    return recorder.calls
