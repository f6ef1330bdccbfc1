"""`torch.compile(model, backend="rewriter")`: the exact rewrites, verified, then Inductor.

Registered under the `torch_dynamo_backends` entry point (pyproject.toml), so the name works
once the package is installed. For each graph dynamo hands over, the backend

1. turns the graph's parameter and buffer inputs back into attributes (dynamo lifts them to
   inputs) and reads its size inputs off the tensors' shapes, giving a module of the runtime
   tensors alone, as `rewriter.optimize` would see the user's module;
2. runs `rewriter.optimize` on it with the example inputs dynamo passes: capture, the exact
   passes (each verified, failures rolled back), the approximate attention rewrite if asked;
3. compiles the rewritten graph with Inductor (`compile_fx`).

A problem in steps 1-3 never breaks the user's model: the backend warns
(`RewriteBackendWarning`) and compiles dynamo's original graph with Inductor instead.

Options (`torch.compile(model, backend="rewriter", options={...})`): `norm`, `attention`,
`layers` and the attention form's parameters as for `rewriter.optimize`; `verify` (default
True); `on_report`, a callable given each graph's RewriteReport; `inductor`, a dict of Inductor
config patches. `mode=` maps to Inductor's mode options. The report of the last graph compiled
is `rewriter.compile_backend.last_report`.

Parameters and buffers stay the module's own tensors (in-place updates are seen), but
Pre-RMSNorm re-centres copies of the writers' weights at compile time, like Inductor's
freezing, and number attributes of the modules that dynamo leaves unspecialised under
`dynamic=True` (a LayerNorm's eps, a dropout's p) are fixed at their compile-time value.
When the graph is compiled for training (grad enabled, parameters that require grad) the
backend keeps the LayerNorms (`norm="keep"`) so gradients reach the real weights.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch._dynamo  # noqa: F401  (its exceptions; a backend runs under dynamo anyway)
import torch.fx as fx

__all__ = ["rewriter_backend", "RewriteBackendWarning", "last_report"]

last_report = None  # the RewriteReport of the most recent graph this backend rewrote

_BACKEND_OPTIONS = ("on_report", "inductor", "verify")


class RewriteBackendWarning(UserWarning):
    """The rewriter backend could not rewrite a graph and compiled it unchanged with Inductor."""


class _Unsupported(Exception):
    pass


_RESTART = torch._dynamo.exc.RestartAnalysis  # asks dynamo to trace again: never a failure to fall back from


def _optimize_options(options: dict | None) -> tuple[dict, dict]:
    """Split torch.compile's options into optimize() keywords and the backend's own; validate."""
    import rewriter

    options = dict(options or {})
    own = {k: options.pop(k) for k in _BACKEND_OPTIONS if k in options}
    kw = {"norm": options.pop("norm", "auto"), "attention": options.pop("attention", None),
          "layers": options.pop("layers", None), **options}
    rewriter.optimize(torch.nn.Identity(), None, **kw)  # raises on a bad option now (nothing is captured)
    if own.get("on_report") is not None and not callable(own["on_report"]):
        raise TypeError(f"options['on_report'] must be callable, got {type(own['on_report']).__name__}")
    return kw, own


def _source(node: fx.Node) -> str:
    source = getattr(node.meta.get("grapharg"), "source", None)
    return str(source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", ""))


def _module_state(node: fx.Node, x) -> bool:
    """A parameter or buffer of the user's module that dynamo lifted to a graph input (not a
    user input: those stay inputs even when marked static)."""
    return isinstance(x, torch.Tensor) and ("._parameters[" in _source(node) or "._buffers[" in _source(node))


def _module_scalar(node: fx.Node, x) -> bool:
    """A number attribute of the user's modules (a LayerNorm's eps, a dropout's p) that dynamo
    passes as a 0-d tensor input when compiling with dynamic=True."""
    name = _source(node)
    as_tensor = getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False)
    return (isinstance(x, torch.Tensor) and x.dim() == 0 and as_tensor
            and (name.startswith("L['self'].") or "._modules[" in name))


def _is_item(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target == "item") or (
        n.op == "call_function" and getattr(n.target, "__name__", "") in ("item", "_local_scalar_dense"))


def _symbol(s) -> str | None:
    return str(s.node.expr) if isinstance(s, torch.SymInt) else None


def _runtime_module(gm: fx.GraphModule, example_inputs: list) -> tuple[fx.GraphModule, list[int], bool]:
    """dynamo's graph as a module of its runtime tensor inputs: parameters and buffers become
    attributes again, size inputs are read off the tensors. Returns the module, the positions of
    the inputs it takes, and whether the graph has symbolic sizes."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise _Unsupported(f"{len(placeholders)} graph inputs but {len(example_inputs)} example inputs")
    root = torch.nn.Module()
    for name, child in gm.named_children():
        root.add_module(name, child)
    for name, value in gm.named_parameters(recurse=False):
        root.register_parameter(name, value)
    for name, value in gm.named_buffers(recurse=False):
        root.register_buffer(name, value)
    for n in gm.graph.nodes:  # plain tensor constants dynamo kept as attributes
        if n.op == "get_attr" and "." not in n.target and not hasattr(root, n.target):
            setattr(root, n.target, getattr(gm, n.target))
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    keep: list[int] = []
    dims: dict[str, tuple[fx.Node, int]] = {}  # size symbol -> (tensor input, dim) that carries it
    dynamic = False
    scalars: dict[fx.Node, float | int | bool] = {}  # module number attributes, fixed at their current value
    for i, (n, x) in enumerate(zip(placeholders, example_inputs)):
        if _module_scalar(n, x):
            scalars[n] = x.item()
        if _module_state(n, x) or n in scalars:
            name = f"_frozen_{i}"
            if isinstance(x, torch.nn.Parameter):
                root.register_parameter(name, x)
            else:
                root.register_buffer(name, x)
            env[n] = graph.get_attr(name)
        elif isinstance(x, torch.Tensor):
            env[n] = graph.placeholder(n.name)
            env[n].meta = dict(n.meta)
            keep.append(i)
            for d, size in enumerate(getattr(n.meta.get("example_value"), "shape", ())):
                if _symbol(size) is not None:
                    dynamic = True
                    dims.setdefault(_symbol(size), (env[n], d))
    for n, x in zip(placeholders, example_inputs):
        if n in env:
            continue
        where = dims.get(_symbol(x) or _symbol(n.meta.get("example_value")))
        if where is None:
            raise _Unsupported(f"input {n.name} ({type(x).__name__}) is neither a tensor nor a size of one")
        env[n] = graph.call_function(torch.ops.aten.sym_size.int, where)
        dynamic = True
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if _is_item(n) and n.args and n.args[0] in scalars:
            env[n] = scalars[n.args[0]]  # the value itself: a literal in the copied graph
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    return fx.GraphModule(root, graph, class_name="DynamoGraph"), keep, dynamic


