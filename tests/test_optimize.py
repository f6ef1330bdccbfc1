import warnings

import pytest
import torch

import rewriter
from tests.helpers import assert_close, count
from tests.models import own

RMS = torch.ops.rewriter.rms_norm.default


def test_lazy_capture_on_first_call_and_per_signature():
    model, (x,) = own.nanogpt()
    opt = rewriter.optimize(model)
    assert opt.report.sites == [] and "not captured" in opt.report.verification["note"]
    with torch.no_grad():
        assert_close(opt(x), model(x))
    assert opt.report.count("layer_norm", "applied") == 5
    with torch.no_grad():  # other batch and length: dynamic dims, no new capture
        y = torch.randint(0, 97, (4, 7))
        assert_close(opt(y), model(y))
    assert len(opt._entries) == 1
    with torch.no_grad():  # a new signature (rank) is captured again
        z = torch.randint(0, 97, (9,)).unsqueeze(0).expand(2, 9).contiguous().unsqueeze(0)[0]
        assert_close(opt(z.long()), model(z.long()))


def test_report_dict_and_table():
    model, x = own.nanogpt()
    opt = rewriter.optimize(model, x)
    d = opt.report.to_dict()
    assert {"location", "kind", "action", "status", "reason", "error"} <= set(d["sites"][0])
    assert d["capture"]["method"] == "export" and d["verification"]["output"]["ok"]
    text = str(opt.report)
    assert "h.0.ln_1" in text and "applied" in text


def test_rewritten_program_reexports_and_round_trips_pt2(tmp_path):
    model, x = own.tiny_vit()
    opt = rewriter.optimize(model, x)
    ep = opt.export(*x)
    assert any(n.target == RMS for n in ep.graph.nodes)
    path = tmp_path / "vit.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path).module()
    x2 = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert_close(loaded(x2), model(x2))


def test_verify_false_skips_checks():
    model, x = own.nanogpt()
    opt = rewriter.optimize(model, x, verify=False)
    assert opt.report.verification["output"]["ok"] is None
    assert all(not s.error for s in opt.report.sites)


def test_bad_arguments_raise_clear_errors():
    model, x = own.nanogpt()
    import pytest

    with pytest.raises(ValueError, match="norm must be"):
        rewriter.optimize(model, x, norm="bogus")
    with pytest.raises(TypeError, match="nn.Module"):
        rewriter.optimize(lambda t: t, x)
    with pytest.raises(ValueError, match="attention must be one of"):
        rewriter.optimize(model, x, attention="performer")


def test_end_to_end_failure_restores_the_original_graph(monkeypatch):
    import sys

    optimize_module = sys.modules["rewriter.optimize"]  # the package's `optimize` names the function

    real = optimize_module.compare_outputs
    calls = []

    def fail_first(actual, expected):  # every site passes its own check; the whole does not
        calls.append(1)
        out = real(actual, expected)
        return {**out, "ok": False, "rel_l2": 1.0} if len(calls) == 1 else out

    monkeypatch.setattr(optimize_module, "compare_outputs", fail_first)
    model, x = own.nanogpt()
    opt = rewriter.optimize(model, x)
    r = opt.report
    assert r.count(status="applied") == 0 and r.count(status="rolled_back") > 0
    assert all("model output differed" in s.reason for s in r.select(status="rolled_back"))
    gm = opt.graph_module
    assert count(gm, RMS) == 0 and count(gm, torch.ops.aten.layer_norm.default) == 5
    assert r.verification["output"]["ok"]
    with torch.no_grad():
        assert_close(opt(*x), model(*x), tol=0.0)


def test_import_needs_no_triton_onnx_or_gpu():
    import subprocess
    import sys

    code = "import sys, rewriter; print(sorted(m for m in ('triton', 'onnx', 'onnxscript') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("nested", [True, False])
def test_transformer_encoder_fast_path_gives_the_originals_answer(nested):
    """nn.TransformerEncoder in eval with a padding mask takes its nested-tensor fast path
    (padded positions come out 0), which torch.export does not capture: the optimised module
    says so and calls the model; built with enable_nested_tensor=False it is rewritten."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()
    x = torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        opt = rewriter.optimize(model, (x,), example_kwargs={"src_key_padding_mask": pad})
    said = [str(w.message) for w in seen if "nested-tensor fast path" in str(w.message)]
    assert len(said) == (1 if nested else 0)
    with torch.no_grad():
        got, want = opt(x, src_key_padding_mask=pad), model(x, src_key_padding_mask=pad)
    assert_close(got, want)
    if nested:
        assert opt.report.verification["output"]["capture_differs"]
        assert all(s.status != "applied" for s in opt.report.sites if s.reason != "already scaled_dot_product_attention")
    else:
        assert opt.report.verification["output"]["ok"] and opt.report.count("layer_norm", "applied") >= 4
