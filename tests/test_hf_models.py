"""Third-party architectures (transformers, small configs, random weights)."""
import pytest
import torch

import rewriter
from tests.helpers import assert_close, count, run_both
from tests.models import hf

aten = torch.ops.aten
RMS = torch.ops.rewriter.rms_norm.default
SDPA = aten.scaled_dot_product_attention.default


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["gpt2", "vit"])
def test_pre_ln_models_convert_every_residual_layer_norm(name, impl):
    model, x = hf.BUILDERS[name](attn_implementation=impl)
    opt = rewriter.optimize(model, x)
    r = opt.report
    assert r.count("residual_stream", "applied") == 1
    assert r.count("layer_norm", "applied", action="rewriter.rms_norm") == 5  # 2 layers x 2 + final
    assert count(opt.graph_module, aten.layer_norm.default) == 0
    assert count(opt.graph_module, SDPA) == 2
    assert r.count("attention", "applied") == 2
    assert_close(*run_both(model, opt, x))


@pytest.mark.parametrize("name", ["bert", "bert_with_mask"])
def test_bert_is_post_ln_and_refused(name):
    model, x = hf.BUILDERS[name](attn_implementation="eager")
    opt = rewriter.optimize(model, x)
    streams = opt.report.select(kind="residual_stream")
    assert len(streams) == 5 and all(s.status == "refused" for s in streams)
    assert sum("Post-LN" in s.reason for s in streams) == 4
    assert opt.report.count("layer_norm", "applied", action="rewriter.layer_norm") == 5
    assert opt.report.count("attention", "applied") == 2
    assert_close(*run_both(model, opt, x))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_rms_norms_and_grouped_attention(impl):
    model, x = hf.BUILDERS["llama"](attn_implementation=impl)
    opt = rewriter.optimize(model, x)
    gm = opt.graph_module
    assert opt.report.count("rms_norm", "applied") == 5
    assert count(gm, RMS) == 5
    sdpa = [n for n in gm.graph.nodes if n.target == SDPA]
    assert len(sdpa) == 2 and all(n.kwargs.get("enable_gqa") for n in sdpa)  # repeat_kv folded
    assert not any(n.target == aten.expand.default and len(n.args[1]) == 5 for n in gm.graph.nodes)
    assert_close(*run_both(model, opt, x))


def test_gpt2_pre_crmsnorm():
    model, x = hf.BUILDERS["gpt2"](attn_implementation="eager")
    opt = rewriter.optimize(model, x, norm="crms")
    assert opt.report.count("residual_stream", "applied", action="pre_crmsnorm") == 1
    assert count(opt.graph_module, torch.ops.rewriter.crms_norm.default) == 5
    assert_close(*run_both(model, opt, x))
