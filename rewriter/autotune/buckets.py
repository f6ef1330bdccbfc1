"""Shape buckets: which calls share one tuned config.

A model called at many sequence lengths must not be tuned per length, so the sizes that
vary from call to call (batch, tokens, rows) are rounded up to a power of two; the sizes
that define the kernel's work per token (heads, head dims, windows, grids) stay exact.
The rule's name is part of every bucket's text, so changing the rule never reuses an
entry made under another.
"""
from __future__ import annotations

from typing import Any

from .space import next_pow2

__all__ = ["bucket", "RULE", "VARYING"]

RULE = "pow2"
# shape keys that vary between calls of one model (rounded up to a power of two)
VARYING = frozenset({"b", "n", "nq", "nk", "rows"})


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return "x".join(_text(v) for v in value)
    return str(value)


def bucket(shape: dict[str, Any]) -> str:
    """The bucket of a kernel's shape dict, e.g. "pow2:b1-causal1-d64-dv64-h8-hk8-n4096".
    The dtype is not part of it (it is its own field of the cache key)."""
    parts = []
    for name in sorted(shape):
        if name == "dtype":
            continue
        value = shape[name]
        if name in VARYING and isinstance(value, int) and not isinstance(value, bool):
            value = next_pow2(value)
        parts.append(f"{name}{_text(value)}")
    return f"{RULE}:" + "-".join(parts)
