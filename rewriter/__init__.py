"""rewriter: capture a PyTorch model as a graph, rewrite its attention and normalisation
sites (exactly by default, approximately on request), and emit something that runs."""
from __future__ import annotations

from . import kernels  # noqa: F401  (registers the rewriter:: ops; imports no Triton)
from .capture import CaptureError, capture
from .optimize import OptimizedModule, optimize
from .report import RewriteReport

__all__ = ["optimize", "capture", "CaptureError", "OptimizedModule", "RewriteReport"]
__version__ = "0.1.0"
