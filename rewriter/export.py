"""ONNX export of rewritten models, checked in ONNX Runtime before the file is kept.

The rewritten program is re-exported with torch.export, converted by torch.onnx's
dynamo exporter with a translation for every `rewriter::` op (`kernels/<op>/onnx.py`)
and for the upstream ops it lacks (grouped_mm), fixed up where torch.onnx and the
onnxscript optimizer get a graph wrong (`_for_onnx`, `_fix_ir`), checked with `onnx.checker`, run in onnxruntime on the example inputs and compared
with PyTorch. Only a file that passed all of that is moved to the destination.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from .compare import error, pairs

__all__ = ["export_onnx", "ExportError", "OnnxExport", "translation_table"]

ATOL_FP32 = 1e-4  # max abs error allowed between onnxruntime and PyTorch in fp32


class ExportError(RuntimeError):
    """The model could not be exported to ONNX, or the file did not reproduce PyTorch."""


@dataclass
class OnnxExport:
    path: str
    opset: int
    max_abs_error: float
    dynamic_axes: dict[str, list[int]] = field(default_factory=dict)  # input name -> dims left dynamic
    fixed_axes: dict[str, str] = field(default_factory=dict)  # "input[dim]" -> why it is fixed


def translation_table(opset: int = 18) -> dict:
    """{op overload: onnxscript translation}: every rewriter op, and the ops of other
    libraries torch.onnx cannot translate."""
    from .kernels.agent_attention import onnx as agent
    from .kernels.layer_norm import onnx as layer_norm
    from .kernels.linear_attention import onnx as linear
    from .kernels.rms_norm import onnx as rms
    from .kernels.window_attention import onnx as window

    ops = torch.ops.rewriter
    return {
        **_upstream_translations(),
        ops.rms_norm.default: rms.rms_norm_opset23 if opset >= 23 else rms.rms_norm,
        ops.crms_norm.default: rms.crms_norm,
        ops.layer_norm.default: layer_norm.layer_norm,
        ops.linear_attention.default: linear.linear_attention,
        ops.agent_attention.default: agent.agent_attention,
        ops.sliding_window_attention.default: window.sliding_window_attention,
        ops.window_attention_2d.default: window.window_attention_2d,
        ops.neighborhood_attention_2d.default: window.neighborhood_attention_2d,
    }


def _upstream_translations() -> dict:
    """Ops of other libraries that torch.onnx has no translation for."""
    from .kernels._onnx import grouped_mm

    table = {torch.ops.aten._grouped_mm.default: grouped_mm}  # mixture-of-experts layers
    try:  # registered when transformers' MoE integration is imported (the model is built with it)
        table[torch.ops.transformers.grouped_mm_fallback.default] = grouped_mm
    except AttributeError:
        pass
    return table


def _program(module, args: tuple, kwargs: dict, dims: int) -> torch.export.ExportedProgram:
    """The program to convert, with its first `dims` input dims dynamic where allowed."""
    from .capture import export_program
    from .optimize import OptimizedModule

    from .capture import CaptureError

    if isinstance(module, torch.export.ExportedProgram):
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"export_onnx takes an nn.Module, an OptimizedModule or an ExportedProgram, "
                        f"not {type(module).__name__}")
    try:
        if isinstance(module, OptimizedModule):
            return module._export(args, kwargs, dims)
        return export_program(module, args, kwargs, dims)
    except CaptureError:  # already says what to do
        raise
    except Exception as e:  # noqa: BLE001 - torch.export's own error, from deep inside: say it in one line
        raise ExportError(_cannot_export(getattr(module, "_original", module), args, kwargs, e)) from e


def _cannot_export(model: nn.Module, args: tuple, kwargs: dict, exc: BaseException) -> str:
    """Why torch.export refused: the inputs (ExampleInputsError, raised here) or the model."""
    from .capture import _first_line, _user_frame, run_example

    run_example(model, args, kwargs)  # inputs the model itself rejects: ExampleInputsError says so
    where = _user_frame(exc)
    return (f"torch.export cannot capture {type(model).__name__} for ONNX: {_first_line(exc)}"
            + (f" (at {where})" if where else "")
            + "; ONNX export needs a graph torch.export can take: remove data-dependent Python control flow "
              "(use torch.where / torch.cond)")


def _axes(ep: torch.export.ExportedProgram, tried: int, why: str) -> tuple[dict[str, list[int]], dict[str, str]]:
    """(input -> its dynamic dims, "input[dim]" -> why it is fixed) for the first two dims
    of every tensor input: `tried` of them were asked to be dynamic (the ones past it were
    fixed for `why`); a dim asked for and still static is one the model fixes."""
    dynamic, fixed = {}, {}
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in ep.graph_signature.user_inputs:
            continue
        v = node.meta.get("val")
        if not isinstance(v, torch.Tensor):
            continue
        dims = [i for i, s in enumerate(v.shape) if not is_concrete_int(s)]
        if dims:
            dynamic[node.name] = dims
        for i in range(min(v.dim(), 2)):
            if i not in dims:
                fixed[f"{node.name}[{i}]"] = (why if i >= tried and why else
                                              "the model specialises on this size (torch.export kept it static)")
    return dynamic, fixed


_FAILED_NODE = re.compile(r"Error when translating node %(\w+)")


def _explain(exc: BaseException, ep: torch.export.ExportedProgram) -> str:
    """Name the op and the site an ONNX conversion failure came from."""
    text = str(exc)
    match = _FAILED_NODE.search(text)
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    first = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"[:400]
    if match:
        node = next((n for n in ep.graph.nodes if n.name == match.group(1)), None)
        if node is not None:
            from .graph import module_path

            return f"cannot export `{node.target}` at {module_path(node)} to ONNX: {first}"
    return f"ONNX conversion failed: {first}"


def _ort_inputs(ep: torch.export.ExportedProgram, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The example tensors in the order of the program's (and so the ONNX graph's) inputs."""
    with contextlib.suppress(Exception):  # the order of kwargs the program was exported with
        keys = ep.call_spec.in_spec.child(1).context
        if set(keys) == set(kwargs):
            kwargs = {k: kwargs[k] for k in keys}
    return [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]


