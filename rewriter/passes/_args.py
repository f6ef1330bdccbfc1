"""Read a call node's arguments by name, whatever mix of positional and keyword was used."""
from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch.fx.operator_schemas import normalize_function


def args_of(node: fx.Node) -> dict[str, Any]:
    """{argument name: value} for a call_function node (defaults filled in where known)."""
    norm = normalize_function(node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
    if norm is None:
        return dict(enumerate(node.args)) | dict(node.kwargs)
    out = dict(norm.kwargs)
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        for a in schema.arguments:
            if a.name not in out and a.has_default_value():
                out[a.name] = a.default_value
    return out


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