def _without_export_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """The rewritten graph in a plain GraphModule: dynamo's guards already cover its inputs, so
    export's input-guard call goes (and with it the closures Inductor's cache cannot pickle)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and str(n.target).startswith("_guards_fn") and not n.users:
            gm.graph.erase_node(n)
    return fx.GraphModule(gm, gm.graph, class_name="RewrittenGraph")


def _rewrite(gm: fx.GraphModule, example_inputs: list, kw: dict, verify: bool):
    import rewriter

    module, keep, dynamic = _runtime_module(gm, example_inputs)
    inputs = [example_inputs[i] for i in keep]
    notes = []
    training = torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
    module.train(training)  # dynamo's graph is traced in the model's mode already; this says which passes apply
    if training and kw.get("norm") in ("auto", "crms"):
        kw = {**kw, "norm": "keep"}
        notes.append("compiled for training: LayerNorms kept "
                     "(Pre-RMSNorm re-centres weight copies that would not train)")
    # the capture is a torch.export of its own: keep it out of dynamo's tracing context and shape env
    with torch._guards.tracing(None):
        opt = rewriter.optimize(module, tuple(inputs), dynamic=dynamic, verify=verify, **kw)
    report = opt.report
    report.capture.setdefault("notes", []).extend(["from a torch.compile graph", *notes])
    return _without_export_guards(opt.graph_module), keep, inputs, report


def _inductor(gm: fx.GraphModule, inputs: list, mode: str | None, patches: dict):
    from torch._inductor.compile_fx import compile_fx

    config = dict(torch._inductor.list_mode_options(mode)) if mode and mode != "default" else {}
    config.update(patches)
    return compile_fx(gm, inputs, config_patches=config or None)


def _first_line(e: BaseException) -> str:
    text = [line.strip() for line in str(e).strip().splitlines()]
    first = " ".join(text[:2]) if len(text) > 1 and text[0].endswith(":") else (text[0] if text else "")
    return f"{type(e).__name__}: {first}"


def rewriter_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict[str, Any] | None = None,
                     mode: str | None = None) -> Callable:
    """A torch.compile backend: the exact rewrites (verified) on dynamo's graph, then Inductor."""
    global last_report

    kw, own = _optimize_options(options)
    patches = dict(own.get("inductor") or {})
    try:
        rewritten, keep, inputs, report = _rewrite(gm, list(example_inputs), kw, own.get("verify", True))
    except _RESTART:
        raise
    except Exception as e:  # noqa: BLE001 - the user's model must still compile
        warnings.warn(f"rewriter backend: could not rewrite this graph ({_first_line(e)}); "
                      "compiling it unchanged with Inductor", RewriteBackendWarning, stacklevel=2)
        return _inductor(gm, example_inputs, mode, patches)
    last_report = report
    if own.get("on_report") is not None:
        own["on_report"](report)
    try:
        compiled = _inductor(rewritten, inputs, mode, patches)
    except _RESTART:  # dynamo's own control flow (e.g. specialise float inputs and trace again)
        raise
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"rewriter backend: Inductor could not compile the rewritten graph ({_first_line(e)}); "
                      "compiling the original graph instead", RewriteBackendWarning, stacklevel=2)
        report.capture["notes"].append("Inductor compiled the original graph: the rewritten one failed")
        return _inductor(gm, example_inputs, mode, patches)
    boxed = getattr(compiled, "_boxed_call", False)

    def run(*args):
        picked = [args[i] for i in keep]  # parameters and buffers are attributes of the compiled graph
        return compiled(picked) if boxed else compiled(*picked)

    return run
