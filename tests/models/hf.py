"""Small Hugging Face models, built as users hand them over.

Hand-written test models only show the graph shapes we expect; these third-party
architectures show the ones the rewriter will really meet. So each model is what a user
gets from `AutoModel...`: no wrapper, its own ModelOutput comes back (with pooler outputs,
KV caches and None fields), the config's defaults are kept (decoder LMs build a
DynamicCache: `use_cache` stays True), eval mode, fp32. Only sizes change, and token ids
that a default config would put outside the tiny vocabulary. A test that needs one tensor
picks it at the assertion (`out.logits`, `out.last_hidden_state`).

Each builder returns `(model, inputs)`: a randomly initialised model (from a config, no
weights downloaded; the same weights on every call) and a tuple of positional inputs for
`model(*inputs)`. `attn_implementation` is "eager" (explicit matmul/softmax) or "sdpa".
`ZOO` lists ~20 architectures with the approximate attention forms that fit each.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

B, S, VOCAB, HIDDEN, HEADS, LAYERS = 2, 12, 100, 64, 4, 2
IMAGE, PATCH = 32, 8  # a 4x4 patch grid (+ prefix tokens)
FFN = 4 * HIDDEN
POSITIONS = 32


def _seed():
    torch.manual_seed(0)


def _finish(model: nn.Module, *inputs: torch.Tensor):
    return model.eval().float(), inputs


def _input_ids(vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


def _padding_mask() -> torch.Tensor:
    """All tokens of the first sequence, the first S-4 of the second."""
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, -4:] = 0
    return mask


def _pixels() -> torch.Tensor:
    return torch.randn(B, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def _encoder_sizes() -> dict:
    """BERT-family config sizes."""
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=FFN, max_position_embeddings=POSITIONS)


def _vit_sizes() -> dict:
    return dict(image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=HIDDEN,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN)


def _decoder_sizes() -> dict:
    """Llama-family config sizes, grouped-query attention with 2 key/value heads."""
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=POSITIONS)


# --- the original builders (tests use these by name) --------------------------------------


def gpt2(attn_implementation: str = "eager"):
    from transformers import GPT2Config, GPT2LMHeadModel

    _seed()
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1,  # default 50256
                     attn_implementation=attn_implementation)
    return _finish(GPT2LMHeadModel(cfg), _input_ids())


def vit(attn_implementation: str = "eager"):
    from transformers import ViTConfig, ViTModel

    _seed()
    cfg = ViTConfig(**_vit_sizes(), attn_implementation=attn_implementation)
    return _finish(ViTModel(cfg), _pixels())  # with its pooler (add_pooling_layer defaults to True)


def _bert(attn_implementation: str):
    from transformers import BertConfig, BertModel

    _seed()
    return BertModel(BertConfig(**_encoder_sizes(), attn_implementation=attn_implementation))


def bert(attn_implementation: str = "eager"):
    return _finish(_bert(attn_implementation), _input_ids())


def bert_with_mask(attn_implementation: str = "eager"):
    """BERT with a padding mask: the second sequence has its last 4 tokens masked out."""
    return _finish(_bert(attn_implementation), _input_ids(), _padding_mask())


def llama(attn_implementation: str = "eager"):
    from transformers import LlamaConfig, LlamaForCausalLM

    _seed()
    cfg = LlamaConfig(**_decoder_sizes(), attn_implementation=attn_implementation)
    return _finish(LlamaForCausalLM(cfg), _input_ids())


BUILDERS = {"gpt2": gpt2, "vit": vit, "bert": bert, "bert_with_mask": bert_with_mask, "llama": llama}


# --- encoders -----------------------------------------------------------------------------


def roberta(attn_implementation: str = "eager"):
    from transformers import RobertaConfig, RobertaModel

    _seed()
    # positions start after pad_token_id (1): S + 2 of them are needed
    cfg = RobertaConfig(**{**_encoder_sizes(), "max_position_embeddings": POSITIONS + 2},
                        attn_implementation=attn_implementation)
    return _finish(RobertaModel(cfg), _input_ids(), _padding_mask())


def distilbert(attn_implementation: str = "eager"):
    from transformers import DistilBertConfig, DistilBertModel

    _seed()
    cfg = DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
                           max_position_embeddings=POSITIONS, attn_implementation=attn_implementation)
    return _finish(DistilBertModel(cfg), _input_ids(), _padding_mask())


def albert(attn_implementation: str = "eager"):
    from transformers import AlbertConfig, AlbertModel

    _seed()
    cfg = AlbertConfig(**_encoder_sizes(), embedding_size=32, attn_implementation=attn_implementation)
    return _finish(AlbertModel(cfg), _input_ids())


def electra(attn_implementation: str = "eager"):
    from transformers import ElectraConfig, ElectraModel

    _seed()
    cfg = ElectraConfig(**_encoder_sizes(), embedding_size=32, attn_implementation=attn_implementation)
    return _finish(ElectraModel(cfg), _input_ids())


def deberta_v2(attn_implementation: str = "eager"):
    """DeBERTa-v3 style (what deberta-v3-* checkpoints set): disentangled relative attention,
    no absolute positions. The default DebertaV2Config turns all of that off."""
    from transformers import DebertaV2Config, DebertaV2Model

    _seed()
    cfg = DebertaV2Config(**_encoder_sizes(), relative_attention=True, pos_att_type=["p2c", "c2p"],
                          position_biased_input=False, max_relative_positions=-1, position_buckets=16,
                          norm_rel_ebd="layer_norm", share_att_key=True, attn_implementation=attn_implementation)
    return _finish(DebertaV2Model(cfg), _input_ids())


def clip_text(attn_implementation: str = "eager"):
    """CLIP's text tower: causal attention, pooled at the end-of-text token (the last one)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    _seed()
    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, max_position_embeddings=POSITIONS,
                         pad_token_id=1, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,  # defaults 49406/49407
                         attn_implementation=attn_implementation)
    ids = _input_ids(VOCAB - 2)
    ids[:, 0], ids[:, -1] = VOCAB - 2, VOCAB - 1
    return _finish(CLIPTextModel(cfg), ids)


