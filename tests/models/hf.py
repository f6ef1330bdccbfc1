"""Small Hugging Face transformer models for pass tests.

Hand-written test models only show the graph shapes we expect; these third-party
architectures show the ones passes will really meet (GPT-2's Conv1D, BERT's post-LN
and padding mask, ViT's cls token, Llama's RMSNorm, rotary embeddings and GQA).
Each builder returns `(model, example_inputs)`: a tiny randomly initialised model
(built from a config, no weights downloaded) in eval mode, fp32, that returns one
plain tensor, and a tuple of positional inputs for `model(*example_inputs)`.
`attn_implementation` is "eager" (explicit matmul/softmax) or "sdpa".

All of them export with `torch.export.export(model, example_inputs, strict=False)`
under both implementations with no workarounds. `use_cache=False` is not needed
for export (an unused DynamicCache is dropped from the graph); it only stops the
models building a KV cache that nothing reads.
"""
from __future__ import annotations

import torch
from torch import nn

B, S, VOCAB, HIDDEN, HEADS, LAYERS = 2, 12, 100, 64, 4, 2


class TensorOutput(nn.Module):
    """Call an HF model and return one field of its ModelOutput, e.g. "logits"."""

    def __init__(self, model: nn.Module, key: str):
        super().__init__()
        self.model = model  # attribute name keeps graph paths like model.transformer.h.0
        self.key = key

    # Named parameters, not *args: export folds *args into one input, which breaks
    # per-input dynamic_shapes and names the placeholder args_0.
    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None):
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        return getattr(self.model(inputs, return_dict=True, **kwargs), self.key)


def _finish(model: nn.Module, key: str, *inputs: torch.Tensor):
    return TensorOutput(model, key).eval().float(), inputs


def _input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(1))


def gpt2(attn_implementation: str = "eager"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,  # default 50256 is out of range
                     use_cache=False, attn_implementation=attn_implementation)
    return _finish(GPT2LMHeadModel(cfg), "logits", _input_ids())


def vit(attn_implementation: str = "eager"):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=HIDDEN,
                    num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
                    num_labels=10, attn_implementation=attn_implementation)
    pixels = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return _finish(ViTForImageClassification(cfg), "logits", pixels)


def _bert(attn_implementation: str):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=4 * HIDDEN, max_position_embeddings=32,
                     use_cache=False, attn_implementation=attn_implementation)
    return BertModel(cfg, add_pooling_layer=False)


def bert(attn_implementation: str = "eager"):
    return _finish(_bert(attn_implementation), "last_hidden_state", _input_ids())


def bert_with_mask(attn_implementation: str = "eager"):
    """BERT with a padding mask: the second sequence has its last 4 tokens masked out."""
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, -4:] = 0
    return _finish(_bert(attn_implementation), "last_hidden_state", _input_ids(), mask)


def llama(attn_implementation: str = "eager"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                      max_position_embeddings=32, use_cache=False, attn_implementation=attn_implementation)
    return _finish(LlamaForCausalLM(cfg), "logits", _input_ids())


BUILDERS = {"gpt2": gpt2, "vit": vit, "bert": bert, "bert_with_mask": bert_with_mask, "llama": llama}
