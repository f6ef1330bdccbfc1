import pytest
import torch
from torch import nn

import rewriter
from rewriter.passes.attention import ATTENTION_RULES
from tests.helpers import assert_close, assert_every_softmax_reported, count, run_both, targets
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
    assert_every_softmax_reported(model, x, opt.report)


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


class LookAlike(nn.Module):
    """Forms that look like attention but are not one the rewrite may take: each must be left
    as written, reported with its reason, and the output unchanged."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.gate = nn.Parameter(torch.rand(2))

    def forward(self, q, k, v):
        if self.form == "einsum_three_operands":  # PV scaled per head inside the einsum
            p = torch.softmax(q @ k.transpose(-2, -1), -1)
            return torch.einsum("bhij,bhjd,h->bhid", p, v, self.gate)
        if self.form == "einsum_outer":  # an outer product, no contraction: not QKᵀ
            s = torch.einsum("bhi,bhj->bhij", q.sum(-1), k.sum(-1))
            return torch.softmax(s, -1) @ v
        if self.form == "softmax_classifier":  # a softmax over logits: not attention
            return torch.softmax(q.sum(-1), -1)
        raise ValueError(self.form)


@pytest.mark.parametrize("form, kind, words", [
    ("einsum_three_operands", "attention", "einsum"),
    ("einsum_outer", "attention", "not one batched matrix product"),
    ("softmax_classifier", "softmax", "not attention"),
])
def test_look_alikes_are_reported_and_left_unchanged(form, kind, words):
    q = torch.randn(2, 2, 5, 4)
    model, x = LookAlike(form), (q, q.clone() + 1, q.clone() - 1)
    opt = rewriter.optimize(model, x)
    [site] = [s for s in opt.report.sites if s.kind in ("attention", "softmax")]
    assert (site.kind, site.status) == (kind, "refused") and words in site.reason, site.reason
    assert count(opt.graph_module, SDPA) == 0
    assert_close(*run_both(model, opt, x), tol=0.0)
    assert_every_softmax_reported(model, x, opt.report)


@pytest.mark.parametrize("equation, ranks, plan", [
    ("bhid,bhjd->bhij", (4, 4), ([0, 1, 2, 3], [0, 1, 3, 2], [0, 1, 2, 3])),
    ("bnhd,bmhd->bhnm", (4, 4), ([0, 2, 1, 3], [0, 2, 3, 1], [0, 1, 2, 3])),
    ("bhnm,bmhd->bnhd", (4, 4), ([0, 1, 2, 3], [0, 2, 1, 3], [0, 2, 1, 3])),
    ("...id,...jd->...ij", (5, 5), ([0, 1, 2, 3, 4], [0, 1, 2, 4, 3], [0, 1, 2, 3, 4])),
    ("id,jd", (2, 2), ([0, 1], [1, 0], [0, 1])),  # implicit output: the letters used once, sorted
])
def test_einsum_matmul_plan(equation, ranks, plan):
    from rewriter.respell import einsum_matmul_plan

    assert einsum_matmul_plan(equation, ranks) == plan


@pytest.mark.parametrize("equation, ranks, words", [
    ("bhid,bhjd,h->bhij", (4, 4), "operands"),
    ("bhid,bhje->bhij", (4, 4), "not one batched matrix product"),
    ("bhii,bhjd->bhij", (4, 4), "repeated"),
    ("...id,jd->...ij", (4, 2), "ellipsis"),
])
def test_einsum_that_is_not_a_matrix_product_is_refused(equation, ranks, words):
    from rewriter.respell import einsum_matmul_plan

    assert words in einsum_matmul_plan(equation, ranks)


class BandMask(nn.Module):
    """Local attention written as a dense mask over every key (Mistral, Gemma-2/Phi-3 local layers)."""

    def __init__(self, kind: str, w: int = 3):
        super().__init__()
        self.kind, self.w = kind, w

    def forward(self, q, k, v, keep):
        n = q.shape[-2]
        i = torch.arange(n)
        d = i[:, None] - i[None, :]
        if self.kind == "causal_band":  # bool, from arange comparisons
            mask = (d >= 0) & (d < self.w)
        elif self.kind == "symmetric_band":  # additive
            mask = torch.zeros(n, n).masked_fill(d.abs() > self.w, float("-inf"))
        elif self.kind == "band_and_padding":  # a padding mask from the inputs folded in
            mask = ((d >= 0) & (d < self.w)) & keep[:, None, None, :]
        elif self.kind == "causal_and_padding":
            mask = (d >= 0) & keep[:, None, None, :]
        else:  # plain causal: no band
            mask = d >= 0
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("kind, window, causal", [("causal_band", 3, True), ("symmetric_band", 7, False)])
def test_band_masks_become_the_exact_sliding_window_op(kind, window, causal):
    q = torch.randn(2, 2, 10, 4)
    keep = torch.ones(2, 10, dtype=torch.bool)
    model, x = BandMask(kind), (q, q.clone() + 0.5, q.clone() - 0.5, keep)
    opt = rewriter.optimize(model, x)
    [site] = opt.report.select(pass_name="mask_structure")
    assert site.status == "applied" and site.params == {"window": window, "causal": causal}
    assert count(opt.graph_module, torch.ops.rewriter.sliding_window_attention.default) == 1
    assert count(opt.graph_module, SDPA) == 0
    assert_close(*run_both(model, opt, x))
    longer = (torch.randn(1, 2, 17, 4), torch.randn(1, 2, 17, 4), torch.randn(1, 2, 17, 4), torch.ones(1, 17, dtype=torch.bool))
    assert_close(*run_both(model, opt, longer))  # another length: the same band
    approx = rewriter.optimize(model, x, attention="linear").report.select(pass_name="approximate:linear")
    assert [s.status for s in approx] == ["refused"] and "already the exact sliding-window op" in approx[0].reason


@pytest.mark.parametrize("kind", ["band_and_padding", "causal_and_padding"])
def test_a_mask_combined_with_padding_from_the_inputs_stays_dense(kind):
    q = torch.randn(2, 2, 10, 4)
    keep = torch.ones(2, 10, dtype=torch.bool)
    model, x = BandMask(kind), (q, q.clone() + 0.5, q.clone() - 0.5, keep)
    opt = rewriter.optimize(model, x)
    rows = opt.report.select(pass_name="mask_structure")
    assert count(opt.graph_module, torch.ops.rewriter.sliding_window_attention.default) == 0
    assert [s.status for s in rows] == ["refused"] and "read from the inputs" in rows[0].reason
    assert [n.args[5] for n in opt.graph_module.graph.nodes if n.target == SDPA] == [False]  # not is_causal
    keep[1, 7:] = False  # padding the example did not have: still the original's answer
    assert_close(*run_both(model, opt, x))


@pytest.mark.parametrize("persistent", [True, False])
def test_a_causal_mask_in_a_buffer_is_recognised_only_outside_the_state_dict(persistent):
    """nanoGPT's `bias` tril buffer is in the state dict: a loaded state must be honoured, so it
    stays a dense mask (with the reason); a non-persistent buffer becomes is_causal."""
    model, x = own.nanogpt()
    if not persistent:
        for block in model.h:
            block.attn.register_buffer("bias", block.attn.bias, persistent=False)
    opt = rewriter.optimize(model, x)
    rows = opt.report.select(pass_name="mask_structure")
    assert len(rows) == 2
    if persistent:
        assert all(s.status == "refused" and "state dict" in s.reason and "attn.bias" in s.reason for s in rows)
        with torch.no_grad():
            for block in model.h:
                block.attn.bias.triu_()  # an edited mask: the optimised model reads it at run time
    else:
        assert all(s.status == "applied" and s.action == "sdpa(is_causal=True)" for s in rows)
    assert_close(*run_both(model, opt, x))


def test_a_causal_mask_built_from_shapes_becomes_is_causal():
    q = torch.randn(2, 2, 10, 4)
    model, x = BandMask("causal"), (q, q.clone() + 0.5, q.clone() - 0.5, torch.ones(2, 10, dtype=torch.bool))
    opt = rewriter.optimize(model, x)
    [site] = opt.report.select(pass_name="mask_structure")
    assert site.status == "applied" and site.action == "sdpa(is_causal=True)"
    [node] = [n for n in opt.graph_module.graph.nodes if n.target == SDPA]
    assert node.args[3] is None and node.args[5] is True
    assert_close(*run_both(model, opt, x))
    longer = tuple(torch.randn(1, 2, 17, 4) for _ in range(3)) + (torch.ones(1, 17, dtype=torch.bool),)
    assert_close(*run_both(model, opt, longer))


class FullyMaskable(nn.Module):
    """A padding mask applied in each way code writes it; the example has no fully masked row."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, q, k, v, keep):
        w = q @ k.transpose(-1, -2) * 0.5
        if self.how == "fill_finite":
            w = w.masked_fill(~keep, -1e4)
        elif self.how == "fill_inf":
            w = w.masked_fill(~keep, float("-inf"))
        elif self.how == "where_inf":
            w = torch.where(keep, w, torch.full([], float("-inf")))
        elif self.how == "where_finite":
            w = torch.where(keep, w, -1e4)
        elif self.how == "add_finite":
            w = w + torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(w.dtype).min)
        else:  # add_inf
            w = w + torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
        return torch.softmax(w, -1) @ v


