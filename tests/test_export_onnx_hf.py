"""ONNX export of Hugging Face models as users hand them over (their ModelOutputs, default
configs, small sizes, random weights): each is optimised, exported, and its file run again
here in onnxruntime against the original model on every output field (no NaN, <= 1e-4 in
fp32), with batch (and text sequence) dims dynamic and the dims the model fixes (image
channels, the image size its position embeddings fix) plain ints in the ONNX graph.

One model per module-scoped fixture: each is built, optimised and exported once."""
from __future__ import annotations

import inspect

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.utils import _pytree as pytree

import rewriter
from rewriter.compare import error, pairs

transformers = pytest.importorskip("transformers")

B, S, VOCAB, HIDDEN, HEADS, LAYERS = 2, 12, 100, 64, 4, 2
ONE = 1  # layers of each stack where two stacks (encoder-decoders) or experts already make the graph long
IMAGE, PATCH = 32, 8


def _ids(seed: int = 1, shape=(B, S)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _pixels() -> torch.Tensor:
    return torch.randn(B, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def _vit(**extra) -> dict:
    return dict(image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, intermediate_size=4 * HIDDEN, attn_implementation="eager", **extra)


def _decoder(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=32,
                attn_implementation="eager", **extra)


def _build(name: str):
    """(model, args, kwargs, kind): kind is "image" or "text"."""
    t = transformers
    torch.manual_seed(0)
    if name == "deit":  # zero class/distillation tokens: zero rows into the Pre-RMSNorm
        return t.DeiTModel(t.DeiTConfig(**_vit())), (_pixels(),), {}, "image"
    if name == "deit_teacher":
        return t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(**_vit())), (_pixels(),), {}, "image"
    if name == "beit":  # the relative position bias is an attention mask
        return t.BeitModel(t.BeitConfig(**_vit(use_relative_position_bias=True))), (_pixels(),), {}, "image"
    if name == "swin":
        cfg = t.SwinConfig(image_size=IMAGE, patch_size=4, num_channels=3, embed_dim=HIDDEN, depths=[LAYERS],
                           num_heads=[HEADS], window_size=4, attn_implementation="eager")
        return t.SwinModel(cfg), (_pixels(),), {}, "image"
    if name == "vit":
        return t.ViTModel(t.ViTConfig(**_vit())), (_pixels(),), {}, "image"
    if name == "dinov2":
        cfg = t.Dinov2Config(**{k: v for k, v in _vit().items() if k != "intermediate_size"})
        return t.Dinov2Model(cfg), (_pixels(),), {}, "image"
    if name == "clip_vision":
        return t.CLIPVisionModel(t.CLIPVisionConfig(**_vit())), (_pixels(),), {}, "image"
    if name == "bert":  # with its pooler
        cfg = t.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=4 * HIDDEN, max_position_embeddings=32, attn_implementation="eager")
        return t.BertModel(cfg), (_ids(),), {}, "text"
    if name == "gpt2":
        cfg = t.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                           bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, attn_implementation="eager")
        return t.GPT2LMHeadModel(cfg), (_ids(),), {}, "text"
    if name == "llama":  # grouped-query attention
        return t.LlamaForCausalLM(t.LlamaConfig(**_decoder())), (_ids(),), {}, "text"
    if name == "mixtral":  # 4 experts, top-2: grouped_mm
        cfg = t.MixtralConfig(**{**_decoder(num_local_experts=4, num_experts_per_tok=2), "num_hidden_layers": ONE})
        return t.MixtralForCausalLM(cfg), (_ids(),), {}, "text"
    if name == "t5":
        cfg = t.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=4 * HIDDEN, num_layers=ONE,
                         num_heads=HEADS, decoder_start_token_id=0, attn_implementation="eager")
        decoder_ids = _ids(2, (B, S // 2))
        decoder_ids[:, 0] = 0
        return t.T5ForConditionalGeneration(cfg), (_ids(),), {"decoder_input_ids": decoder_ids}, "text"
    if name == "bart":
        cfg = t.BartConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=ONE, decoder_layers=ONE,
                           encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=4 * HIDDEN,
                           decoder_ffn_dim=4 * HIDDEN, max_position_embeddings=32, attn_implementation="eager")
        return t.BartModel(cfg), (_ids(),), {}, "text"
    raise KeyError(name)


MODELS = ["deit", "deit_teacher", "beit", "swin", "vit", "dinov2", "clip_vision",
          "bert", "gpt2", "llama", "mixtral", "t5", "bart"]


def _reference(model, args, kwargs):
    """The original model's output, without a KV cache where it takes one (as optimize() runs it)."""
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs = {**kwargs, "use_cache": False}
    with torch.no_grad():
        return model(*args, **kwargs)


def _run(path, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feed)]


