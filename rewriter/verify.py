"""Numerical checks of a rewritten graph: per site on the same inputs, and end to end.

Each rewrite leaves the nodes it replaced in the graph until it is verified, so one
interpreted run of the rewritten graph yields, for every site, the replacement's value
and the original subgraph's value computed from identical inputs. A site that differs
beyond its dtype's tolerance is rolled back on its own. The comparison itself is
`rewriter.compare`.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

from .graph import ancestors

__all__ = ["flat_inputs", "record"]


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The graph's placeholder values for a call `gm(*args, **kwargs)`."""
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        return list(torch.fx._pytree.tree_flatten_spec((args, kwargs), spec))
    return list(args) + list(kwargs.values())


def record(gm: fx.GraphModule, flat_args: list, nodes: Iterable[fx.Node], ancestors_only: bool = False) -> dict[fx.Node, Any]:
    """Run the graph once and keep the values of `nodes` (every node runs, used or not;
    with `ancestors_only`, only what `nodes` are computed from). A value is copied when it is
    produced: an in-place op later in the graph (`x = norm(x); x += pos`) mutates the
    rewritten node's output but not the unused original's, and must not tell them apart."""
    wanted = set(nodes)
    needed = set(ancestors(wanted)) if ancestors_only else None
    values: dict[fx.Node, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            if needed is not None and n not in needed and n.op != "placeholder":
                return None
            out = super().run_node(n)
            if n in wanted:
                values[n] = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, out)
            return out

    with torch.no_grad():  # flat in, nothing out: the outputs' pytree (a ModelOutput, say) is not rebuilt
        _Recorder(gm, garbage_collect_values=True).run(*flat_args, enable_io_processing=False)
    return values