def _run_ort(path: str, inputs: list[torch.Tensor]) -> list:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ExportError(f"the ONNX graph takes {len(names)} inputs but {len(inputs)} example tensors were given")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
    return [np.asarray(o) for o in session.run(None, feed)]


def export_onnx(module, path: str | os.PathLike, example_inputs: Any = None, *, opset: int = 18,
                dynamic: bool = True, example_kwargs: dict | None = None, atol: float = ATOL_FP32) -> OnnxExport:
    """Export `module` (an optimized module, any nn.Module, or an ExportedProgram) to ONNX at
    `path`, check it with onnx.checker and onnxruntime on the example inputs, and return
    what was measured. Raises ExportError (leaving nothing at `path`) when an op cannot be
    translated or the onnxruntime outputs differ from PyTorch by more than `atol` (fp32).
    """
    if example_inputs is None and not example_kwargs:
        entry = getattr(module, "_last", None)
        if entry is None:
            raise ValueError("export_onnx needs example_inputs (or an optimized module that has been called once)")
        args, kwargs = entry.captured.example_args, entry.captured.example_kwargs
    else:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        kwargs = dict(example_kwargs or {})
    if opset < 18:
        raise ValueError(f"opset must be >= 18 (the translations use opset-18 ops), not {opset}")
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a directory; give a file name (e.g. {path / 'model.onnx'})")
    if not path.parent.exists():
        raise ExportError(f"the directory {path.parent} does not exist; create it first")
    if not path.parent.is_dir():
        raise ExportError(f"cannot write {path}: {path.parent} is not a directory; choose another path")
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"cannot write to {path.parent}: permission denied; choose another path")
    try:  # os.access is not enough (root, read-only mounts): try it now, before the conversion's work
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".probe")
    except OSError as e:
        raise ExportError(f"cannot write to {path.parent}: {(e.strerror or str(e)).lower()}; choose another path") from e
    os.close(fd)
    os.remove(probe)

    kwargs = _call_kwargs(module, args, kwargs)
    fixed_why = ""
    attempts = (2, 1, 0) if dynamic else (0,)  # batch+sequence dynamic, then batch only, then static
    needs_length = _length_bound_ops(module)
    if needs_length and dynamic:  # skip an attempt that is bound to fail (each costs a full conversion)
        attempts, fixed_why = (1, 0), f"{needs_length} needs the sequence length at export time (its gather plan)"
    for dims in attempts:
        ep = _for_onnx(_program(module, args, kwargs, dims), owned=not isinstance(module, torch.export.ExportedProgram))
        try:
            with _quiet():
                program = torch.onnx.export(ep, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                            custom_translation_table=translation_table(opset), verbose=False,
                                            optimize=False)
                _fix_ir(program.model)
                program.optimize()
            break
        except Exception as e:  # noqa: BLE001 - rephrased with the failing op and site
            static = _needs_static(e)
            if static is None or dims == 0:
                raise ExportError(_explain(e, ep)) from e
            fixed_why = str(static)
    worst = _check_and_save(program, ep, args, kwargs, path, atol)
    dyn, fixed = _axes(ep, dims, fixed_why)
    return OnnxExport(str(path), opset, worst, dyn, fixed)


