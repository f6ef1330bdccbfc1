"""Decoder LMs with default configs (KV cache on): captured without the cache, said in the
report, generate() gives the original's tokens, and a cache handed in is one clear error."""
import pytest
import torch
from transformers import DynamicCache

import rewriter
from rewriter.hf_calls import CACHE_OFF_NOTE, CacheError
from tests.helpers import assert_close
from tests.models import hf

NEW_TOKENS = 20


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def lm(request):
    model, (ids,) = hf.BUILDERS[request.param]()
    assert model.config.use_cache  # the default, as users have it
    return model, ids


@pytest.fixture(scope="module")
def exact(lm):
    model, ids = lm
    return rewriter.optimize(model, (ids,))


def test_default_config_captures_with_the_cache_off_and_says_so(lm, exact):
    model, ids = lm
    assert CACHE_OFF_NOTE in exact.report.capture["notes"] and CACHE_OFF_NOTE in exact.report.summary()
    with torch.no_grad():
        out, ref = exact(ids), model(ids)
    assert type(out) is type(ref) and out.past_key_values is None and ref.past_key_values is not None
    assert_close(out.logits, ref.logits)


def test_generate_gives_the_original_tokens(lm, exact):
    model, ids = lm
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    got, want = exact.generate(ids, **kw), model.generate(ids, **kw)
    assert got.shape == (ids.shape[0], ids.shape[1] + NEW_TOKENS)
    assert torch.equal(got, want)
    assert len(exact._entries) <= 3  # (ids,), then generate's keyword call: one capture, the sequence dynamic
    assert not hasattr(model, "forward") or "forward" not in vars(model)  # the user's model is not changed


def test_generate_with_an_approximate_mode(lm):
    model, ids = lm
    opt = rewriter.optimize(model, (ids,), attention="sliding_window", window=4)
    got = opt.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert got.shape == (ids.shape[0], ids.shape[1] + 5) and torch.equal(got[:, :ids.shape[1]], ids)
    assert CACHE_OFF_NOTE in opt.report.capture["notes"]
    assert opt.report.count("attention", "applied", action="sliding_window_attention") == 2


def test_a_cache_handed_in_or_asked_for_is_one_clear_error(lm, exact):
    model, ids = lm
    with torch.no_grad():
        cache = model(ids[:, :4]).past_key_values
    assert isinstance(cache, DynamicCache)
    name = type(model).__name__
    with pytest.raises(CacheError, match=rf"{name} was called with a KV cache .*opt.generate"):
        exact(ids[:, 4:], past_key_values=cache)
    with pytest.raises(CacheError, match=rf"{name} was called with use_cache=True"):
        exact(ids, use_cache=True)
    with pytest.raises(CacheError, match=r"generate\(use_cache=True\) is not possible"):
        exact.generate(ids, use_cache=True, max_new_tokens=2)
    assert_close(exact(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


def test_generate_needs_a_generation_head():
    model, x = hf.BUILDERS["bert"]()
    with pytest.raises(AttributeError, match="BertModel has no generate"):
        rewriter.optimize(model, x).generate(*x)


def test_the_saved_program_takes_only_the_users_inputs(lm, exact, tmp_path):
    model, ids = lm
    ep = exact.export(ids)
    assert [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"] == ["input_ids"]
    torch.export.save(ep, tmp_path / "lm.pt2")
    with torch.no_grad():
        assert_close(torch.export.load(tmp_path / "lm.pt2").module()(ids).logits, exact.reference(ids).logits)


@pytest.mark.parametrize("build", [hf.t5, hf.bart_generation], ids=["t5", "bart"])
def test_encoder_decoder_generate_gives_the_original_tokens(build):
    """generate() on an encoder-decoder calls the encoder, then the whole model with
    encoder_outputs (a ModelOutput) and a growing decoder_input_ids: captured with those
    dims dynamic, so decoding does not capture again at every step."""
    model, x = build()
    ids, mask = x[0], (x[1] if len(x) > 1 else torch.ones_like(x[0]))
    opt = rewriter.optimize(model, x)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    got, want = opt.generate(ids, **kw), model.generate(ids, **kw)
    assert got.shape == want.shape and torch.equal(got, want)
    assert len(opt._entries) <= 3, [e.captured.notes for e in opt._entries.values()]
