"""Numerical checks of a rewritten graph: per site on the same inputs, and end to end.

Each rewrite leaves the nodes it replaced in the graph until it is verified, so one
interpreted run of the rewritten graph yields, for every site, the replacement's value
and the original subgraph's value computed from identical inputs. A site that differs
beyond its dtype's tolerance is rolled back on its own.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

__all__ = ["TOLERANCE", "error", "cosine", "within_tolerance", "flat_inputs", "record", "compare_outputs"]

# relative L2 error allowed for an exact rewrite, by dtype
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def error(actual: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    """max abs and relative L2 error of `actual` against `expected` (computed in fp64;
    complex tensors as their real and imaginary parts)."""
    a, e = _as_real(actual), _as_real(expected)
    if a.shape != e.shape:
        return {"max_abs": float("inf"), "rel_l2": float("inf")}
    finite = torch.isfinite(e)
    same_nan = torch.equal(torch.isnan(a), torch.isnan(e))
    same_inf = torch.equal(torch.where(torch.isinf(e), e, 0), torch.where(torch.isinf(a), a, 0))
    if not (same_nan and same_inf):
        return {"max_abs": float("inf"), "rel_l2": float("inf")}
    a, e = a[finite], e[finite]
    if a.numel() == 0:
        return {"max_abs": 0.0, "rel_l2": 0.0}
    diff = (a - e)
    denom = e.norm().item()
    return {
        "max_abs": diff.abs().max().item(),
        "rel_l2": diff.norm().item() / denom if denom > 0 else diff.norm().item(),
    }


def _as_real(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_complex():  # .double() would drop the imaginary part
        return torch.view_as_real(t.resolve_conj().contiguous()).double()
    return t.double()


def cosine(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Mean cosine similarity of the last-dim vectors (e.g. per token and head), in fp64."""
    a, e = actual.detach().double(), expected.detach().double()
    return torch.nn.functional.cosine_similarity(a, e, dim=-1, eps=1e-12).mean().item()


def within_tolerance(err: dict[str, float], dtype: torch.dtype) -> bool:
    return err["rel_l2"] <= TOLERANCE.get(dtype, 1e-5)


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The graph's placeholder values for a call `gm(*args, **kwargs)`."""
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        return list(torch.fx._pytree.tree_flatten_spec((args, kwargs), spec))
    return list(args) + list(kwargs.values())


def record(gm: fx.GraphModule, flat_args: list, nodes: Iterable[fx.Node], ancestors_only: bool = False) -> dict[fx.Node, Any]:
    """Run the graph once and keep the values of `nodes` (every node runs, used or not;
    with `ancestors_only`, only what `nodes` are computed from)."""
    wanted = set(nodes)
    needed = _ancestors(wanted) if ancestors_only else None
    values: dict[fx.Node, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            if needed is not None and n not in needed and n.op != "placeholder":
                return None
            out = super().run_node(n)
            if n in wanted:
                values[n] = out
            return out

    with torch.no_grad():
        _Recorder(gm, garbage_collect_values=True).run(*flat_args)
    return values


def _ancestors(nodes: set[fx.Node]) -> set[fx.Node]:
    seen, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _leaves(x) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def compare_outputs(actual, expected) -> dict[str, Any]:
    """Worst error over the floating-point outputs; exact equality for the others."""
    a, e = _leaves(actual), _leaves(expected)
    if len(a) != len(e):
        return {"rel_l2": float("inf"), "max_abs": float("inf"), "ok": False, "reason": "different number of outputs"}
    worst = {"rel_l2": 0.0, "max_abs": 0.0, "ok": True}
    for x, y in zip(a, e):
        if y.is_floating_point() or y.is_complex():
            err = error(x, y)
            ok = within_tolerance(err, y.dtype)
        else:
            ok = torch.equal(x, y)
            err = {"rel_l2": 0.0 if ok else float("inf"), "max_abs": 0.0 if ok else float("inf")}
        worst["rel_l2"] = max(worst["rel_l2"], err["rel_l2"])
        worst["max_abs"] = max(worst["max_abs"], err["max_abs"])
        worst["ok"] = worst["ok"] and ok
    return worst
