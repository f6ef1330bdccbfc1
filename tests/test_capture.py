import pytest
import torch
import torch.fx
from torch import nn

import rewriter
from rewriter import CaptureError
from tests.helpers import assert_close, count
from tests.models import own


def test_export_with_dynamic_batch_and_sequence():
    model, x = own.nanogpt()
    cap = rewriter.capture(model, x)
    assert cap.method == "export" and cap.dynamic_dims == {"idx": [0, 1]}


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return x * 2
        return x


def test_capture_error_names_the_line_and_what_to_try():
    with pytest.raises(CaptureError) as e:
        rewriter.capture(DataDependent(), (torch.randn(3),))
    msg = str(e.value)
    assert "test_capture.py" in msg and "if x.sum() > 0" in msg and "try:" in msg


@torch.fx.wrap
def _gate(x):
    return x * 2 if bool(x.sum() > 0) else x  # opaque to symbolic_trace, fatal to export


class WrappedHelper(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        return _gate(self.ln(x))


def test_symbolic_trace_fallback_still_rewrites():
    model, x = WrappedHelper().eval(), (torch.randn(2, 5, 8),)
    opt = rewriter.optimize(model, x)
    assert opt.report.capture["method"] == "symbolic_trace"
    assert "torch.export failed" in opt.report.capture["notes"][0]
    assert count(opt.graph_module, torch.ops.rewriter.layer_norm.default) == 1
    with torch.no_grad():
        assert_close(opt(*x), model(*x))
