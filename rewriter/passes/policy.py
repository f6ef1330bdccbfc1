"""Which attention layers an approximate rewrite takes, and with which parameters.

Layers are the model's attention sites in graph order (0 = the first). A policy picks
them (all; indices; module-path globs; keep the first/last k full; alternate local and
full as in DiNAT/Zebra hybrids) and gives each its parameters: a plain value (a tuple
is one value, e.g. a 2-D window) applies to every layer, a list gives one value per
layer index, and a callable `f(layer_index)` computes it (windows that grow with depth,
as in MSWA).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["Policy", "POLICY_KEYS"]

POLICY_KEYS = ("keep_first", "keep_last", "alternate")


@dataclass
class Policy:
    layers: Any = None  # None/"all", int, [int], glob str, [glob str], or callable(index, path) -> bool
    keep_first: int = 0
    keep_last: int = 0
    alternate: int = 0  # k > 0: every k-th layer (index % k == k - 1) keeps full attention
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_options(cls, layers: Any, options: dict[str, Any]) -> "Policy":
        """Split optimize()'s options into the policy and the rewrite's own parameters."""
        params = dict(options)
        picked = {k: params.pop(k) for k in POLICY_KEYS if k in params}
        alternate = picked.get("alternate", 0)
        if alternate is True:
            alternate = 2
        for name in ("keep_first", "keep_last"):
            value = picked.get(name, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, not {value!r}")
        if not isinstance(alternate, int) or alternate < 0 or alternate == 1:
            raise ValueError(f"alternate must be True or an int k >= 2 (every k-th layer stays full), not {alternate!r}")
        _check_layers(layers)
        return cls(layers, picked.get("keep_first", 0), picked.get("keep_last", 0), alternate, params)

    def why_kept(self, index: int, path: str, count: int) -> str | None:
        """None if layer `index` (of `count`) at `path` is to be rewritten, else why not."""
        if index < self.keep_first:
            return f"kept full attention: one of the first {self.keep_first} layers (keep_first)"
        if index >= count - self.keep_last:
            return f"kept full attention: one of the last {self.keep_last} layers (keep_last)"
        if self.alternate and index % self.alternate == self.alternate - 1:
            return f"kept full attention: every {self.alternate}th layer stays global (alternate)"
        if not _selected(self.layers, index, path):
            return f"kept full attention: not selected by layers={self.layers!r}"
        return None

    def params_for(self, index: int) -> dict[str, Any]:
        """This layer's parameters: lists are per layer, callables are called with the index."""
        out = {}
        for name, value in self.params.items():
            if isinstance(value, list):
                if index >= len(value):
                    raise ValueError(f"{name} lists {len(value)} per-layer values but layer {index} needs one")
                value = value[index]
            elif callable(value):
                value = value(index)
            out[name] = value
        return out


def _check_layers(layers: Any) -> None:
    ok = (layers is None or layers == "all" or callable(layers) or isinstance(layers, (int, str))
          or (isinstance(layers, Sequence) and all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in layers)))
    if not ok or isinstance(layers, bool):
        raise ValueError(f"layers must be 'all', an index, a module-path glob, a list of those, or a callable; "
                         f"got {layers!r}")


def _selected(layers: Any, index: int, path: str) -> bool:
    if layers is None or layers == "all":
        return True
    if callable(layers):
        return bool(layers(index, path))
    items = [layers] if isinstance(layers, (int, str)) else list(layers)
    for item in items:
        if isinstance(item, int) and item == index:
            return True
        if isinstance(item, str) and (fnmatch.fnmatchcase(path, item) or fnmatch.fnmatchcase(path, item + ".*")):
            return True
    return False