def _as_output(got: list[torch.Tensor], like):
    """onnxruntime's flat outputs in the structure of `like` (a ModelOutput): fields by name."""
    leaves, spec = pytree.tree_flatten(like)
    it = iter(got)
    return pytree.tree_unflatten([next(it) if isinstance(t, torch.Tensor) else t for t in leaves], spec)


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory):
    name = request.param
    model, args, kwargs, kind = _build(name)
    model = model.eval()
    opt = rewriter.optimize(model, args, example_kwargs=kwargs or None)
    path = tmp_path_factory.mktemp(name) / "model.onnx"
    result = rewriter.export_onnx(opt, path, args, example_kwargs=kwargs or None)
    return {"name": name, "model": model, "args": args, "kwargs": kwargs, "kind": kind, "path": path, "result": result}


def test_every_output_field_matches_pytorch_without_nan(exported):
    e = exported
    result = e["result"]
    assert result.max_abs_error <= 1e-4
    expected = _reference(e["model"], e["args"], e["kwargs"])
    inputs = [*e["args"], *e["kwargs"].values()]
    got = _as_output(_run(e["path"], inputs), expected)
    fields = pairs(got, expected)
    assert fields
    for name, o, ref in fields:
        if not isinstance(ref, torch.Tensor):
            continue
        assert torch.isfinite(o).all(), f"{e['name']}: {name} has NaN/Inf in onnxruntime"
        assert error(o, ref)["max_abs"] <= 1e-4, f"{e['name']}: {name} differs from PyTorch"


def test_axes_batch_and_sequence_dynamic_channels_and_image_size_fixed(exported):
    e = exported
    result = e["result"]
    graph = onnx.load(e["path"]).graph
    dims = {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in graph.input}
    if e["kind"] == "image":
        assert result.dynamic_axes == {"pixel_values": [0]}
        assert "pixel_values[1]" in result.fixed_axes
        batch, *fixed = dims["pixel_values"]
        assert isinstance(batch, str) and batch and not batch.isdigit()
        assert fixed == [3, IMAGE, IMAGE]  # ints in the graph, not symbols named "3"
    else:
        names = ["input_ids", *e["kwargs"]]
        assert result.dynamic_axes == {n: [0, 1] for n in names} and not result.fixed_axes
        for n in names:
            assert all(isinstance(d, str) and d and not d.isdigit() for d in dims[n]), dims[n]


@pytest.mark.parametrize("exported", ["deit", "swin", "mixtral"], indirect=True)  # zero rows, windows, routing
def test_dynamic_dims_take_other_sizes(exported):
    """The exported file on another batch size (and, for text, another length)."""
    e = exported
    model = e["model"]
    args = ((torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(5)),) if e["kind"] == "image"
            else (_ids(5, (3, 20)),))
    expected = _reference(model, args, {})
    got = _as_output(_run(e["path"], list(args)), expected)
    for name, o, ref in pairs(got, expected):
        if isinstance(ref, torch.Tensor):
            assert error(o, ref)["max_abs"] <= 1e-4, f"{e['name']}: {name}"


def test_grouped_mm_with_an_empty_group_and_unclaimed_rows(tmp_path):
    """transformers' grouped_mm_fallback: group 1 has no rows, rows past offs[-1] are zeros."""
    from transformers.integrations import moe  # noqa: F401 - registers transformers::grouped_mm_fallback

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(0)))

        def forward(self, x, offs):
            return torch.ops.transformers.grouped_mm_fallback(x, self.weight, offs)

    x = torch.randn(9, 8, generator=torch.Generator().manual_seed(1))
    offs = torch.tensor([3, 3, 7])
    result = rewriter.export_onnx(Experts(), tmp_path / "g.onnx", (x, offs), dynamic=False)
    assert result.max_abs_error <= 1e-5
    got = _run(tmp_path / "g.onnx", [x, offs])[0]
    assert torch.equal(got[7:], torch.zeros(2, 5))


def test_a_tiny_eps_survives_the_onnx_optimizer(tmp_path):
    """x * rsqrt(mean(x²) + 1e-12) on a zero row: onnxscript's `x + 0` rule would drop the eps (NaN)."""
    class Norm(torch.nn.Module):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-12)

    x = torch.randn(2, 5, 8)
    x[:, 0] = 0
    rewriter.export_onnx(Norm(), tmp_path / "n.onnx", x)
    got = _run(tmp_path / "n.onnx", [x])[0]
    assert torch.isfinite(got).all() and torch.equal(got[:, 0], torch.zeros(2, 8))
