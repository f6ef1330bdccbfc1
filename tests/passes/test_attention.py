import pytest
import torch
from torch import nn

import rewriter
from rewriter.passes.attention import ATTENTION_RULES
from tests.helpers import assert_close, count, run_both, targets
from tests.models import own

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


@pytest.mark.parametrize("style", own.AttentionStyles.STYLES)
def test_every_style_becomes_one_sdpa_node(style):
    model, x = own.attention_style(style)
    opt = rewriter.optimize(model, x)
    gm = opt.graph_module
    assert opt.report.count("attention", "applied") == 1
    assert count(gm, SDPA) == 1
    assert not any(getattr(t, "overloadpacket", None) in (aten.softmax, aten._softmax) for t in targets(gm))
    assert_close(*run_both(model, opt, x))


def test_nanogpt_causal_attention_and_dynamic_length():
    model, x = own.nanogpt()
    opt = rewriter.optimize(model, x)
    assert count(opt.graph_module, SDPA) == 2
    longer = torch.randint(0, 97, (3, 17))  # another batch and length: same graph, still exact
    assert_close(*run_both(model, opt, (longer,)))


def test_multihead_attention_module_is_canonicalised():
    model, x = own.post_ln_encoder()
    opt = rewriter.optimize(model, x)
    assert opt.report.count("attention", "applied") == 2
    assert_close(*run_both(model, opt, x))


class ReturnsProbabilities(nn.Module):
    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
        return p @ v, p


def test_refuses_when_probabilities_are_read_elsewhere():
    q = torch.randn(2, 2, 5, 4)
    opt = rewriter.optimize(ReturnsProbabilities(), (q, q.clone(), q.clone()))
    [site] = opt.report.select(kind="attention")
    assert site.status == "refused" and "pattern" in site.reason
    assert count(opt.graph_module, SDPA) == 0


class SoftmaxOverQueries(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v


def test_refuses_softmax_over_the_wrong_dim():
    q = torch.randn(2, 2, 5, 4)
    opt = rewriter.optimize(SoftmaxOverQueries(), (q, q.clone(), q.clone()))
    [site] = opt.report.select(kind="attention")
    assert site.status == "refused" and "dim" in site.reason


def test_failed_site_check_is_rolled_back(monkeypatch):
    rule = ATTENTION_RULES[0]
    good = rule.rewrite

    def wrong_scale(m, gm):
        node = good(m, gm)
        node.kwargs = {**node.kwargs, "scale": 3.0}
        return node

    monkeypatch.setattr(rule, "rewrite", wrong_scale)
    model, x = own.attention_style("matmul_mul")
    opt = rewriter.optimize(model, x)
    [site] = opt.report.select(kind="attention")
    assert site.status == "rolled_back" and "differs" in site.reason
    assert count(opt.graph_module, SDPA) == 0
    assert_close(*run_both(model, opt, x), tol=0.0)


class ReshapedScores(nn.Module):
    """DeBERTa's layout: scores on [B·H, L, L], viewed to [B, H, L, L] for the mask and softmax, back for PV."""

    def forward(self, q3, k3, v3, keep):
        s = torch.bmm(q3, k3.transpose(1, 2)) * 0.5
        s = s.view(-1, 2, 5, 5).masked_fill(~keep, torch.finfo(s.dtype).min)
        return torch.bmm(torch.softmax(s, -1).view(-1, 5, 5), v3)


def test_reshaped_scores_are_reported_with_their_reason():
    q = torch.randn(4, 5, 8)
    keep = torch.rand(2, 1, 5, 5) > 0.3
    model, x = ReshapedScores(), (q, q.clone(), q.clone(), keep)
    opt = rewriter.optimize(model, x)
    [site] = opt.report.select(kind="attention")
    assert site.status == "refused" and "reshaped" in site.reason
    assert_close(*run_both(model, opt, x))


def test_approximate_modes_report_the_sites_no_pattern_read():
    q = torch.randn(4, 5, 8)
    model, x = ReshapedScores(), (q, q.clone(), q.clone(), torch.rand(2, 1, 5, 5) > 0.3)
    opt = rewriter.optimize(model, x, attention="linear")
    [site] = opt.report.select(pass_name="approximate:linear")
    assert site.status == "refused" and "not canonicalised" in site.reason and "reshaped" in site.reason
