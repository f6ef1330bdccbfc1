"""Small helpers every pass uses to read and edit a captured graph.

Why here: passes must agree on how a node's value, module path and parameters are read,
and on how a new node gets its `meta["val"]`, so that later passes' checks see real
shapes and dtypes on nodes earlier passes made.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten

__all__ = [
    "val", "module_path", "call", "same_size", "param", "set_param", "add_param",
    "strip_export_plumbing", "spell_out_arguments", "normalise_torch_spellings", "spelled", "SOFTMAX", "MATMUL", "CAST", "remove_identities", "common_subexpressions", "dead_code_elimination", "op_targets", "ancestors",
    "remember_model_state", "is_model_tensor", "in_state_dict",
]


def val(node: Any) -> Any:
    """The example value (a fake tensor) of a node, or the literal itself."""
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def ancestors(nodes: Iterable[fx.Node], follow: Callable[[fx.Node], bool] | None = None) -> Iterable[fx.Node]:
    """Yield `nodes` and every node they are computed from, each once (with `follow`, only
    through inputs it accepts), so callers can stop at the first one they look for."""
    seen, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        yield n
        stack.extend(a for a in n.all_input_nodes if follow is None or follow(a))


_MODEL_TENSORS, _STATE_TENSORS = "rewriter_model_tensors", "rewriter_state_tensors"  # gm.meta keys


def remember_model_state(gm: fx.GraphModule, model: nn.Module) -> None:
    """Note which tensors behind the graph's get_attr nodes are the model's own (read at run
    time, never baked) and which of those are in its state dict (a loaded state replaces them)."""
    gm.meta[_MODEL_TENSORS] = {id(t) for t in (*model.parameters(), *model.buffers())}
    gm.meta[_STATE_TENSORS] = {id(t) for t in model.state_dict(keep_vars=True).values()}


def is_model_tensor(gm: fx.GraphModule, t: torch.Tensor) -> bool:
    return id(t) in gm.meta.get(_MODEL_TENSORS, ())


def in_state_dict(gm: fx.GraphModule, t: torch.Tensor) -> bool:
    return id(t) in gm.meta.get(_STATE_TENSORS, ())


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost user module that produced `node` ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return path.replace("L['self'].", "").replace("L__self__.", "") or "<root>"
    return "<root>"


def same_size(a, b) -> bool:
    """Sizes equal for every input shape (SymInts compared symbolically, never guarded)."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return bool(statically_known_true(a == b))
    return a == b


def _fake(x):
    return val(x) if isinstance(x, fx.Node) else x


def call(graph: fx.Graph, target: Callable, args: tuple, kwargs: dict | None = None, like: fx.Node | None = None) -> fx.Node:
    """Insert `target(*args, **kwargs)` at the current insert point and give it meta['val'].

    The value is computed by running the op on the inputs' fake values (the same fake
    mode and shape environment as capture), so symbolic shapes stay symbolic.
    """
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    fargs = torch.fx.node.map_aggregate(args, _fake)
    fkwargs = torch.fx.node.map_aggregate(kwargs, _fake)
    mode = torch._guards.detect_fake_mode(list(torch.utils._pytree.tree_leaves((fargs, fkwargs))))
    if mode is not None:
        with mode:
            node.meta["val"] = target(*fargs, **fkwargs)
    else:
        node.meta["val"] = target(*fargs, **fkwargs)
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    return node


def _owner(gm: nn.Module, target: str) -> tuple[nn.Module, str]:
    *path, name = target.split(".")
    mod = gm
    for p in path:
        mod = getattr(mod, p)
    return mod, name


def param(gm: nn.Module, node: Any) -> torch.Tensor | None:
    """The tensor behind a `get_attr` node, else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        mod, name = _owner(gm, node.target)
        t = getattr(mod, name)
        return t if isinstance(t, torch.Tensor) else None
    return None


def set_param(gm: nn.Module, target: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer with a new tensor; never writes into the old one.

    Captured modules share their tensors with the user's model, so in-place edits
    would silently change the user's model too.
    """
    mod, name = _owner(gm, target)
    old = getattr(mod, name)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value, requires_grad=old.requires_grad))
    elif name in getattr(mod, "_buffers", {}):
        mod._buffers[name] = value
    else:
        setattr(mod, name, value)


def add_param(gm: fx.GraphModule, base: str, value: torch.Tensor, like: fx.Node) -> fx.Node:
    """Register a new parameter named after `base` and return a get_attr node for it."""
    name = base.replace(".", "_")
    i = 0
    while hasattr(gm, f"{name}_{i}"):
        i += 1
    name = f"{name}_{i}"
    gm.register_parameter(name, nn.Parameter(value, requires_grad=False))
    with gm.graph.inserting_before(like):
        node = gm.graph.get_attr(name)
    node.meta["val"] = val(like)
    return node