def _call_kwargs(module, args: tuple, kwargs: dict) -> dict:
    """The kwargs the model is exported and run with: the KV cache off where its forward
    takes `use_cache` (as optimize() does), so the graph returns no cache object. An
    optimised module's graphs hold use_cache=False already; a plain module is exported
    with it passed (a constant, not an input of the ONNX graph)."""
    from .hf_calls import prepare_call
    from .optimize import OptimizedModule

    if isinstance(module, OptimizedModule):
        return module.call_kwargs(args, kwargs)
    if isinstance(module, nn.Module):
        graph_kwargs, fixed, _ = prepare_call(module, args, kwargs)
        return {**graph_kwargs, **fixed}
    return kwargs


_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _for_onnx(ep: torch.export.ExportedProgram, owned: bool) -> torch.export.ExportedProgram:
    """The program with a contiguous `clone` after every `scaled_dot_product_attention`.

    torch.onnx decomposes the program before converting it. In that re-trace the
    attention's output has the CPU flash kernel's layout ([B, N, H, D] in memory), so the
    `.transpose(1, 2).contiguous().view(...)` (or `.reshape`) that follows every attention
    site looks contiguous and decomposes to a bare view; torch.onnx's type-promotion pass
    then propagates again with a contiguous [B, H, N, D] output and that view fails
    ("Cannot view a tensor with shape ..."): Swin's windows, BEiT's relative position bias,
    and plain torch.onnx.export of these models with sdpa attention. After a clone the
    strides are the same in both, and a clone converts to nothing (ONNX has no strides)."""
    def sites(program):
        return [n for n in program.graph.nodes if n.op == "call_function" and n.target is _SDPA]

    if not sites(ep):
        return ep
    if not owned:  # the caller's own ExportedProgram: leave it as it was
        import copy

        ep = copy.deepcopy(ep)
    graph = ep.graph
    for node in sites(ep):
        with graph.inserting_after(node):
            clone = graph.call_function(torch.ops.aten.clone.default, (node,),
                                        {"memory_format": torch.contiguous_format})
        node.replace_all_uses_with(clone, delete_user_cb=lambda user: user is not clone)
        clone.meta = {**node.meta, "val": node.meta["val"].clone(memory_format=torch.contiguous_format)} \
            if isinstance(node.meta.get("val"), torch.Tensor) else dict(node.meta)
    ep.graph_module.recompile()
    return ep


_TINY = 1e-8  # onnxscript's `x + 0` / `x - 0` rules take any scalar within this of 0 for 0


