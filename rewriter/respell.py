"""Respell equivalent forms of attention's pieces into the one the patterns were traced in.

Third-party code writes QKᵀ and PV as `torch.einsum` and the softmax by hand
(`exp(s - amax(s)) / sum(exp(...))`). Rather than a pattern copy per spelling, those
forms are rewritten once, before the passes, into `permute`s around one `matmul` and into
`softmax`, so one pattern family covers them all. Only einsums next to a softmax are
respelt (a model's other contractions stay as written); a hand-written softmax is equal
to `softmax` up to rounding, which the whole-model check then measures like any rewrite.
"""
from __future__ import annotations

import operator
import string

import torch
import torch.fx as fx

from .graph import SOFTMAX, call, same_size, spelled, val

aten = torch.ops.aten

__all__ = ["respell_einsum", "respell_softmax", "einsum_matmul_plan"]

_EINSUM = {aten.einsum.default, torch.einsum, torch.functional.einsum}
_PASS_THROUGH = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.masked_fill.Scalar,
                 aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther, aten._to_copy.default,
                 aten.to.dtype, aten.dropout.default, operator.mul, operator.truediv, operator.add}


def einsum_matmul_plan(equation: str, ranks: tuple[int, int]) -> tuple[list[int], list[int], list[int]] | str:
    """For a two-operand einsum that is a batched matrix product: the permutations that put
    operand A in [batch…, i, c] and B in [batch…, c, j] order, and the one that takes the
    matmul's [batch…, i, j] to the einsum's output. Otherwise the reason it is not one."""
    eq = equation.replace(" ", "")
    if "->" in eq:
        lhs, out = eq.split("->")
    else:
        lhs = eq
        letters = lhs.replace(",", "").replace(".", "")
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    terms = lhs.split(",")
    if len(terms) != 2:
        return f"einsum over {len(terms)} operands"
    if "..." in eq:  # an ellipsis: as many fresh batch letters as the operands' unnamed dims
        spare = [c for c in string.ascii_letters if c not in eq]
        extra = [r - len(t.replace("...", "")) for t, r in zip(terms, ranks)]
        if extra[0] != extra[1] or "..." not in terms[0] or "..." not in terms[1] or "..." not in out:
            return "einsum whose ellipsis does not stand for the same batch dims everywhere"
        fill = "".join(spare[: extra[0]])
        terms, out = [t.replace("...", fill) for t in terms], out.replace("...", fill)
    a, b = terms
    if any(len(set(t)) != len(t) for t in (a, b, out)) or (len(a), len(b)) != ranks:
        return "einsum with a repeated subscript or a rank that does not fit"
    batch = [c for c in out if c in a and c in b]
    contracted = [c for c in a if c in b and c not in out]
    free_a, free_b = [c for c in a if c not in b], [c for c in b if c not in a]
    if len(contracted) != 1 or len(free_a) != 1 or len(free_b) != 1 or any(c not in out for c in free_a + free_b):
        return f"einsum {equation!r} is not one batched matrix product (one contracted, one free subscript each)"
    i, j, c = free_a[0], free_b[0], contracted[0]
    mm = batch + [i, j]
    return ([a.index(x) for x in batch + [i, c]], [b.index(x) for x in batch + [c, j]], [mm.index(x) for x in out])


def _near_softmax(node: fx.Node, steps: int = 4) -> bool:
    """Whether an einsum's value reaches a softmax within a few elementwise ops, or comes from one."""
    for x in node.all_input_nodes:
        if spelled(x, SOFTMAX) or (x.op == "call_function" and x.target in _PASS_THROUGH
                                   and any(spelled(y, SOFTMAX) for y in x.all_input_nodes)):
            return True
    todo = [(u, 0) for u in node.users]
    while todo:
        u, d = todo.pop()
        if spelled(u, SOFTMAX):
            return True
        if d < steps and u.op == "call_function" and u.target in _PASS_THROUGH:
            todo.extend((w, d + 1) for w in u.users)
    return False


def _permute(g: fx.Graph, x: fx.Node, perm: list[int], like: fx.Node) -> fx.Node:
    n = len(perm)
    if perm == list(range(n)):
        return x
    if perm == list(range(n - 2)) + [n - 1, n - 2]:  # a transpose of the last two (how kᵀ is read)
        return call(g, aten.transpose.int, (x, -2, -1), like=like)
    return call(g, aten.permute.default, (x, perm), like=like)


