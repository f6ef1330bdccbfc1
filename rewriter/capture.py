"""Capture a model as one FX graph: torch.export (non-strict) first, symbolic_trace after.

Passes see a `torch.fx.GraphModule` whose parameters are `get_attr` nodes and whose
nodes carry `meta["val"]` (fake tensors with real shapes and dtypes). Export gives
ATen-level graphs with dynamic batch/sequence dims where the model allows them; the
symbolic_trace fallback gives torch-level graphs for modules export cannot take.
"""
from __future__ import annotations

import collections
import inspect
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

__all__ = ["CaptureError", "ExampleInputsError", "Captured", "capture", "bind_constant_inputs", "dynamic_shapes", "export_program",
           "run_example", "trace_pattern"]


class CaptureError(RuntimeError):
    """The model could not be captured as a graph; the message says where and what to try."""


class ExampleInputsError(CaptureError, ValueError):
    """The model itself fails on the example inputs (their number, shapes or dtypes do not fit it)."""


def _describe(args: tuple, kwargs: dict) -> str:
    def one(x):
        if isinstance(x, torch.Tensor):
            return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
        return type(x).__name__
    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "no inputs"


def run_example(model: nn.Module, args: tuple, kwargs: dict):
    """The model's output on the example inputs (no grad); ExampleInputsError if it raises there."""
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the inputs do not fit the model: say so, once
        where = _user_frame(e)
        missing = _not_given(model, args, kwargs)
        raise ExampleInputsError(
            f"{type(model).__name__} raised {_first_line(e)} when called on the example inputs "
            f"({_describe(args, kwargs)})" + (f"\n  at {where}" if where else "") +
            "\n  try: pass example inputs the model runs on: as many as its forward takes, "
            "with the shapes and dtypes it expects"
            + (f"\n  its forward also takes: {', '.join(missing)} (pass them with example_kwargs=...)" if missing else "")
        ) from e


def _not_given(model: nn.Module, args: tuple, kwargs: dict, most: int = 8) -> list[str]:
    """The forward's named parameters this call leaves at their defaults (what to pass next)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)]
    left = [p.name for p in named[len(args):] if p.name not in kwargs]
    return left[:most] + (["…"] if len(left) > most else [])


_CARRIED = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device)


def uncarried_outputs(output) -> list[str]:
    """'path: Type' for every part of an output a graph cannot return (e.g. a cache object)."""
    leaves, _ = torch.utils._pytree.tree_flatten_with_path(output)
    return [f"{torch.utils._pytree.keystr(p) or 'output'}: {type(x).__name__}" for p, x in leaves
            if not isinstance(x, _CARRIED)]


@dataclass
class Captured:
    module: fx.GraphModule
    method: str  # "export" or "symbolic_trace"
    example_args: tuple
    example_kwargs: dict
    dynamic_dims: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    exported: Any = None  # the ExportedProgram, when method == "export"
    # constant keywords the capture passed and the graph now holds (e.g. use_cache=False):
    # call the original model with them added, the graph without
    fixed_kwargs: dict = field(default_factory=dict)

    def model_kwargs(self, kwargs: dict) -> dict:
        """The keywords to call the original model with for a graph call with `kwargs`."""
        return {**kwargs, **self.fixed_kwargs}


def dynamic_shapes(model, args: tuple, kwargs: dict, dims: int = 2):
    """Dim.AUTO on the first `dims` dims of every input (batch, then sequence): dynamic
    where the model allows, static elsewhere. Keyed by the forward's parameter names.
    """
    auto = torch.export.Dim.AUTO
    nodes = torch.utils._pytree.SUPPORTED_NODES

    def spec(x):
        if isinstance(x, torch.Tensor):
            return {d: auto for d in range(min(x.dim(), dims))} if x.dim() >= 1 else None
        if type(x) in (list, tuple):
            return type(x)(spec(v) for v in x)
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple
            return type(x)(*(spec(v) for v in x))
        if type(x) in (dict, collections.OrderedDict):
            return type(x)((k, spec(v)) for k, v in x.items())
        if type(x) in nodes:  # a ModelOutput, a registered class: export wants its children's specs as a list
            return [spec(c) for c in nodes[type(x)].flatten_fn(x)[0]]
        return None

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: spec(value) for name, value in bound.arguments.items()}


def _user_frame(exc: BaseException) -> str:
    """The innermost frame of the user's own code in a traceback: the line that failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        path = fr.filename.replace("\\", "/")
        if "/site-packages/torch/" in path or "/rewriter/" in path or path.startswith("<"):
            continue
        return f'{fr.filename}:{fr.lineno} in {fr.name}: {fr.line or ""}'.strip()
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _export(model, args, kwargs, dynamic: bool):
    shapes = dynamic_shapes(model, args, kwargs) if dynamic else None
    ep = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    return ep