def _fix_ir(model) -> None:
    """Fixes to the converted graph before onnxscript's optimizer runs on it.

    - A dim torch.export left symbolic although it is a number (an image's channels under
      Dim.AUTO come back as SymInt 3) is named "3" in the ONNX graph: make it the int.
    - A scalar constant added or subtracted that the optimizer would take for 0 (|c| <=
      1e-8, e.g. an eps of 1e-12) becomes a 1-element tensor it leaves alone; dropping it
      turns a zero row's norm into 0/0 = NaN.
    """
    import onnx_ir as ir

    def concrete(value) -> None:
        shape = value.shape
        if shape is None:
            return
        dims = [int(d.value) if isinstance(d, ir.SymbolicDim) and isinstance(d.value, str) and d.value.isdigit()
                else d for d in shape]
        if dims != list(shape):
            value.shape = ir.Shape(dims)

    graph = model.graph
    for value in (*graph.inputs, *graph.outputs):
        concrete(value)
    for graph_like in (graph, *model.functions.values()):
        for node in ir.traversal.RecursiveGraphIterator(graph_like):
            for value in node.outputs:
                concrete(value)
            if node.op_type not in ("Add", "Sub") or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
                continue
            for i, value in enumerate(node.inputs):
                other = node.inputs[1 - i]
                tensor = ir.convenience.get_const_tensor(value) if value is not None else None
                if tensor is None or other is None or other.shape is None or len(other.shape) == 0:
                    continue
                array = tensor.numpy()
                if array.ndim or array.dtype.kind != "f" or array.item() == 0 or abs(array.item()) > _TINY:
                    continue
                keep = ir.node("Constant", [], {"value": ir.tensor(array.reshape(1))})
                node.graph.insert_before(node, keep)
                node.replace_input_with(i, keep.outputs[0])


_LENGTH_BOUND = ("sliding_window_attention", "agent_attention")  # their ONNX graphs embed length-sized plans


def _length_bound_ops(module) -> str:
    from .optimize import OptimizedModule

    gm = module._last.gm if isinstance(module, OptimizedModule) and module._last is not None else None
    graph = module.graph if isinstance(module, torch.export.ExportedProgram) else gm.graph if gm is not None else None
    if graph is None:
        return ""
    found = {str(n.target).split(".")[1] for n in graph.nodes if n.op == "call_function"
             and str(n.target).startswith("rewriter.") and str(n.target).split(".")[1] in _LENGTH_BOUND}
    return ", ".join(sorted(found))


def _needs_static(exc: BaseException):
    from .kernels._onnx import NeedsStaticShape

    while exc is not None:
        if isinstance(exc, NeedsStaticShape):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _check_and_save(program, ep, args, kwargs, path: Path, atol: float) -> float:
    """Write to a temporary file beside `path`, check it, compare in onnxruntime, then move;
    returns the max abs error against PyTorch."""
    import onnx

    from .capture import _describe, _first_line

    try:
        with torch.no_grad():
            output = ep.module()(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - e.g. a dtype the model's weights do not take (export does not check)
        raise ExportError(f"the model fails on the example inputs ({_describe(args, kwargs)}): {_first_line(e)}; "
                          "pass example inputs of the shapes and dtypes the model expects") from e
    leaves, spec = pytree.tree_flatten(output)
    expected = [t for t in leaves if isinstance(t, torch.Tensor)]
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent, prefix=f".{path.stem}.")
    os.close(fd)
    try:
        program.save(tmp)
        onnx.checker.check_model(tmp, full_check=False)
        got = [torch.from_numpy(o) for o in _run_ort(tmp, _ort_inputs(ep, args, kwargs))]
        if len(got) != len(expected):
            raise ExportError(f"the ONNX graph returns {len(got)} outputs, PyTorch {len(expected)}")
        it = iter(got)  # the onnxruntime outputs in the model's own output structure: fields by name
        actual = pytree.tree_unflatten([next(it) if isinstance(t, torch.Tensor) else t for t in leaves], spec)
        worst = 0.0
        for name, o, e in pairs(actual, output):
            if not isinstance(e, torch.Tensor):
                continue
            if e.is_floating_point():
                err = error(o, e)["max_abs"]
                if err == float("inf"):
                    raise ExportError(f"onnxruntime output {name} has NaN/Inf where PyTorch has none (or the reverse), "
                                      f"or another shape ({list(o.shape)} vs {list(e.shape)})")
                worst = max(worst, err)
            elif not torch.equal(o, e):
                raise ExportError(f"an integer output of the ONNX graph ({name}) differs from PyTorch")
        floats = [e for e in expected if e.is_floating_point()]
        if floats and all(e.dtype == torch.float32 for e in floats) and worst > atol:
            raise ExportError(f"onnxruntime differs from PyTorch by {worst:.2e} (> {atol:.0e} allowed in fp32)")
        os.replace(tmp, path)
        return worst
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warnings for every export; keep the caller's output clean."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
