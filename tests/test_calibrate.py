"""rewriter.calibrate: the parameters an approximate rewrite introduced train layer by layer
(attention transfer), the per-layer error falls on held-out data, nothing else changes, and
the trained parameters live in the program: they save and load with .pt2 and export to ONNX.
"""
import pytest
import torch

import rewriter
from rewriter.calibrate import softmax_attention
from tests.helpers import assert_close
from tests.models import hf, own

ops = torch.ops.rewriter


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny per-layer tensors: one intra-op thread is much the fastest on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _images(n_batches, seed, batch=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g),) for _ in range(n_batches)]


@pytest.fixture(scope="module")
def vit_linear():
    """TinyViT with Hedgehog linear attention, calibrated once (40 steps per layer)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    model, x = own.tiny_vit()
    opt = rewriter.optimize(model, x, attention="linear", feature_map="hedgehog")
    initial = {n: p.detach().clone() for n, p in opt.named_parameters()}
    report = rewriter.calibrate(opt, model, _images(4, 5), held_out=_images(2, 6), steps=40, lr=1e-2, progress=False)
    torch.set_num_threads(previous)
    return model, x, opt, initial, report


def test_hedgehog_map_is_graph_computation_before_an_identity_op(vit_linear):
    _, _, opt, _, _ = vit_linear
    nodes = [n for n in opt.graph_module.graph.nodes if n.target == ops.linear_attention.default]
    assert len(nodes) == 2 and all(n.args[4] == "identity" for n in nodes)
    sites = opt.report.select(pass_name="approximate:linear")
    assert [s.params["feature_map"] for s in sites] == ["hedgehog", "hedgehog"]
    assert all(len(s.params["learnable"]) == 4 for s in sites)  # W and b for q and for k
    w = dict(opt.graph_module.named_parameters())[sites[0].params["learnable"][0]]
    assert w.shape == (4, 12, 12)  # [heads, head dim, feature dim]


@pytest.mark.parametrize("form,options", [("linear", dict(feature_map="hedgehog")),
                                          ("agent", dict(num_agents=4, learnable="projection"))])
def test_calibration_reduces_per_layer_error_on_held_out_data(form, options):
    model, x = own.tiny_vit()
    opt = rewriter.optimize(model, x, attention=form, **options)
    report = rewriter.calibrate(opt, model, _images(4, 5), held_out=_images(2, 6), steps=40, progress=False)
    assert report.evaluated_on == "held_out" and len(report.layers) == 2
    for layer in report.layers:
        assert layer.trainable > 0 and layer.steps == 40
        assert layer.after["rel_l2"] < layer.before["rel_l2"], layer
        assert layer.after["kl"] < layer.before["kl"], layer
    if form == "linear":  # Hedgehog: the error falls by a quarter or more, and the model's output with it
        assert all(layer.after["rel_l2"] < 0.8 * layer.before["rel_l2"] for layer in report.layers)
        assert report.output["after"]["rel_l2"] < report.output["before"]["rel_l2"]


def test_only_introduced_parameters_change(vit_linear):
    model, _, opt, initial, report = vit_linear
    learnable = {n for layer in report.layers for n in layer.params}
    changed = {n.removeprefix("graph_0.") for n, p in opt.named_parameters() if not torch.equal(p, initial[n])}
    assert changed and changed <= learnable
    assert all(p.requires_grad for p in model.parameters())  # the model's own flags are restored


def test_report_is_recorded_in_the_rewrite_report(vit_linear):
    _, _, opt, _, report = vit_linear
    assert opt.report.verification["calibration"] == report.to_dict()
    for site in opt.report.select(pass_name="approximate:linear"):
        assert site.error["calibrated"]["after"]["rel_l2"] < site.error["calibrated"]["before"]["rel_l2"]
    assert "calibration" in opt.report.verification["approximate_output"]["after"]
    text = str(report)
    assert "rel_l2 before" in text and "output before" in text


def test_calibrated_parameters_survive_pt2(vit_linear, tmp_path):
    _, x, opt, initial, report = vit_linear
    torch.export.save(opt.export(*x), tmp_path / "vit.pt2")
    loaded = torch.export.load(tmp_path / "vit.pt2")
    state = loaded.state_dict
    for name in (n for layer in report.layers for n in layer.params):
        assert torch.equal(state[name], opt.graph_module.get_parameter(name))
        assert not torch.equal(state[name], initial[f"graph_0.{name}"])
    other = _images(1, 9, batch=3)[0]  # a new batch size: the program stays dynamic
    with torch.no_grad():
        assert_close(loaded.module()(*other), opt(*other), tol=1e-6)


def test_calibrated_parameters_export_to_onnx(vit_linear, tmp_path):
    pytest.importorskip("onnxruntime")
    _, x, opt, initial, report = vit_linear
    result = rewriter.export_onnx(opt, tmp_path / "vit.onnx", x)  # checked against PyTorch in onnxruntime
    assert result.max_abs_error <= 1e-4
    import onnx

    names = {t.name for t in onnx.load(str(tmp_path / "vit.onnx")).graph.initializer}
    assert any("hedgehog" in n for n in names), sorted(names)[:20]


def test_padding_mask_and_end_to_end_stage():
    model, (ids, mask) = hf.bert_with_mask()
    g = torch.Generator().manual_seed(3)

    def batch():
        m = torch.ones(4, 12, dtype=torch.long)
        m[1, 7:] = 0
        m[3, 9:] = 0
        return torch.randint(0, 100, (4, 12), generator=g), m

    opt = rewriter.optimize(model, (ids, mask), attention="linear", feature_map="hedgehog", feature_dim=8)
    report = rewriter.calibrate(opt, model, [batch() for _ in range(3)], held_out=[batch()], steps=15,
                                end_to_end_steps=3, progress=False)
    assert set(report.output) == {"before", "after_layerwise", "after"}
    assert all(layer.after["rel_l2"] < layer.before["rel_l2"] for layer in report.layers)
    assert report.output["after"]["rel_l2"] < report.output["before"]["rel_l2"]
    with torch.no_grad():  # padded positions stay out of the real tokens' outputs
        a = opt(ids, mask)
        longer = torch.cat([ids, torch.randint(0, 100, (2, 3))], 1)
        b = opt(longer, torch.cat([mask, torch.zeros(2, 3, dtype=mask.dtype)], 1))
    assert_close(b.last_hidden_state[0, :12], a.last_hidden_state[0], tol=1e-5)


def test_refusals():
    model, x = own.tiny_vit()
    plain = rewriter.optimize(model, x, attention="linear")
    with pytest.raises(ValueError, match="no parameters to calibrate"):
        rewriter.calibrate(plain, model, [x], progress=False)
    with pytest.raises(TypeError, match="rewriter.optimize"):
        rewriter.calibrate(model, model, [x], progress=False)
    with pytest.raises(ValueError, match="at least one"):
        rewriter.calibrate(plain, model, [], progress=False)
    with pytest.raises(ValueError, match="learnable"):
        rewriter.optimize(model, x, attention="agent", learnable="bias")


def test_softmax_attention_reference_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g) for _ in range(3))
    km = torch.ones(2, 9, dtype=torch.bool)
    km[1, 6:] = False
    out, p = softmax_attention(q, k[:, :2], v[:, :2], km, 0.3, causal=True)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :2], v[:, :2], attn_mask=km[:, None, None, :] & torch.ones(9, 9, dtype=torch.bool).tril(),
        scale=0.3, enable_gqa=True)
    assert_close(out, expected, tol=1e-6)
    assert_close(p.sum(-1), torch.ones(2, 4, 9), tol=1e-6)
