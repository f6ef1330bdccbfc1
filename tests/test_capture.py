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


# symbolic_trace graphs keep the model's own spellings (F.softmax(..., _stacklevel=3),
# x.softmax(-1), torch.matmul, x.bmm) and scale by run-time numbers (math.sqrt(x.shape[-1]));
# the fallback normalises the spellings so the attention patterns see them
TRACEABLE_STYLES = ["matmul_mul", "div_sqrt", "bmm_3d", "baddbmm_bias", "einsum_free_permute", "pre_scaled_qk",
                    "einsum", "einsum_heads_in_subscript", "einsum_3d"]


@pytest.mark.parametrize("style", TRACEABLE_STYLES)
def test_symbolic_trace_fallback_canonicalises_hand_written_attention(style):
    from rewriter.optimize import rewrite_captured

    model, x = own.attention_style(style)
    cap = rewriter.capture(model, x, method="symbolic_trace", dynamic=False)
    gm, report = rewrite_captured(model, cap, {"norm": "auto"})
    (site,) = report.select(kind="attention")
    assert site.status == "applied", site.reason
    assert count(gm, torch.ops.aten.scaled_dot_product_attention.default) == 1
    assert not [n for n in gm.graph.nodes if n.target in (torch.softmax, "softmax", torch.nn.functional.softmax)]
    other = torch.randn(3, *x[0].shape[1:])  # another batch: the graph stays shape-generic
    with torch.no_grad():
        assert_close(gm(other), model(other))


def test_normalise_torch_spellings_keeps_the_function():
    from rewriter.graph import normalise_torch_spellings

    class Spellings(nn.Module):
        def forward(self, a, b):
            p = torch.nn.functional.softmax(a @ b, dim=-1)
            r = a.softmax(-1) + torch.softmax(a, -1, dtype=torch.float64).float() + a.softmax(-1, torch.float64).float()
            r = r + torch.nn.functional.softmax(a, -1, dtype=torch.float64).float()
            return torch.matmul(p, b) + a.matmul(b) + r + torch.bmm(a, b) + a.bmm(b) + torch.matmul(a, b, out=None)

    gm = torch.fx.symbolic_trace(Spellings())
    a, b = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    expected = gm(a, b)
    assert normalise_torch_spellings(gm.graph) == 7  # 4 softmaxes, 2 matmuls, 1 bmm; `out=` stays
    gm.recompile()
    targets = [(n.op, n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert ("call_method", "softmax") not in targets and ("call_method", "bmm") not in targets
    assert (("call_function", torch.nn.functional.softmax) not in targets
            and sum(t == ("call_function", torch.softmax) for t in targets) == 5)
    assert sum(t == ("call_function", torch.matmul) for t in targets) == 1  # the out= one
    assert [n.kwargs for n in gm.graph.nodes if n.target is torch.softmax].count({"dtype": torch.float64}) == 3
    torch.testing.assert_close(gm(a, b), expected, rtol=0, atol=0)
