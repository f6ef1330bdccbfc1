"""Approximate attention rewrites: they fire where asked, refuse with reasons, follow the
policy, carry causality and padding masks, and report their errors.

The strongest checks use settings where a local form covers every key (a window at
least as long as the sequence, a 2-D window or neighbourhood the size of the grid):
the rewrite must then reproduce full attention, which exercises the mask, causality,
scale, GQA and prefix-token plumbing end to end.
"""
import pytest
import torch

import rewriter
from tests.helpers import assert_close, count, run_both
from tests.models import hf, own

ops = torch.ops.rewriter
SDPA = torch.ops.aten.scaled_dot_product_attention.default
FULL = 1e-4  # different summation order than SDPA, same function

COVERING = [  # (builder, form, options that make the form see every key)
    ("nanogpt", "sliding_window", dict(window=64, sinks=0)),
    ("gpt2", "sliding_window", dict(window=64, sinks=0)),
    ("llama", "sliding_window", dict(window=64, sinks=2)),
    ("bert_with_mask", "sliding_window", dict(window=64, sinks=0)),
    ("vit", "window2d", dict(window=4)),
    ("vit", "neighborhood", dict(kernel_size=4)),
    ("tiny_vit", "window2d", dict(window=4, shift=0)),
    ("tiny_vit", "neighborhood", dict(kernel_size=4)),
]


def _build(name, impl="eager"):
    if name in ("nanogpt", "tiny_vit"):
        return getattr(own, name)()
    return hf.BUILDERS[name](attn_implementation=impl)


@pytest.mark.parametrize("name,form,options", COVERING, ids=[f"{c[0]}-{c[1]}" for c in COVERING])
def test_covering_window_reproduces_full_attention(name, form, options):
    model, x = _build(name)
    opt = rewriter.optimize(model, x, attention=form, **options)
    sites = opt.report.select(pass_name=f"approximate:{form}")
    assert len(sites) == 2 and all(s.status == "applied" for s in sites), [s.reason for s in sites]
    assert count(opt.graph_module, SDPA) == 0
    for s in sites:
        assert s.error["rel_l2"] < FULL and s.error["cosine"] > 0.9999
    assert opt.report.verification["approximate_output"]["rel_l2"] < FULL
    assert_close(*run_both(model, opt, x), tol=FULL)


def test_padding_mask_is_carried_to_new_inputs():
    model, (ids, mask) = hf.bert_with_mask()
    opt = rewriter.optimize(model, (ids, mask), attention="sliding_window", window=64, sinks=0)
    assert all(s.params["key_padding_mask"] for s in opt.report.select(pass_name="approximate:sliding_window"))
    other = torch.ones(3, 9, dtype=torch.long)
    other[0, 4:] = 0
    other[2, 7:] = 0
    new_ids = torch.randint(0, 100, (3, 9))
    assert_close(*run_both(model, opt, (new_ids, other)), tol=FULL)


def test_causal_sites_get_causal_replacements():
    model, x = own.nanogpt()
    opt = rewriter.optimize(model, x, attention="linear")
    sites = opt.report.select(pass_name="approximate:linear")
    assert [s.params["causal"] for s in sites] == [True, True]
    [node, _] = [n for n in opt.graph_module.graph.nodes if n.target == ops.linear_attention.default]
    assert node.args[5] is True  # the op's causal flag
    longer = (torch.randint(0, 97, (1, 20)),)
    with torch.no_grad():  # causality: a token's output does not depend on later tokens
        full = opt(*longer)
        prefix = opt(longer[0][:, :7])
    assert_close(prefix, full[:, :7], tol=1e-5)