def _einsum_operands(node: fx.Node) -> tuple[str, list] | None:
    eq, *rest = node.args
    ops = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    return (eq, ops) if isinstance(eq, str) and not node.kwargs else None


def respell_einsum(graph: fx.Graph, method: str) -> int:
    """Respell the einsums next to a softmax as permute → matmul → permute; returns how many.
    One left as written keeps its reason in `meta["not_respelt"]`, for the report."""
    left: dict[fx.Node, str] = {}
    done = 0
    mm = aten.matmul.default if method == "export" else operator.matmul
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _EINSUM or not _near_softmax(node):
            continue
        parsed = _einsum_operands(node)
        if parsed is None:
            left[node] = "einsum called with keywords"
            continue
        eq, ops = parsed
        if len(ops) != 2 or not all(isinstance(val(o), torch.Tensor) for o in ops):
            left[node] = f"einsum {eq!r} over {len(ops)} operands"
            continue
        ranks = (val(ops[0]).dim(), val(ops[1]).dim())
        plan = einsum_matmul_plan(eq, ranks)
        if isinstance(plan, str):
            if 2 in ranks and max(ranks) >= 3 and val(node).dim() == max(ranks):
                plan = (f"einsum {eq!r} mixes heads with a matrix next to the softmax (talking-heads attention); "
                        "canonical attention keeps heads apart")
            left[node] = plan
            continue
        pa, pb, po = plan
        nb = len(pa) - 2
        sa, sb = val(ops[0]).shape, val(ops[1]).shape
        if not all(same_size(sa[pa[d]], sb[pb[d]]) for d in range(nb)):
            left[node] = f"einsum {eq!r} broadcasts its batch dims"
            continue
        with graph.inserting_before(node):
            a = _permute(graph, ops[0], pa, node)
            b = _permute(graph, ops[1], pb, node)
            out = _permute(graph, call(graph, mm, (a, b), like=node), po, node)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        done += 1
    for node, why in left.items():
        node.meta["not_respelt"] = why
    return done


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _reduced_dim(node: fx.Node) -> int | None:
    """The one dim a keepdim reduction (sum / amax / max.dim) runs over, else None."""
    dims, keep = (node.args[1:3] + (False,) * 2)[:2] if len(node.args) > 1 else (None, False)
    keep = node.kwargs.get("keepdim", keep)
    if isinstance(dims, (list, tuple)) and len(dims) == 1:
        dims = dims[0]
    if not isinstance(dims, int) or keep is not True:
        return None
    return dims % val(node.args[0]).dim()


def _max_of(node: fx.Node) -> tuple[fx.Node, int | None] | None:
    """(x, d) when `node` is x.amax(d, keepdim=True) or x.max(d, keepdim=True).values (detached or not)."""
    while _is(node, aten.detach.default, aten.alias.default):
        node = node.args[0]
    if _is(node, operator.getitem) and node.args[1] == 0 and _is(node.args[0], aten.max.dim):
        node = node.args[0]
    if _is(node, aten.amax.default, aten.max.dim):
        return node.args[0], _reduced_dim(node)
    return None


def respell_softmax(graph: fx.Graph) -> int:
    """`e / e.sum(d, keepdim=True)` with `e = exp(x - x.amax(d, keepdim=True))` (or `exp(x)`)
    becomes `softmax(x, d)` (ATen graphs). Returns how many were respelt."""
    n = 0
    for div in list(graph.nodes):
        if not _is(div, aten.div.Tensor):
            continue
        e, s = div.args[:2]
        if not (_is(e, aten.exp.default) and _is(s, aten.sum.dim_IntList) and s.args[0] is e):
            continue
        d = _reduced_dim(s)
        x = e.args[0]  # e / e.sum() is softmax(x) for any x; x - x.amax(d) has the same softmax as x
        if _is(x, aten.sub.Tensor) and isinstance(x.args[1], fx.Node) and _max_of(x.args[1]) == (x.args[0], d):
            x = x.args[0]
        vx, vd = val(x), val(div)
        if d is None or not isinstance(vx, torch.Tensor) or (vx.shape, vx.dtype) != (vd.shape, vd.dtype):
            continue
        with graph.inserting_before(div):
            sm = call(graph, aten.softmax.int, (x, d), like=div)
        div.replace_all_uses_with(sm)
        n += 1
    return n
