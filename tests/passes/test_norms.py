import pytest
import torch
from torch import nn

import rewriter
from tests.helpers import assert_close, count, run_both
from tests.models import own

RMS = torch.ops.rewriter.rms_norm.default
LN = torch.ops.rewriter.layer_norm.default


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", own.RMSNormStyles.STYLES)
def test_rms_norm_styles_fuse(style, dtype):
    model, x = own.rms_norm_style(style, dtype=dtype)
    opt = rewriter.optimize(model, x)
    assert opt.report.count("rms_norm", "applied") == 1
    gm = opt.graph_module
    assert count(gm, RMS) == 1
    assert count(gm, torch.ops.aten.rsqrt.default) + count(gm, torch.ops.aten.sqrt.default) == 0
    [node] = [n for n in gm.graph.nodes if n.target == RMS]
    assert node.args[1] is not None, "the gain was not folded into the op"
    if style in ("gemma", "x_transformers_unit_offset"):
        assert node.args[4] == 1.0  # (1 + w) scaling
    assert_close(*run_both(model, opt, x), dtype=dtype)


@pytest.mark.parametrize("style", own.LayerNormStyles.STYLES)
def test_hand_written_layer_norms_become_the_op(style):
    model, x = own.layer_norm_style(style)
    opt = rewriter.optimize(model, x)
    assert opt.report.count("layer_norm", "applied", action="aten.layer_norm") == 1
    gm = opt.graph_module
    assert count(gm, torch.ops.rewriter.layer_norm.default) == 1
    assert count(gm, torch.ops.aten.rsqrt.default) + count(gm, torch.ops.aten.sqrt.default) == 0
    [node] = [n for n in gm.graph.nodes if n.target == torch.ops.rewriter.layer_norm.default]
    assert (node.args[1] is not None) == (style != "no_affine") and (node.args[2] is not None) == ("only" not in style
                                                                                                  and style != "no_affine")
    assert_close(*run_both(model, opt, x))


@pytest.mark.parametrize("style, kind, words", [
    ("annotated_transformer", "layer_norm", "outside the root"),
    ("unbiased_var", "layer_norm", "biased variance"),
    ("normalize_no_scale", "rms_norm", "L2 normalisation"),
])
def test_normalisations_that_are_not_the_op_are_reported_not_rewritten(style, kind, words):
    assert style in own.LayerNormStyles.NOT_A_LAYER_NORM
    model, x = own.layer_norm_style(style)
    opt = rewriter.optimize(model, x)
    [site] = [s for s in opt.report.sites if s.kind in ("layer_norm", "rms_norm")]
    assert (site.kind, site.status) == (kind, "refused") and words in site.reason, site.reason
    assert_close(*run_both(model, opt, x), tol=0.0)


class TwoDimLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm([4, 8])

    def forward(self, x):
        return self.norm(x)


def test_layer_norm_over_two_dims_is_refused():
    opt = rewriter.optimize(TwoDimLayerNorm(), (torch.randn(2, 4, 8),))
    [site] = opt.report.select(kind="layer_norm")
    assert site.status == "refused" and "last dim" in site.reason


class MeanOverSequence(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-6)


def test_rms_over_another_dim_is_refused():
    opt = rewriter.optimize(MeanOverSequence(), (torch.randn(2, 4, 8),))
    [site] = opt.report.select(kind="rms_norm")
    assert site.status == "refused" and "last dim" in site.reason


def test_post_ln_norms_become_rewriter_layer_norm():
    model, x = own.post_ln_encoder()
    opt = rewriter.optimize(model, x)
    assert opt.report.count("layer_norm", "applied", action="rewriter.layer_norm") == 4
    assert count(opt.graph_module, LN) == 4
    assert_close(*run_both(model, opt, x))
