"""rewriter: capture a PyTorch model as a graph, rewrite its attention and normalisation
sites (exactly by default, approximately on request), and emit something that runs."""
from __future__ import annotations

from . import kernels  # noqa: F401  (registers the rewriter:: ops; imports no Triton)
from . import autotune  # noqa: F401  (callable: rewriter.autotune(model, inputs); imports no Triton/Optuna)
from .calibrate import calibrate
from .capture import CaptureError, capture
from .optimize import OptimizedModule, optimize
from .policy_search import search_policy
from .report import RewriteReport


def export_onnx(*args, **kwargs):
    """ONNX export checked in onnxruntime; see `rewriter.export.export_onnx`."""
    from .export import export_onnx as _export_onnx  # imports onnx/onnxscript only when used

    return _export_onnx(*args, **kwargs)


__all__ = ["optimize", "capture", "export_onnx", "autotune", "calibrate", "search_policy", "CaptureError",
           "OptimizedModule", "RewriteReport"]
__version__ = "0.1.0"
