"""ONNX export of rewritten models, checked in ONNX Runtime before the file is kept.

The rewritten program is re-exported with torch.export, converted by torch.onnx's
dynamo exporter with a translation for every `rewriter::` op (`kernels/<op>/onnx.py`),
checked with `onnx.checker`, run in onnxruntime on the example inputs and compared
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
    """{rewriter op overload: onnxscript translation}."""
    from .kernels.agent_attention import onnx as agent
    from .kernels.layer_norm import onnx as layer_norm
    from .kernels.linear_attention import onnx as linear
    from .kernels.rms_norm import onnx as rms
    from .kernels.window_attention import onnx as window

    ops = torch.ops.rewriter
    return {
        ops.rms_norm.default: rms.rms_norm_opset23 if opset >= 23 else rms.rms_norm,
        ops.crms_norm.default: rms.crms_norm,
        ops.layer_norm.default: layer_norm.layer_norm,
        ops.linear_attention.default: linear.linear_attention,
        ops.agent_attention.default: agent.agent_attention,
        ops.sliding_window_attention.default: window.sliding_window_attention,
        ops.window_attention_2d.default: window.window_attention_2d,
        ops.neighborhood_attention_2d.default: window.neighborhood_attention_2d,
    }


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


def _axes(ep: torch.export.ExportedProgram, why: str) -> tuple[dict[str, list[int]], dict[str, str]]:
    dynamic, fixed = {}, {}
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in ep.graph_signature.user_inputs:
            continue
        v = node.meta.get("val")
        if not isinstance(v, torch.Tensor):
            continue
        dims = [i for i, s in enumerate(v.shape) if not isinstance(s, int)]
        if dims:
            dynamic[node.name] = dims
        for i in range(min(v.dim(), 2)):
            if i not in dims:
                fixed[f"{node.name}[{i}]"] = why or "the model specialises on this size (torch.export kept it static)"
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


def _leaves(x) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def _run_ort(path: str, args: tuple, kwargs: dict) -> list:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    flat = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(flat):
        raise ExportError(f"the ONNX graph takes {len(names)} inputs but {len(flat)} example tensors were given")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, flat)}
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

    fixed_why = ""
    attempts = (2, 1, 0) if dynamic else (0,)  # batch+sequence dynamic, then batch only, then static
    needs_length = _length_bound_ops(module)
    if needs_length and dynamic:  # skip an attempt that is bound to fail (each costs a full conversion)
        attempts, fixed_why = (1, 0), f"{needs_length} needs the sequence length at export time (its gather plan)"
    for dims in attempts:
        ep = _program(module, args, kwargs, dims)
        try:
            with _quiet():
                program = torch.onnx.export(ep, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                                            custom_translation_table=translation_table(opset), verbose=False)
            break
        except Exception as e:  # noqa: BLE001 - rephrased with the failing op and site
            static = _needs_static(e)
            if static is None or dims == 0:
                raise ExportError(_explain(e, ep)) from e
            fixed_why = str(static)
    worst = _check_and_save(program, ep, args, kwargs, path, atol)
    dyn, fixed = _axes(ep, fixed_why)
    return OnnxExport(str(path), opset, worst, dyn, fixed)


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
            expected = _leaves(ep.module()(*args, **kwargs))
    except Exception as e:  # noqa: BLE001 - e.g. a dtype the model's weights do not take (export does not check)
        raise ExportError(f"the model fails on the example inputs ({_describe(args, kwargs)}): {_first_line(e)}; "
                          "pass example inputs of the shapes and dtypes the model expects") from e
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent, prefix=f".{path.stem}.")
    os.close(fd)
    try:
        program.save(tmp)
        onnx.checker.check_model(tmp, full_check=False)
        got = _run_ort(tmp, args, kwargs)
        if len(got) != len(expected):
            raise ExportError(f"the ONNX graph returns {len(got)} outputs, PyTorch {len(expected)}")
        worst = 0.0
        for name, o, e in pairs([torch.from_numpy(o) for o in got], expected):
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