_PLUMBING = {aten._assert_tensor_metadata.default}
# ops whose calls are rewritten into one argument layout before matching
_SPELL_OUT = {aten.scaled_dot_product_attention.default}


def spell_out_arguments(graph: fx.Graph) -> int:
    """Write every argument of the ops in `_SPELL_OUT` explicitly: positional arguments as
    positional, keyword-only ones as keywords, defaults filled in.

    torch.export drops defaults in some calls and spells them out in others; after this
    one pattern matches every call whatever the spelling, and checks can read arguments
    by position.
    """
    n = 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _SPELL_OUT:
            continue
        schema = node.target._schema
        given = {a.name: v for a, v in zip(schema.arguments, node.args)} | dict(node.kwargs)
        full = {a.name: given.get(a.name, a.default_value if a.has_default_value() else None) for a in schema.arguments}
        node.args = tuple(full[a.name] for a in schema.arguments if not a.kwarg_only)
        node.kwargs = {a.name: full[a.name] for a in schema.arguments if a.kwarg_only}
        n += 1
    return n


# torch-level spellings (symbolic_trace graphs keep what the model wrote) and the one the
# patterns are traced in: (targets as call_function, names as call_method) -> target
_TORCH_SPELLINGS = [
    (({torch.matmul, torch.Tensor.matmul}, {"matmul", "__matmul__"}), operator.matmul),
    (({torch.Tensor.bmm}, {"bmm"}), torch.bmm),
    (({torch.Tensor.baddbmm}, {"baddbmm"}), torch.baddbmm),
]
# how an op may be spelt in a graph: (ATen overload packets, torch-level callables, Tensor
# method names); `spelled(node, SOFTMAX)` reads all three
SOFTMAX = ({aten.softmax, aten._softmax}, {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}, {"softmax"})
MATMUL = ({aten.matmul, aten.bmm}, {torch.matmul, torch.bmm, operator.matmul, torch.Tensor.matmul, torch.Tensor.bmm},
          {"matmul", "bmm", "__matmul__"})
CAST = ({aten.to, aten._to_copy}, {torch.Tensor.to, torch.Tensor.type_as, torch.Tensor.float},
        {"to", "type", "type_as", "float", "half", "bfloat16", "double"})


def spelled(node: fx.Node, spellings: tuple) -> bool:
    """Whether `node` calls the op of `spellings` (SOFTMAX, MATMUL, CAST) in any spelling."""
    packets, functions, methods = spellings
    if node.op == "call_method":
        return node.target in methods
    return node.op == "call_function" and (getattr(node.target, "overloadpacket", None) in packets
                                           or node.target in functions)


def normalise_torch_spellings(graph: fx.Graph) -> int:
    """Give the torch-level ops of a symbolic_trace graph the spelling the attention patterns
    were traced in: `torch.matmul`, `Tensor.matmul` -> `@`; `Tensor.bmm` / `baddbmm` -> the
    torch functions; `F.softmax(x, dim=d, _stacklevel=3)`, `x.softmax(d)` ->
    `torch.softmax(x, d)` (a dtype kept as a keyword). Same functions, same arguments: only
    the node's spelling changes. Returns how many nodes were respelt."""
    n = 0
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        for (functions, methods), target in _TORCH_SPELLINGS:
            if (node.op == "call_function" and node.target in functions) or \
                    (node.op == "call_method" and node.target in methods):
                if node.kwargs or len(node.args) != (3 if target is torch.baddbmm else 2):
                    break  # keywords (out=, alpha=, beta=): leave it as written
                node.op, node.target = "call_function", target
                n += 1
                break
        else:
            if not spelled(node, SOFTMAX) or getattr(node.target, "overloadpacket", None) is not None:
                continue  # not a softmax, or an ATen one (export graphs are spelt alike already)
            # F.softmax(input, dim, _stacklevel, dtype); torch.softmax and Tensor.softmax take (input, dim, dtype)
            functional = node.op == "call_function" and node.target is torch.nn.functional.softmax
            names = ("input", "dim", "_stacklevel", "dtype") if functional else ("input", "dim", "dtype")
            given = dict(zip(names, node.args)) | dict(node.kwargs)
            given.pop("_stacklevel", None)
            if "input" not in given or given.get("dim") is None or set(given) - {"input", "dim", "dtype"}:
                continue
            args = (given["input"], given["dim"])
            kwargs = {"dtype": given["dtype"]} if given.get("dtype") is not None else {}
            if (node.op, node.target, node.args, dict(node.kwargs)) == ("call_function", torch.softmax, args, kwargs):
                continue
            node.op, node.target, node.args, node.kwargs = "call_function", torch.softmax, args, kwargs
            n += 1
    return n


