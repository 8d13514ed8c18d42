"""Q-Former: what each mask lets see, cross-attention placement, shape independent of the image."""

from __future__ import annotations

import pytest
import torch

from visto.connectors.qformer import QFormer, QFormerConfig, qformer_attention_mask

IMAGE_DIM = 24


def tiny(**overrides) -> QFormer:
    cfg = QFormerConfig(
        **{"num_queries": 4, "hidden_size": 32, "layers": 4, "heads": 4, "intermediate_size": 64,
           "vocab_size": 50, "max_text_len": 16, "dropout": 0.0, **overrides}
    )
    torch.manual_seed(0)
    return QFormer(cfg, IMAGE_DIM).eval()


def inputs(B: int = 2, T: int = 7, P: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, P, IMAGE_DIM, generator=g)
    ids = torch.randint(5, 50, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -2:] = 0  # the second row is padded
    return image, ids, mask


def perturbed(ids: torch.Tensor, position: int) -> torch.Tensor:
    out = ids.clone()
    out[:, position] = (out[:, position] - 5 + 17) % 45 + 5  # another valid id
    assert not torch.equal(out, ids)
    return out


@torch.no_grad()
def test_itc_queries_cannot_see_the_text_but_itm_queries_can():
    model = tiny()
    image, ids, mask = inputs()
    other = perturbed(ids, 2)
    uni, uni2 = (model(image, x, mask, mode="unimodal") for x in (ids, other))
    assert torch.equal(uni.queries, uni2.queries)  # bit for bit: no path from text to queries
    assert not torch.allclose(uni.text, uni2.text)
    bi, bi2 = (model(image, x, mask, mode="bidirectional") for x in (ids, other))
    assert (bi.queries - bi2.queries).abs().max() > 1e-4
    # The unimodal pass is a query-only pass and a text-only pass at once.
    torch.testing.assert_close(uni.queries, model(image).queries)
    alone = model(None, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(uni.text[real], alone.text[real])
    # ... and the text side never reads the image under the unimodal mask.
    assert torch.equal(uni.text, model(image * 3 + 1, ids, mask, mode="unimodal").text)


@torch.no_grad()
def test_itg_text_sees_queries_and_the_past_never_the_future():
    model = tiny()
    image, ids, mask = inputs()
    t = 4
    base = model(image, ids, mask, mode="causal")
    changed = model(image, perturbed(ids, t), mask, mode="causal")
    assert torch.equal(base.queries, changed.queries)  # queries never see the text
    torch.testing.assert_close(base.text[:, :t], changed.text[:, :t], rtol=0, atol=1e-6)
    assert (base.text[:, t:] - changed.text[:, t:]).abs().amax(dim=-1).min() > 1e-5
    # Text reads the image through the queries.
    other_image = model(image + 1, ids, mask, mode="causal")
    assert (other_image.text[:, 0] - base.text[:, 0]).abs().max() > 1e-4


def test_mask_layout():
    text_mask = torch.tensor([[1, 1, 0]])
    Q = 2
    causal = qformer_attention_mask("causal", Q, text_mask)[0, 0].int()
    assert causal.tolist() == [
        [1, 1, 0, 0, 0],  # query: queries only
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # text 0: queries + itself
        [1, 1, 1, 1, 0],  # text 1: queries + text 0..1
        [1, 1, 1, 1, 0],  # text 2 (padding): padding keys hidden everywhere
    ]
    uni = qformer_attention_mask("unimodal", Q, text_mask)[0, 0].int()
    assert uni.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0],
                            [0, 0, 1, 1, 0]]  # fmt: skip
    bi = qformer_attention_mask("bidirectional", Q, text_mask)[0, 0].int()
    assert bi.tolist() == [[1, 1, 1, 1, 0]] * 5
    with pytest.raises(ValueError, match="mask mode"):
        qformer_attention_mask("sideways", Q, text_mask)


@torch.no_grad()
def test_padding_ids_do_not_matter():
    model = tiny()
    image, ids, mask = inputs()
    for mode in ("unimodal", "bidirectional", "causal"):
        base = model(image, ids, mask, mode=mode)
        other = model(image, ids.masked_fill(mask == 0, 7), mask, mode=mode)
        torch.testing.assert_close(base.queries, other.queries)
        real = mask.bool()
        torch.testing.assert_close(base.text[real], other.text[real])


def test_cross_attention_every_other_layer():
    model = tiny(layers=4)
    has = [hasattr(layer, "crossattention") for layer in model.encoder.layer]
    assert has == [True, False, True, False]
    assert [hasattr(la, "crossattention") for la in tiny(cross_attention_frequency=1).encoder.layer] == [True] * 4


@torch.no_grad()
def test_output_shape_does_not_depend_on_the_image_size():
    model = tiny()
    for P in (1 + 16, 1 + 64, 5):  # 32 px and 64 px images with 8 px patches (+ CLS), and odd
        image, ids, mask = inputs(P=P)
        assert model(image).queries.shape == (2, 4, 32)
        out = model(image, ids, mask, mode="bidirectional")
        assert out.queries.shape == (2, 4, 32) and out.text.shape == (2, 7, 32)


def test_hf_key_map_names():
    keys = tiny(layers=2).hf_key_map()
    assert keys["query_tokens"] == "query_tokens"
    assert keys["embeddings.word_embeddings.weight"] == "embeddings.word_embeddings.weight"
    assert keys["encoder.layer.0.attention.attention.q_proj.weight"] == (
        "qformer.encoder.layer.0.attention.attention.query.weight"
    )
    assert keys["encoder.layer.0.crossattention.attention.out_proj.bias"] == (
        "qformer.encoder.layer.0.crossattention.output.dense.bias"
    )
    assert keys["encoder.layer.0.crossattention.LayerNorm.weight"] == (
        "qformer.encoder.layer.0.crossattention.output.LayerNorm.weight"
    )
    assert keys["encoder.layer.1.output_query.LayerNorm.bias"] == (
        "qformer.encoder.layer.1.output_query.LayerNorm.bias"
    )
    assert not any(k.startswith("lm_head.") for k in keys)