@pytest.mark.parametrize("form,options", [
    ("linear", {}), ("linear", dict(feature_map="focused", normalize="output_norm")),
    ("agent", dict(num_agents=4)), ("window2d", dict(window=2)), ("neighborhood", dict(kernel_size=3, dilation=1)),
])
def test_vision_forms_report_error_and_reexport(form, options, tmp_path):
    model, x = hf.vit(attn_implementation="sdpa")
    opt = rewriter.optimize(model, x, attention=form, **options)
    sites = opt.report.select(pass_name=f"approximate:{form}")
    assert [s.status for s in sites] == ["applied", "applied"]
    for s in sites:
        assert 0 < s.error["rel_l2"] < float("inf") and -1 <= s.error["cosine"] <= 1
        assert s.params and "causal" in s.params
    if form in ("window2d", "neighborhood", "agent"):
        assert sites[0].params["grid"] == [4, 4] and sites[0].params["prefix"] == 1
    out = opt.report.verification["approximate_output"]
    assert out["rel_l2"] > 0
    path = tmp_path / "vit.pt2"
    torch.export.save(opt.export(*x), path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        assert_close(loaded(*x), opt(*x), tol=1e-6)


def test_swin_shift_alternates_by_layer():
    model, x = hf.vit()
    opt = rewriter.optimize(model, x, attention="window2d", window=2)
    shifts = [s.params["shift"] for s in opt.report.select(pass_name="approximate:window2d")]
    assert shifts == [[0, 0], [1, 1]]


@pytest.mark.parametrize("policy,expected", [
    (dict(keep_first=1), ["refused", "applied"]),
    (dict(keep_last=1), ["applied", "refused"]),
    (dict(alternate=True), ["applied", "refused"]),
    (dict(layers=[1]), ["refused", "applied"]),
    (dict(layers="h.0.*"), ["applied", "refused"]),
    (dict(layers=lambda i, path: path.endswith("1.attn")), ["refused", "applied"]),
])
def test_policy_selects_layers(policy, expected):
    model, x = own.nanogpt()
    opt = rewriter.optimize(model, x, attention="sliding_window", window=4, **policy)
    sites = opt.report.select(pass_name="approximate:sliding_window")
    assert [s.status for s in sites] == expected
    assert all("kept full attention" in s.reason for s in sites if s.status == "refused")
    assert count(opt.graph_module, SDPA) == 1


def test_per_layer_parameters():
    model, x = own.nanogpt()
    opt = rewriter.optimize(model, x, attention="sliding_window", window=[3, 6], sinks=lambda i: i + 1)
    params = [(s.params["window"], s.params["sinks"]) for s in opt.report.select(pass_name="approximate:sliding_window")]
    assert params == [(3, 1), (6, 2)]


@pytest.mark.parametrize("name,form,options,reason", [
    ("nanogpt", "agent", {}, "non-causal"),
    ("gpt2", "window2d", {}, "non-causal"),
    ("vit", "neighborhood", dict(kernel_size=7), "smaller than kernel"),
    ("nanogpt", "neighborhood", dict(kernel_size=3), "non-causal"),
])
def test_refusals_say_why(name, form, options, reason):
    model, x = _build(name)
    opt = rewriter.optimize(model, x, attention=form, **options)
    sites = opt.report.select(pass_name=f"approximate:{form}")
    assert sites and all(s.status == "refused" and reason in s.reason for s in sites)
    assert_close(*run_both(model, opt, x))  # nothing changed


@pytest.mark.parametrize("init", ["random", "zeros"])
def test_learned_position_bias_is_refused_whatever_its_value(init):
    """softmax(q kᵀ + relative bias): refused though the table is zero (Swin initialises it so),
    since the bias is read from a parameter that training or load_state_dict changes."""
    model, x = own.attention_style("einsum_free_permute")
    if init == "zeros":
        torch.nn.init.zeros_(model.rel_bias)
    opt = rewriter.optimize(model, x, attention="linear")
    [site] = opt.report.select(pass_name="approximate:linear")
    assert site.status == "refused" and "learned bias" in site.reason and "rel_bias" in site.reason
    assert_close(*run_both(model, opt, x))


def test_constant_additive_bias_is_refused():
    model, x = own.attention_style("einsum_free_permute")
    bias = model.rel_bias.detach().clone()
    del model.rel_bias
    model.register_buffer("rel_bias", bias)  # a fixed bias (ALiBi-like): no parameter behind it
    opt = rewriter.optimize(model, x, attention="linear")
    [site] = opt.report.select(pass_name="approximate:linear")
    assert site.status == "refused" and "additive bias" in site.reason


def test_grid_cannot_be_inferred_without_a_patch_embedding():
    model, x = own.attention_style("matmul_mul")  # 10 tokens, no conv
    opt = rewriter.optimize(model, x, attention="window2d")
    [site] = opt.report.select(pass_name="approximate:window2d")
    assert site.status == "refused" and "grid=(H, W)" in site.reason
    opt = rewriter.optimize(model, x, attention="window2d", grid=(2, 5), prefix=0, window=(2, 5))
    [site] = opt.report.select(pass_name="approximate:window2d")
    assert site.status == "applied" and site.error["rel_l2"] < FULL  # one window covers the 2x5 grid


@pytest.mark.parametrize("kwargs,match", [
    (dict(attention="bogus"), "attention must be one of"),
    (dict(attention="linear", window=3), "unknown"),
    (dict(window=3), "need an approximate attention"),
    (dict(attention="linear", keep_first=-1), "keep_first"),
    (dict(attention="linear", layers=3.5), "layers must be"),
])
def test_bad_options_raise_before_capture(kwargs, match):
    model, x = own.nanogpt()
    with pytest.raises(ValueError, match=match):
        rewriter.optimize(model, x, **kwargs)


def test_exact_passes_unchanged_by_default():
    model, x = own.nanogpt()
    opt = rewriter.optimize(model, x)
    assert not any(s.pass_name.startswith("approximate") for s in opt.report.sites)
    assert "approximate_output" not in opt.report.verification


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_causal_lms_take_linear_attention_and_reexport(name):
    model, x = hf.BUILDERS[name](attn_implementation="sdpa")
    opt = rewriter.optimize(model, x, attention="linear", feature_map="relu")
    sites = opt.report.select(pass_name="approximate:linear")
    assert [s.status for s in sites] == ["applied", "applied"] and all(s.params["causal"] for s in sites)
    assert count(opt.graph_module, ops.linear_attention.default) == 2
    ep = opt.export(*x)
    with torch.no_grad():
        assert_close(ep.module()(*x), opt(*x), tol=1e-6)


class BandAttention(torch.nn.Module):
    """Causal attention limited to the last 3 keys, as a boolean mask (Mistral's sliding_window)."""

    def forward(self, q, k, v):
        i = torch.arange(q.shape[-2])
        d = i[:, None] - i[None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(d >= 0) & (d < 3))


@pytest.mark.parametrize("form", ["linear", "sliding_window"])
def test_causal_band_mask_is_named_in_the_refusal(form):
    q = torch.randn(2, 2, 8, 4)
    model, x = BandAttention(), (q, q.clone(), q.clone())
    opt = rewriter.optimize(model, x, attention=form)
    [site] = opt.report.select(pass_name=f"approximate:{form}")
    assert site.status == "refused" and "causal band of 3 keys" in site.reason
    assert_close(*run_both(model, opt, x))


THIRD_PARTY_SPELLINGS = ["einsum", "einsum_heads_in_subscript", "einsum_keys_transposed", "einsum_ellipsis",
                         "einsum_3d", "hand_softmax", "hand_softmax_no_max", "sinks_concat"]


@pytest.mark.parametrize("mode, options", [("linear", {}), ("sliding_window", {"window": 4})], ids=["linear", "window"])
@pytest.mark.parametrize("style", THIRD_PARTY_SPELLINGS)
def test_third_party_spellings_are_rewritten_by_approximate_modes(style, mode, options):
    """Attention written with einsum or a softmax by hand is canonicalised first, so the
    approximate form replaces it (with its error measured) like any other site."""
    model, x = own.attention_style(style)
    opt = rewriter.optimize(model, x, attention=mode, **options)
    [site] = opt.report.select(pass_name=f"approximate:{mode}")
    assert site.status == "applied", site.reason
    assert site.error["rel_l2"] > 0 and opt.report.verification["approximate_output"]["rel_l2"] > 0
    assert count(opt.graph_module, SDPA) == 0


def test_sink_tokens_concatenated_onto_keys_become_the_windows_sinks():
    """StreamingLLM-style learned sinks in front of K and V: the sliding window keeps them as
    its sinks (so a window covering the sequence reproduces full attention)."""
    model, x = own.attention_style("sinks_concat")
    opt = rewriter.optimize(model, x, attention="sliding_window", window=64, sinks=0)
    [site] = opt.report.select(pass_name="approximate:sliding_window")
    assert site.status == "applied" and site.params["prepended_sinks"] == 2 and site.error["rel_l2"] < FULL
    assert_close(*run_both(model, opt, x), tol=FULL)


@pytest.mark.parametrize("kind, words", [
    ("t5_buckets", "bucketed distance"), ("swin_table", "table indexed by relative position"),
    ("sam_decomposed", "decomposed relative position"), ("alibi", "ALiBi"),
])
def test_each_position_bias_kind_has_its_reason(kind, words):
    """Exact by default (the bias is kept as the SDPA mask); each approximate mode names the bias kind."""
    model, x = own.position_bias(kind)
    exact = rewriter.optimize(model, x)
    assert exact.report.count("attention", "applied") == 1
    assert_close(*run_both(model, exact, x))
    opt = rewriter.optimize(model, x, attention="linear")
    [site] = opt.report.select(pass_name="approximate:linear")
    assert site.status == "refused" and words in site.reason, site.reason
    assert_close(*run_both(model, opt, x))