def strip_export_plumbing(graph: fx.Graph) -> int:
    """Drop export's dtype/device assertion nodes: they read tensors but compute nothing,
    and as extra users they would hide every pattern's inner nodes from the matcher."""
    removed = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _PLUMBING and not node.users:
            graph.erase_node(node)
            removed += 1
    return removed


def _mutates(node: fx.Node) -> bool:
    """Whether a call writes into one of its inputs (`add_`, `copy_`, `out=` ops)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is not None:
        return schema.is_mutable
    return node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
        and not node.target.startswith("__")


def _is_view(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return schema is not None and bool(schema.returns) and schema.returns[0].alias_info is not None


def mutated(node: fx.Node) -> bool:
    """Whether `node`'s value, or a view of it, is written in place later in the graph."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if _mutates(u):
                return True
            if _is_view(u) or u.target is operator.getitem:
                todo.append(u)
    return False


def _is_identity(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    t = node.target
    if t in (aten.dropout.default, torch.nn.functional.dropout):
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", node.kwargs.get("training", False))
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        return train is False or p == 0
    if t in (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.alias.default, aten.type_as.default):
        src, out = val(node.args[0]), val(node)
        return (
            isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)
            and src.dtype == out.dtype and src.device == out.device
            and node.kwargs.get("memory_format") in (None, torch.preserve_format)
            # a copy (`_to_copy`, `to(copy=True)`) stands apart from its source once either is written in place
            and not (isinstance(node.args[0], fx.Node) and (mutated(node) or mutated(node.args[0])))
        )
    if t == aten.slice.Tensor:  # x[:, :] spelled out: start 0, end past the size, step 1
        a = list(node.args) + [None] * (5 - len(node.args))
        _, dim, start, end, step = a[:5]
        src = val(node.args[0])
        if not isinstance(src, torch.Tensor) or (step or 1) != 1 or (start or 0) != 0:
            return False
        size, end = src.shape[dim or 0], val(end)
        return end is None or (isinstance(end, int) and end >= 2**62) or bool(statically_known_true(end >= size))
    return False


def remove_identities(graph: fx.Graph) -> int:
    """Bypass ops that compute nothing here: eval-mode dropout, casts to the same dtype,
    and full slices (`x[:, None]` plumbing), so patterns need not spell them."""
    n = 0
    for node in list(graph.nodes):
        if _is_identity(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            n += 1
    return n


def common_subexpressions(graph: fx.Graph) -> int:
    """Merge identical pure ATen calls (e.g. `x.float()` written twice), so one pattern
    covers code that recomputes a value instead of naming it. Keyed on the op, its
    arguments with their Python types (`x + 1` is not `x + 1.0`) and the result's dtype and
    device; a value written in place later (or a view of one) is never merged, and in-place
    ops are never merged."""
    seen: dict[tuple, fx.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.is_impure() or torch.Tag.nondeterministic_seeded in node.target.tags or _mutates(node) or mutated(node):
            continue
        out = val(node)
        try:
            key = (node.target, _freeze(node.args), _freeze(node.kwargs),
                   (str(out.dtype), str(out.device)) if isinstance(out, torch.Tensor) else type(out).__name__)
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return merged


def _freeze(x):
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(i) for i in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(x)
    if isinstance(x, (bool, int, float, complex)):  # 1 == 1.0 == True in Python; not as op arguments
        return type(x).__name__, x
    return x


def _keep(n: fx.Node) -> bool:
    if n.op == "call_module":  # export's input guards
        return True
    try:  # random ops are pure here: an unused dropout or SDPA computes nothing we need
        return n.is_impure(impure_random=False)
    except TypeError:  # torch without the flag
        return n.is_impure() and not (n.op == "call_function" and n.target == aten.scaled_dot_product_attention.default)


def dead_code_elimination(gm: fx.GraphModule) -> None:
    """DCE that keeps module calls (export's input guards) and side effects."""
    gm.graph.eliminate_dead_code(is_impure_node=_keep)
    gm.recompile()


def op_targets(graph: fx.Graph) -> set:
    """The set of call targets in a graph (used to skip patterns that cannot match)."""
    out = set()
    for n in graph.nodes:
        if n.op == "call_function":
            out.add(n.target)
        elif n.op == "call_method":
            out.add(("method", n.target))
    return out


def users_outside(nodes: Iterable[fx.Node], inside: set[fx.Node]) -> list[fx.Node]:
    return [u for n in nodes for u in n.users if u not in inside]


getitem = operator.getitem
