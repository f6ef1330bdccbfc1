"""torch.compile(model, backend="rewriter"): the exact rewrites, verified, then Inductor.

Inductor compiles are slow on CPU: two in this file (GPT-2, and an own model compiled
dynamic), the fallback test replaces Inductor with the graph's own forward.
"""
import warnings

import pytest
import torch

import rewriter.compile_backend as backend
from tests.helpers import assert_close, count
from tests.models import hf, own

RMS = torch.ops.rewriter.rms_norm.default
CRMS = torch.ops.rewriter.crms_norm.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default


@pytest.fixture
def inductor_inputs(monkeypatch):
    """The graphs the backend hands to Inductor (Inductor still compiles them)."""
    seen = []
    real = backend._inductor

    def spy(gm, inputs, mode, patches):
        seen.append(gm)
        return real(gm, inputs, mode, patches)

    monkeypatch.setattr(backend, "_inductor", spy)
    torch._dynamo.reset()
    yield seen
    torch._dynamo.reset()


def test_registered_under_the_entry_point():
    from torch._dynamo.backends.registry import lookup_backend

    assert "rewriter" in torch._dynamo.list_backends(exclude_tags=()), "pip install -e . registers the entry point"
    assert lookup_backend("rewriter") is backend.rewriter_backend


def test_hf_gpt2_is_rewritten_then_compiled(inductor_inputs):
    model, x = hf.gpt2()
    reports = []
    compiled = torch.compile(model, backend="rewriter", options={"on_report": reports.append})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", backend.RewriteBackendWarning)  # no fallback
        got, want = compiled(*x), model(*x)
    assert_close(got.logits, want.logits)  # (both also return a DynamicCache: an object, not a tensor)
    assert len(reports) == 1 and backend.last_report is reports[0]
    r = reports[0]
    assert r.count("attention", "applied") == 2 and r.count("residual_stream", "applied") == 1
    assert r.count("layer_norm", "applied", action="rewriter.rms_norm") == 5
    assert [s.location for s in r.select(kind="attention")] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert r.verification["output"]["ok"] and "from a torch.compile graph" in r.capture["notes"]
    (gm,) = inductor_inputs  # what Inductor compiled is the rewritten graph
    assert count(gm, RMS) == 5 and count(gm, SDPA) == 2
    assert count(gm, torch.ops.aten.layer_norm.default) == 0


def test_own_model_dynamic_with_options(inductor_inputs):
    model, (x,) = own.nanogpt()
    compiled = torch.compile(model, backend="rewriter", dynamic=True, options={"norm": "crms"})
    with torch.no_grad():
        assert_close(compiled(x), model(x))
        compiles = len(inductor_inputs)  # dynamo may trace twice (it specialises the modules' float attributes)
        y = torch.randint(0, 97, (3, 7))  # another batch and length: the same compiled graph
        assert_close(compiled(y), model(y))
    assert len(inductor_inputs) == compiles
    gm = inductor_inputs[-1]
    r = backend.last_report
    assert r.count("residual_stream", "applied", action="pre_crmsnorm") == 1 and count(gm, CRMS) == 5
    assert r.count("attention", "applied") == 2 and r.capture["dynamic_dims"]


def test_a_failed_rewrite_falls_back_to_the_original_graph(monkeypatch):
    compiled_graphs = []

    def fake_inductor(gm, inputs, mode, patches):  # no real Inductor: run the graph it was given
        compiled_graphs.append(gm)
        return gm.forward

    def broken(*args, **kwargs):
        raise RuntimeError("capture exploded\nsecond line")

    monkeypatch.setattr(backend, "_inductor", fake_inductor)
    monkeypatch.setattr(backend, "_runtime_module", broken)
    torch._dynamo.reset()
    model, (x,) = own.nanogpt()
    compiled = torch.compile(model, backend="rewriter")
    with torch.no_grad(), pytest.warns(backend.RewriteBackendWarning, match="could not rewrite this graph "
                                       r"\(RuntimeError: capture exploded\); compiling it unchanged with Inductor"):
        assert_close(compiled(x), model(x), tol=0.0)
    assert len(compiled_graphs) == 1 and count(compiled_graphs[0], RMS) == 0
    torch._dynamo.reset()


def test_bad_options_are_reported_not_swallowed():
    with pytest.raises(ValueError, match="need an approximate attention"):
        backend._optimize_options({"window": 8})
    with pytest.raises(TypeError, match="on_report"):
        backend._optimize_options({"on_report": 3})
    kw, own_options = backend._optimize_options({"attention": "sliding_window", "window": 8, "verify": False,
                                                 "inductor": {"max_autotune": False}})
    assert kw == {"norm": "auto", "attention": "sliding_window", "layers": None, "window": 8}
    assert own_options == {"verify": False, "inductor": {"max_autotune": False}}


def test_training_graph_keeps_layer_norms_and_gradients_flow(monkeypatch):
    def graph_as_is(gm, inputs, mode, patches):  # no real Inductor: run the graph it was given
        return gm.forward

    monkeypatch.setattr(backend, "_inductor", graph_as_is)
    torch._dynamo.reset()
    model, (x,) = own.nanogpt()
    reference, _ = own.nanogpt()
    compiled = torch.compile(model, backend="rewriter")
    compiled(x).square().mean().backward()  # grad enabled, parameters require grad
    reference(x).square().mean().backward()
    r = backend.last_report
    assert r.count("residual_stream") == 0 and r.count("attention", "applied") == 2
    assert any("compiled for training" in note for note in r.capture["notes"])
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, tol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("build", [hf.bert_with_mask, hf.vit], ids=["bert", "vit"])
def test_hf_multi_field_output_comes_back_whole(build, monkeypatch):
    """A BaseModelOutputWithPooling through the backend: same type, every field (the pooler
    included) compared. Inductor is replaced by the graph's own forward: what is under
    test is the rewrite of a dynamo graph whose outputs are several tensors."""
    compiled_graphs = []

    def fake_inductor(gm, inputs, mode, patches):
        compiled_graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(backend, "_inductor", fake_inductor)
    torch._dynamo.reset()
    model, x = build()
    kwargs = {"attention_mask": x[1]} if len(x) > 1 else {}  # as users call BERT: the mask by keyword
    compiled = torch.compile(model, backend="rewriter")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", backend.RewriteBackendWarning)  # no fallback
        got, want = compiled(x[0], **kwargs), model(x[0], **kwargs)
    assert type(got) is type(want) and got.pooler_output is not None
    assert list(got.keys()) == list(want.keys())
    assert_close(got, want)
    r = backend.last_report
    assert r.count("attention", "applied") >= 2 and r.verification["output"]["ok"]
    assert sum(count(gm, SDPA) for gm in compiled_graphs) >= 2
    torch._dynamo.reset()
