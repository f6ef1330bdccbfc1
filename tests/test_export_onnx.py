"""ONNX export of rewritten models: every rewrite kind exports, runs in onnxruntime and
matches PyTorch; failures name the op and site and leave no file behind."""
import os

import onnxruntime as ort
import pytest
import torch
from torch.utils import _pytree as pytree

import rewriter
from rewriter.compare import compare_outputs
from rewriter.export import ExportError
from tests.models import hf, own

EXACT = ["gpt2", "vit", "bert_with_mask", "llama", "nanogpt", "tiny_vit", "nanogpt-crms", "post_ln"]

APPROXIMATE = [
    ("vit", "linear", dict(feature_map="focused")),
    ("vit", "agent", dict(num_agents=4)),
    ("vit", "window2d", dict(window=2)),
    ("vit", "neighborhood", dict(kernel_size=3, dilation=1)),
    ("tiny_vit", "neighborhood", dict(kernel_size=3)),
    ("gpt2", "linear", {}),
    ("gpt2", "sliding_window", dict(window=4, sinks=1)),
    ("llama", "linear", dict(normalize="output_norm")),
    ("llama", "sliding_window", dict(window=5, sinks=2)),
    ("bert_with_mask", "linear", {}),
    ("bert_with_mask", "agent", dict(num_agents=4)),
    ("bert_with_mask", "sliding_window", dict(window=5, sinks=1, global_sinks=True)),
    ("nanogpt", "sliding_window", dict(window=3, dilation=2, sinks=1)),
]


def _build(name):
    if name == "nanogpt-crms":
        return own.nanogpt(), {"norm": "crms"}
    if name == "post_ln":
        return own.post_ln_encoder(), {}
    if name in ("nanogpt", "tiny_vit"):
        return getattr(own, name)(), {}
    return hf.BUILDERS[name](), {}


def _ort(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})


def _assert_ort_matches(path, inputs, expected):
    """Every output field of `expected` (a ModelOutput, tuple or tensor) against onnxruntime's."""
    got = [torch.from_numpy(o) for o in _ort(path, inputs)]
    result = compare_outputs(got, pytree.tree_leaves(expected), tol=1e-4)
    assert result["max_abs"] <= 1e-4 and "reason" not in result, result


@pytest.mark.parametrize("name", EXACT)
def test_exact_rewrites_export_and_match(name, tmp_path):
    (model, x), options = _build(name)
    opt = rewriter.optimize(model, x, **options)
    result = rewriter.export_onnx(opt, tmp_path / "m.onnx", x)
    assert result.max_abs_error <= 1e-4 and (tmp_path / "m.onnx").exists()
    assert result.dynamic_axes, "batch/sequence should stay dynamic for exact rewrites"


@pytest.mark.parametrize("name,form,options", APPROXIMATE, ids=[f"{a}-{b}" for a, b, _ in APPROXIMATE])
def test_approximate_rewrites_export_and_match(name, form, options, tmp_path):
    (model, x), _ = _build(name)
    opt = rewriter.optimize(model, x, attention=form, **options)
    assert opt.report.passes[f"approximate:{form}"] == 2
    result = rewriter.export_onnx(opt, tmp_path / "m.onnx", x)
    assert result.max_abs_error <= 1e-4
    with torch.no_grad():  # onnxruntime computes the rewritten (approximate) model, not the original
        _assert_ort_matches(tmp_path / "m.onnx", x, opt(*x))


def test_dynamic_axes_and_the_ones_fixed_are_reported(tmp_path):
    model, x = hf.gpt2()
    opt = rewriter.optimize(model, x, attention="linear")
    linear = rewriter.export_onnx(opt, tmp_path / "linear.onnx", x)
    assert linear.dynamic_axes == {"input_ids": [0, 1]} and not linear.fixed_axes
    longer = torch.randint(0, 100, (3, 20))
    with torch.no_grad():
        _assert_ort_matches(tmp_path / "linear.onnx", (longer,), opt(longer))
    opt = rewriter.optimize(model, x, attention="sliding_window", window=4)
    local = rewriter.export_onnx(opt, tmp_path / "local.onnx", x)
    assert local.dynamic_axes == {"input_ids": [0]}  # the gather plan needs the length; batch stays dynamic
    assert "sliding_window_attention needs the sequence length" in local.fixed_axes["input_ids[1]"]


def test_opset_23_uses_rms_normalization(tmp_path):
    import onnx

    model, x = own.rms_norm_style("llama")  # (HF Llama at opset 23 hits torch's RotaryEmbedding translation)
    opt = rewriter.optimize(model, x)
    result = rewriter.export_onnx(opt, tmp_path / "m.onnx", x, opset=23)
    assert result.max_abs_error <= 1e-4
    ops = {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}
    assert "RMSNormalization" in ops


def test_untranslatable_op_names_op_and_site_and_leaves_no_file(tmp_path, monkeypatch):
    import rewriter.export as export_module
    from rewriter.kernels.rms_norm import onnx as rms_onnx

    def broken(*args, **kwargs):
        raise RuntimeError("no translation for this configuration")

    monkeypatch.setattr(rms_onnx, "rms_norm", broken)
    model, x = own.nanogpt()
    opt = rewriter.optimize(model, x)
    with pytest.raises(ExportError, match=r"cannot export `rewriter.rms_norm.default` at h\.0\.ln_1"):
        export_module.export_onnx(opt, tmp_path / "m.onnx", x)
    assert os.listdir(tmp_path) == []


def test_unwritable_destination_is_a_clear_error(tmp_path):
    model, x = own.nanogpt()
    opt = rewriter.optimize(model, x)
    with pytest.raises(ExportError, match="does not exist"):
        rewriter.export_onnx(opt, tmp_path / "missing" / "m.onnx", x)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(ExportError, match="permission denied"):
            rewriter.export_onnx(opt, locked / "m.onnx", x)
    finally:
        locked.chmod(0o700)


def test_rms_norm_export_is_fused_by_onnxruntime(tmp_path):
    import onnx

    model, x = own.tiny_vit()
    opt = rewriter.optimize(model, x)  # Pre-RMSNorm: every norm is rewriter::rms_norm
    rewriter.export_onnx(opt, tmp_path / "m.onnx", x)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert ops.count("SimplifiedLayerNormalization") == 5 and "ReduceMean" not in ops
