"""Text encoders: the from-scratch transformer on our BPE, and the real MiniLM offline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visto.data.tokenizer import train_tokenizer
from visto.errors import UserError
from visto.nn.text import (
    PretrainedTextEncoder,
    TextConfig,
    TransformerTextEncoder,
    build_text_encoder,
    minilm_path,
)

CORPUS = [
    "a red circle above a blue square",
    "two green triangles",
    "the word HELLO written in black",
    "a small yellow star next to a big purple circle",
] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300, loc_bins=4, min_frequency=1)


def test_transformer_encoder_eos_pooling_ignores_padding(tokenizer):
    torch.manual_seed(0)
    enc = TransformerTextEncoder(TextConfig.preset("tiny", vocab_size=300), tokenizer).eval()
    batch = enc.tokenize(["two green triangles", "a small yellow star next to a big purple circle"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids[0, 0] == tokenizer.bos_id and ids[1, mask[1].sum() - 1] == tokenizer.eos_id
    assert ids[0, -1] == tokenizer.pad_id  # the short row is right-padded
    with torch.no_grad():
        both = enc(**batch)
        alone = enc.encode(["two green triangles"])
    assert both.shape == (2, enc.output_dim) == (2, 32)
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-4)
    # Truncation to context_length keeps </s> at the end.
    long = enc.tokenize([" ".join(CORPUS)])
    assert long["input_ids"].shape[1] == 16 and long["input_ids"][0, -1] == tokenizer.eos_id


def test_mean_pooling_bidirectional_and_raw_tokenizer(tokenizer):
    torch.manual_seed(0)
    cfg = TextConfig.preset("tiny", vocab_size=300, causal=False, pool="mean")
    enc = build_text_encoder(cfg, tokenizer.raw)  # a plain tokenizers.Tokenizer works too
    assert isinstance(enc, TransformerTextEncoder)
    with torch.no_grad():
        pair = enc.encode(["two green triangles", "a red circle above a blue square"])
        alone = enc.encode(["two green triangles"])
    torch.testing.assert_close(pair[0], alone[0], atol=1e-5, rtol=1e-4)
    # Gradients reach the token embeddings through the pooled output.
    enc.encode(["two green triangles"]).sum().backward()
    assert enc.embeddings.token_embedding.weight.grad.abs().sum() > 0


def test_no_tokenizer_and_bad_config():
    enc = TransformerTextEncoder(TextConfig.preset("tiny"))
    with pytest.raises(RuntimeError, match="no tokenizer"):
        enc.tokenize(["x"])
    with pytest.raises(UserError, match="text kind"):
        TextConfig(kind="lstm")


def test_minilm_path_is_the_installed_weights():
    path = minilm_path()
    assert (path / "model.safetensors").stat().st_size > 50_000_000
    assert (path / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def minilm():
    return PretrainedTextEncoder(TextConfig(kind="pretrained", pretrained="minilm")).eval()


@pytest.mark.slow
def test_minilm_ranks_paraphrase_above_unrelated(minilm):
    with torch.no_grad():
        e = minilm.encode(
            [
                "A man is playing a guitar.",
                "Someone is strumming a guitar.",
                "The stock market fell sharply today.",
            ]
        )
    assert e.shape == (3, 384) and minilm.output_dim == 384
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    para, unrelated = (e[0] @ e[1]).item(), (e[0] @ e[2]).item()
    assert para > unrelated + 0.3, (para, unrelated)


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_path()), device="cpu")
    texts = ["a red circle above a blue square", "two green triangles"]
    theirs = model.encode(texts, convert_to_tensor=True, normalize_embeddings=False)
    with torch.no_grad():
        ours = minilm.encode(texts)
    torch.testing.assert_close(ours, F.normalize(theirs.float(), dim=-1), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_directory_path_and_missing_hub_id(tmp_path):
    enc = PretrainedTextEncoder(TextConfig(kind="pretrained", pretrained=str(minilm_path())))
    assert enc.output_dim == 384
    with pytest.raises(UserError, match="offline"):
        PretrainedTextEncoder(TextConfig(kind="pretrained", pretrained=str(tmp_path / "nope")))