# --- vision -------------------------------------------------------------------------------


def deit(attn_implementation: str = "eager"):
    from transformers import DeiTConfig, DeiTModel

    _seed()
    return _finish(DeiTModel(DeiTConfig(**_vit_sizes(), attn_implementation=attn_implementation)), _pixels())


def beit(attn_implementation: str = "eager"):
    from transformers import BeitConfig, BeitModel

    _seed()
    return _finish(BeitModel(BeitConfig(**_vit_sizes(), attn_implementation=attn_implementation)), _pixels())


def dinov2(attn_implementation: str = "eager"):
    from transformers import Dinov2Config, Dinov2Model

    _seed()
    cfg = Dinov2Config(**{k: v for k, v in _vit_sizes().items() if k != "intermediate_size"},
                       attn_implementation=attn_implementation)
    return _finish(Dinov2Model(cfg), _pixels())


def swin(attn_implementation: str = "eager"):
    """One stage of two blocks on an 8x8 patch grid, 4x4 windows: the second block shifts."""
    from transformers import SwinConfig, SwinModel

    _seed()
    cfg = SwinConfig(image_size=IMAGE, patch_size=4, num_channels=3, embed_dim=HIDDEN, depths=[LAYERS],
                     num_heads=[HEADS], window_size=4, attn_implementation=attn_implementation)
    return _finish(SwinModel(cfg), _pixels())


def clip_vision(attn_implementation: str = "eager"):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    _seed()
    cfg = CLIPVisionConfig(**_vit_sizes(), attn_implementation=attn_implementation)
    return _finish(CLIPVisionModel(cfg), _pixels())


# --- encoder-decoders ---------------------------------------------------------------------


def t5(attn_implementation: str = "eager"):
    """T5ForConditionalGeneration(input_ids, attention_mask, decoder_input_ids)."""
    from transformers import T5Config, T5ForConditionalGeneration

    _seed()
    cfg = T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS,
                   num_heads=HEADS, decoder_start_token_id=0,  # as t5-* checkpoints set it (= pad)
                   attn_implementation=attn_implementation)
    decoder_ids = torch.randint(0, VOCAB, (B, S // 2), generator=torch.Generator().manual_seed(2))
    decoder_ids[:, 0] = 0
    return _finish(T5ForConditionalGeneration(cfg), _input_ids(), _padding_mask(), decoder_ids)


def bart(attn_implementation: str = "eager"):
    """BartModel(input_ids): the decoder reads input_ids shifted right."""
    from transformers import BartModel

    return _finish(BartModel(_bart_config(attn_implementation)), _input_ids())


def bart_generation(attn_implementation: str = "eager"):
    """BartForConditionalGeneration(input_ids), for generate()."""
    from transformers import BartForConditionalGeneration

    return _finish(BartForConditionalGeneration(_bart_config(attn_implementation)), _input_ids())


def _bart_config(attn_implementation: str):
    from transformers import BartConfig

    _seed()
    return BartConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                      encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
                      decoder_ffn_dim=FFN, max_position_embeddings=POSITIONS, attn_implementation=attn_implementation)


# --- decoder LMs --------------------------------------------------------------------------


def gptj(attn_implementation: str = "eager"):
    from transformers import GPTJConfig, GPTJForCausalLM

    _seed()
    cfg = GPTJConfig(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                     rotary_dim=8,  # default 64 is wider than a head (16)
                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1,  # default 50256
                     attn_implementation=attn_implementation)
    return _finish(GPTJForCausalLM(cfg), _input_ids())


def opt(attn_implementation: str = "eager"):
    from transformers import OPTConfig, OPTForCausalLM

    _seed()
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    ffn_dim=FFN, word_embed_proj_dim=HIDDEN, max_position_embeddings=POSITIONS,
                    attn_implementation=attn_implementation)
    return _finish(OPTForCausalLM(cfg), _input_ids())