@pytest.mark.parametrize("how", ["fill_finite", "fill_inf", "where_inf", "where_finite", "add_finite", "add_inf"])
def test_fully_masked_rows_give_the_originals_answer(how):
    """A row whose every key is masked: uniform over the keys where a finite fill replaced the
    scores, NaN where they were -inf, as the original computes; SDPA alone would differ."""
    q = torch.randn(2, 2, 5, 4)
    keep = torch.rand(2, 1, 5, 5) > 0.3
    keep[..., torch.arange(5), torch.arange(5)] = True  # the example: every row keeps a key
    model = FullyMaskable(how)
    opt = rewriter.optimize(model, (q, q + 1, q - 1, keep))
    assert opt.report.count("attention", "applied") == 1
    keep[1, :, 3, :] = False  # now a fully masked row
    got, want = run_both(model, opt, (q, q + 1, q - 1, keep))
    assert torch.isnan(got).any() == ("inf" in how)
    assert_close(got, want)  # NaN on one side only would fail (rewriter.compare)


@pytest.mark.parametrize("style, attr", [("parameter_scale", "temperature"), ("buffer_scale_on_q", "q_scale")])
def test_a_scale_held_by_the_model_is_read_at_run_time(style, attr):
    """A temperature in an nn.Parameter or a buffer: changed after optimising, the optimised
    model follows (it was baked in as a constant before)."""
    model, x = own.attention_style(style)
    opt = rewriter.optimize(model, x)
    assert opt.report.count("attention", "applied") == 1
    with torch.no_grad():
        getattr(model, attr).fill_(2.0)
    assert_close(*run_both(model, opt, x))