def export_program(module, args: tuple, kwargs: dict, dims: int = 2) -> torch.export.ExportedProgram:
    """torch.export with the first `dims` dims dynamic where the module allows, else static."""
    if dims:
        try:
            return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes(module, args, kwargs, dims),
                                       strict=False)
        except Exception:  # noqa: BLE001 - the module refuses dynamic dims: static below
            pass
    return torch.export.export(module, args, kwargs, strict=False)


def _dynamic_dims_of(ep) -> dict[str, list[int]]:
    dims: dict[str, list[int]] = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in ep.graph_signature.user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                d = [i for i, s in enumerate(val.shape) if not is_concrete_int(s)]
                if d:
                    dims[node.name] = d
    return dims


class _InlineTracer(fx.Tracer):
    """symbolic_trace that traces into every module, so the graph is made of functions."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return False


def _symbolic_trace(model: nn.Module, args, kwargs) -> fx.GraphModule:
    if kwargs:
        raise CaptureError("symbolic_trace fallback takes positional example inputs only")
    try:
        graph = _InlineTracer().trace(model)
    except Exception:
        graph = fx.Tracer().trace(model)
    gm = fx.GraphModule(model, graph, model.__class__.__name__)
    _propagate_meta(gm, args)
    return gm


def _propagate_meta(gm: fx.GraphModule, args) -> None:
    """Fill node.meta['val'] with fake tensors (real tensors where an op has no fake kernel)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    except Exception:  # an op without a fake kernel: record real values instead

        class _Record(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                n.meta["val"] = out
                return out

        with torch.no_grad():
            _Record(gm).run(*args)


def capture(
    model: nn.Module,
    example_args: tuple,
    example_kwargs: dict | None = None,
    *,
    dynamic: bool = True,
    method: str = "auto",
    fixed_kwargs: dict | None = None,
) -> Captured:
    """Capture `model` called on the example inputs as an FX graph.

    method: "auto" (export, then symbolic_trace), "export" or "symbolic_trace".
    fixed_kwargs: constant keywords to call the model with that become part of the graph
      (it does not take them as inputs), e.g. {"use_cache": False}.
    Raises CaptureError naming the op or line that failed and what to try.
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if method not in ("auto", "export", "symbolic_trace"):
        raise ValueError(f"method must be 'auto', 'export' or 'symbolic_trace', not {method!r}")
    args = tuple(example_args) if isinstance(example_args, (tuple, list)) else (example_args,)
    kwargs = dict(example_kwargs or {})
    fixed = dict(fixed_kwargs or {})
    if fixed:  # keyword constants go through export; the symbolic_trace fallback takes positional inputs only
        method = "export" if method == "auto" else method
    notes: list[str] = []
    errors: list[tuple[str, BaseException]] = []

    if method in ("auto", "export"):
        for dyn in ((True, False) if dynamic else (False,)):
            try:
                ep = _export(model, args, {**kwargs, **fixed}, dyn)
            except Exception as e:  # noqa: BLE001 - reported below with the failing line
                errors.append(("torch.export" + (" (dynamic)" if dyn else ""), e))
                continue
            gm = ep.module()
            bind_constant_inputs(gm, fixed)
            if not dyn and dynamic:
                notes.append("dynamic batch/sequence dims were refused by the model; captured with static shapes")
            return Captured(gm, "export", args, kwargs, _dynamic_dims_of(ep), notes, ep, fixed)

    if method in ("auto", "symbolic_trace"):
        try:
            gm = _symbolic_trace(model, args, kwargs)
        except Exception as e:  # noqa: BLE001
            errors.append(("torch.fx.symbolic_trace", e))
        else:
            if errors:
                notes.append(f"torch.export failed ({_first_line(errors[-1][1])}); used torch.fx.symbolic_trace")
            return Captured(gm, "symbolic_trace", args, kwargs, {}, notes)

    output = run_example(model, args, {**kwargs, **fixed})  # inputs the model itself rejects: say that, not how capture failed
    odd = uncarried_outputs(output)
    if odd:
        raise CaptureError(
            f"could not capture {type(model).__name__}: its output holds what a graph cannot return "
            f"({'; '.join(odd[:4])})\n  try: return tensors, or tuples, lists, dicts or dataclasses of tensors "
            "(a dataclass or class of your own: register it with torch.utils._pytree.register_dataclass / "
            "register_pytree_node); for a KV cache, call the model with use_cache=False") from (errors[-1][1] if errors else None)
    lines = [f"could not capture {type(model).__name__} as a graph:"]
    for how, e in errors:
        where = _user_frame(e)
        lines.append(f"  {how}: {_first_line(e)}" + (f"\n    at {where}" if where else ""))
    lines.append(
        "  try: remove data-dependent Python control flow (use torch.where / torch.cond), "
        "pass example inputs of the shapes and dtypes the model expects, or wrap "
        "untraceable helpers with torch.fx.wrap"
    )
    raise CaptureError("\n".join(lines)) from (errors[-1][1] if errors else None)


def bind_constant_inputs(gm: fx.GraphModule, constants: dict) -> None:
    """Make the keyword inputs `constants` (non-tensor values export took as inputs) part of
    the graph: their placeholders go, and the graph is called without them."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if not constants or info is None:
        return
    spec = info.in_spec
    args, kwargs = torch.utils._pytree.tree_unflatten(list(range(spec.num_leaves)), spec)  # leaf index per input
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for key, value in constants.items():
        node = placeholders[kwargs[key]]
        for user in list(node.users):
            user.args, user.kwargs = torch.fx.node.map_arg((user.args, user.kwargs), lambda a: value if a is node else a)
        gm.graph.erase_node(node)
    n_args = spec.child(0).num_children
    names = dict(zip(spec.child(1).context, info.orig_args[n_args:]))
    kept = {k: v for k, v in kwargs.items() if k not in constants}
    gm.graph._codegen.pytree_info = info._replace(
        orig_args=info.orig_args[:n_args] + [names[k] for k in kept],
        in_spec=torch.utils._pytree.tree_structure((args, kept)))
    gm.recompile()


def trace_pattern(fn, example_args: tuple, method: str) -> fx.Graph:
    """Trace a search pattern through the same capture path as the model (DESIGN: patterns are code)."""
    names = [f"a{i}" for i in range(len(example_args))]
    # symbolic_trace needs one named parameter per input (it cannot iterate over *args)
    scope: dict[str, Any] = {"fn": fn}
    exec(f"def forward(self, {', '.join(names)}):\n    return fn({', '.join(names)})", scope)
    Pattern = type("Pattern", (nn.Module,), {"forward": scope["forward"]})

    if method == "export":
        ep = torch.export.export(Pattern(), tuple(example_args), strict=False)
        from .graph import remove_identities, spell_out_arguments, strip_export_plumbing

        strip_export_plumbing(ep.graph_module.graph)
        spell_out_arguments(ep.graph_module.graph)
        remove_identities(ep.graph_module.graph)
        return ep.graph_module.graph
    from .graph import spell_out_arguments

    graph = _InlineTracer().trace(Pattern())
    spell_out_arguments(graph)
    return graph