def mistral(attn_implementation: str = "eager"):
    """Sliding-window attention (window 4) over 12 tokens."""
    from transformers import MistralConfig, MistralForCausalLM

    _seed()
    cfg = MistralConfig(**_decoder_sizes(), sliding_window=4, attn_implementation=attn_implementation)
    return _finish(MistralForCausalLM(cfg), _input_ids())


def qwen2(attn_implementation: str = "eager"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _seed()
    return _finish(Qwen2ForCausalLM(Qwen2Config(**_decoder_sizes(), attn_implementation=attn_implementation)),
                   _input_ids())


def mixtral(attn_implementation: str = "eager"):
    """Mixture of experts: 4 experts, top-2 routing."""
    from transformers import MixtralConfig, MixtralForCausalLM

    _seed()
    cfg = MixtralConfig(**_decoder_sizes(), num_local_experts=4, num_experts_per_tok=2,
                        attn_implementation=attn_implementation)
    return _finish(MixtralForCausalLM(cfg), _input_ids())


# --- the zoo ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooModel:
    build: Callable[[], tuple]  # () -> (model, inputs), eager attention
    kind: str  # "text", "vision", "decoder" or "encoder_decoder"
    modes: tuple[str, ...]  # the approximate attention forms that fit it
    options: dict[str, dict] = field(default_factory=dict)  # mode -> extra optimize() options


_OPTIONS = {  # sizes for a 12-token sequence or a 4x4 patch grid
    "agent": {"num_agents": 4},
    "sliding_window": {"window": 4},
    "window2d": {"window": 2},  # 2x2 windows over the 4x4 grid (the class token stays global)
    "neighborhood": {"kernel_size": 3},
}
_SEQUENCE = ("linear", "agent", "sliding_window")
_GRID = ("linear", "agent", "window2d", "neighborhood")


def _zoo(build, kind, modes):
    return ZooModel(build, kind, modes, {m: dict(_OPTIONS[m]) for m in modes if m in _OPTIONS})


ZOO: dict[str, ZooModel] = {
    "bert": _zoo(bert, "text", _SEQUENCE),
    "roberta": _zoo(roberta, "text", _SEQUENCE),
    "distilbert": _zoo(distilbert, "text", _SEQUENCE),
    "albert": _zoo(albert, "text", _SEQUENCE),
    "electra": _zoo(electra, "text", _SEQUENCE),
    "deberta_v2": _zoo(deberta_v2, "text", _SEQUENCE),
    "clip_text": _zoo(clip_text, "text", _SEQUENCE),
    "vit": _zoo(vit, "vision", _GRID),
    "deit": _zoo(deit, "vision", _GRID),
    "beit": _zoo(beit, "vision", _GRID),
    "dinov2": _zoo(dinov2, "vision", _GRID),
    "clip_vision": _zoo(clip_vision, "vision", _GRID),
    "swin": _zoo(swin, "vision", ("linear", "agent")),  # attention runs inside windows: no global grid
    "t5": _zoo(t5, "encoder_decoder", _SEQUENCE),
    "bart": _zoo(bart, "encoder_decoder", _SEQUENCE),
    "gpt2": _zoo(gpt2, "decoder", _SEQUENCE),
    "gptj": _zoo(gptj, "decoder", _SEQUENCE),
    "opt": _zoo(opt, "decoder", _SEQUENCE),
    "llama": _zoo(llama, "decoder", _SEQUENCE),
    "mistral": _zoo(mistral, "decoder", _SEQUENCE),
    "qwen2": _zoo(qwen2, "decoder", _SEQUENCE),
    "mixtral": _zoo(mixtral, "decoder", _SEQUENCE),
}
