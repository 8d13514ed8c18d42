"""Object tokens (connectors/regions.py): selection, word-tied tokens, LLaVA wiring, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visto.checkpoint import load, save_checkpoint
from visto.connectors.projector import ProjectorConfig
from visto.connectors.regions import (
    COLOUR_NAMES,
    SHAPE_NAMES,
    SIZE_NAMES,
    RegionConnector,
    box_fourier,
)
from visto.data.tokenizer import train_tokenizer
from visto.models.llava import LlavaConfig
from visto.nn.language import DecoderConfig, DecoderLM
from visto.pretrained import build_model

TEXTS = [f"Which colour does the {s} have? a {c} {s}, {z}" for s in SHAPE_NAMES for c in COLOUR_NAMES
         for z in SIZE_NAMES]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return path


def connector(tokenizer_dir, slots=4, width=16, d=32):
    from visto.data.tokenizer import Tokenizer

    c = RegionConnector(width, d, slots)
    c.set_vocabulary(Tokenizer.load(tokenizer_dir / "tokenizer.json"))
    return c


def test_select_takes_confident_centres_in_raster_order(tokenizer_dir):
    c = connector(tokenizer_dir, slots=4)
    centre = torch.full((1, 16), -5.0)
    centre[0, 9], centre[0, 2], centre[0, 12] = 3.0, 1.0, 2.0  # three objects
    index, present = c.select({"centre": centre})
    assert index[0, :3].tolist() == [2, 9, 12]  # raster order, not score order
    assert present[0].tolist() == [True, True, True, False]


def test_more_slots_than_patches_pad_with_empty_slots(tokenizer_dir):
    c = connector(tokenizer_dir, slots=20)
    centre = torch.full((2, 16), -5.0)
    centre[1, 5] = 4.0
    index, present = c.select({"centre": centre})
    assert index.shape == (2, 20) and present.sum().item() == 1 and present[1, 0]


def test_object_token_is_the_sum_of_its_attribute_words(tokenizer_dir):
    """With the feature and box maps zeroed, a confident large red star is E[red] + E[star] +
    E[large] + its box's location words."""
    c = connector(tokenizer_dir, slots=2)
    embed = nn.Embedding(400, 32)
    for lin in (c.feature, c.box):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
    heads = c.heads
    for lin in (heads.shape, heads.colour, heads.size, heads.centre, heads.centre_shape, heads.box):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
    with torch.no_grad():
        heads.centre.bias.fill_(5.0)  # every patch is a centre: the first two (raster) are taken
        heads.centre_shape.bias[1 + SHAPE_NAMES.index("star")] = 50.0
        heads.colour.bias[1 + COLOUR_NAMES.index("red")] = 50.0
        heads.size.bias[1 + SIZE_NAMES.index("large")] = 50.0
    tokens = c(torch.randn(1, 16, 16), embed)
    want = c.word_table(embed, "colour")[COLOUR_NAMES.index("red")]
    want = want + c.word_table(embed, "shape")[SHAPE_NAMES.index("star")]
    want = want + c.word_table(embed, "size")[SIZE_NAMES.index("large")]
    want = want + c.box_words(torch.full((1, 1, 4), 0.5), embed)[0, 0].mean(0)  # the zeroed box head says 0.5
    assert torch.allclose(tokens[0, 0], want, atol=1e-5)


def test_no_object_gives_the_empty_token_everywhere(tokenizer_dir):
    c = connector(tokenizer_dir, slots=3)
    with torch.no_grad():
        c.heads.centre.bias.fill_(-50.0)
        c.empty.fill_(0.5)
    tokens = c(torch.randn(2, 16, 16), nn.Embedding(400, 32))
    assert torch.allclose(tokens, torch.full_like(tokens, 0.5))


def test_box_features_separate_nearby_boxes():
    a, b = box_fourier(torch.tensor([0.10, 0.10, 0.30, 0.30])), box_fourier(torch.tensor([0.12, 0.10, 0.30, 0.30]))
    assert a.shape == (48,) and (a - b).abs().max() > 0.1


def test_mimetic_init_starts_queries_equal_to_their_key_heads():
    cfg = DecoderConfig.preset("tiny", vocab_size=64, attention_init="mimetic")
    lm = DecoderLM(cfg)
    attn = lm.model.layers[0].self_attn
    hd, group = attn.head_dim, attn.n_heads // attn.n_kv_heads
    for h in range(attn.n_heads):
        g = h // group
        assert torch.equal(attn.q_proj.weight[h * hd : (h + 1) * hd], attn.k_proj.weight[g * hd : (g + 1) * hd])
    normal = DecoderLM(DecoderConfig.preset("tiny", vocab_size=64))
    assert not torch.equal(normal.model.layers[0].self_attn.q_proj.weight[:hd],
                           normal.model.layers[0].self_attn.k_proj.weight[:hd])  # fmt: skip


def test_llava_with_object_tokens_trains_saves_and_loads(tokenizer_dir, tmp_path):
    from PIL import Image

    from visto.data.sample import Sample, Turn

    config = LlavaConfig.preset(
        "tiny", tokenizer_dir=str(tokenizer_dir), projector=ProjectorConfig(kind="regions", slots=5)
    )
    config.processor.image_tokens = 5
    model = build_model("llava", config, seed=0)
    assert model.config.image_tokens == 5
    sample = Sample("s", [Image.new("RGB", (40, 40), (200, 30, 30))],
                    [Turn("user", "<image>\nWhich colour does the star have?"), Turn("assistant", "red")])  # fmt: skip
    batch = model.collate([sample, sample])
    out = model(batch)
    out["loss"].backward()
    # The frozen detector gets no gradient through the selection; the tied words do.
    assert model.multi_modal_projector.heads.centre.weight.grad is None
    assert model.language_model.model.embed_tokens.weight.grad.abs().sum() > 0
    save_checkpoint(model, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt")
    again.eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(again(batch)["loss"], model(batch)["loss"], atol=1e-5)


def test_tags_mix_the_question_form_and_the_answer_form_of_each_word(tokenizer_dir):
    """" star" (named in a question) and "star" (said in an answer) are different BPE tokens;
    a tag is the mean of both, so the weights of each value sum to 1."""
    from visto.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir / "tokenizer.json")
    c = connector(tokenizer_dir)
    ids, weights = c.vocabulary["shape"]
    assert torch.allclose(weights.sum(1), torch.ones(len(SHAPE_NAMES)))
    star = SHAPE_NAMES.index("star")
    assert set(tok.encode(" star")) | set(tok.encode("star")) <= set(ids[star][weights[star] > 0].tolist())


def test_box_words_are_the_boxes_location_tokens(tokenizer_dir):
    """A box question reads, and a grounding answer writes, these very tokens."""
    from visto.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir / "tokenizer.json")
    c = connector(tokenizer_dir)
    embed = nn.Embedding(400, 32)
    box = torch.tensor([[[0.10, 0.20, 0.55, 0.999]]])  # (B=1, S=1, 4)
    ids = [tok.loc_ids[int(v * tok.loc_bins)] for v in box[0, 0].tolist()]
    assert tok.format_box([100, 200, 550, 999]) == "".join(tok.decode([i]) for i in ids)
    assert torch.allclose(c.box_words(box, embed)[0, 0], embed(torch.tensor(ids)))


def test_box_tokens_follow_each_object_with_its_location_tokens(tokenizer_dir):
    """With `box_tokens`, slot s is 5 tokens: the object, then E[<loc>] of x1, y1, x2, y2,
    exactly the embeddings a grounding answer writes; empty slots are 5 empty tokens."""
    from visto.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir / "tokenizer.json")
    c = RegionConnector(16, 32, 3, box_tokens=True)
    c.set_vocabulary(tok)
    embed = nn.Embedding(400, 32)
    with torch.no_grad():  # every box is (0.1, 0.2, 0.55, 0.9); empty slots read 0.5
        c.heads.box.weight.zero_()
        c.heads.box.bias.copy_(torch.logit(torch.tensor([0.1, 0.2, 0.55, 0.9])))
        c.empty.fill_(0.5)
    plain = RegionConnector(16, 32, 3)  # the same weights without box tokens
    plain.load_state_dict(c.state_dict())
    plain.set_vocabulary(tok)
    centre_logits = torch.full((1, 16), -50.0)
    centre_logits[0, 4] = 5.0  # one object, at patch 4
    c.heads.forward = _with_centres(c.heads.forward, centre_logits)
    plain.heads.forward = _with_centres(plain.heads.forward, centre_logits)
    features = torch.randn(1, 16, 16)
    tokens = c(features, embed)
    assert tokens.shape == (1, 15, 32)
    ids = [tok.loc_ids[int(v * tok.loc_bins)] for v in (0.1, 0.2, 0.55, 0.9)]
    assert torch.allclose(tokens[0, 1:5], embed(torch.tensor(ids)), atol=1e-5)
    assert torch.allclose(tokens[0, 0], plain(features, embed)[0, 0], atol=1e-6)  # as before
    assert torch.allclose(tokens[0, 5:], torch.full((10, 32), 0.5))
    assert ProjectorConfig(kind="regions", slots=3, box_tokens=True).num_tokens(16) == 15


def _with_centres(forward, centre_logits):
    def patched(features):
        out = forward(features)
        out["centre"] = centre_logits.expand(features.shape[0], -1)
        return out

    return patched


def test_a_tower_from_a_checkpoint_brings_its_object_detector(tokenizer_dir, tmp_path):
    """`vision_init` of a LLaVA with object tokens takes the dense heads trained with that
    tower (as visto compare's LLaVA reads the quickstart's vision stage)."""
    regions = ProjectorConfig(kind="regions", slots=5)

    def config(**kw):
        c = LlavaConfig.preset("tiny", tokenizer_dir=str(tokenizer_dir), projector=regions, **kw)
        c.processor.image_tokens = 5
        return c

    donor = build_model("llava", config(), seed=1)
    save_checkpoint(donor, tmp_path / "vision")
    model = build_model("llava", config(vision_init=str(tmp_path / "vision")), seed=2)
    for name, value in donor.multi_modal_projector.heads.state_dict().items():
        assert torch.equal(model.multi_modal_projector.heads.state_dict()[name], value), name
    # A tower without a detector (a patch-projector LLaVA) is a clear error, not random heads.
    plain = LlavaConfig.preset("tiny", tokenizer_dir=str(tokenizer_dir))
    save_checkpoint(build_model("llava", plain, seed=3), tmp_path / "plain")
    from visto.errors import UserError

    with pytest.raises(UserError, match="has none; make a tower with them"):
        build_model("llava", config(vision_init=str(tmp_path / "plain")))
    # Reading text needs the tower's OCR reader: one without it is a clear error too.
    reading = ProjectorConfig(kind="regions", slots=5, text_slots=1, text_tokens=2)
    c = LlavaConfig.preset("tiny", tokenizer_dir=str(tokenizer_dir), projector=reading,
                           vision_init=str(tmp_path / "vision"))  # fmt: skip
    c.processor.image_tokens = 7
    with pytest.raises(UserError, match="OCR reader .* has none"):
        build_model("llava", c)


def test_read_slots_take_the_towers_ocr_reader_too(tokenizer_dir, tmp_path):
    """A recipe LLaVA whose focus reads text into `<focus>` slots (read_slots, as visto compare's
    LLaVA) takes the OCR reader trained beside its tower, not a fresh one (it took only the
    heads before, and read with random weights); a tower without a reader is a clear error."""
    from visto.data.tokenizer import Tokenizer, with_focus_token
    from visto.errors import UserError

    focus_dir = tmp_path / "tok"
    focus_dir.mkdir()
    with_focus_token(Tokenizer.load(tokenizer_dir / "tokenizer.json")).save(focus_dir / "tokenizer.json")

    def config(projector, image_tokens, focus_tokens=0, **kw):
        c = LlavaConfig.preset("tiny", tokenizer_dir=str(focus_dir), projector=projector, **kw)
        c.processor.image_tokens, c.processor.focus_tokens = image_tokens, focus_tokens
        return c

    donor = build_model("llava", config(ProjectorConfig(kind="regions", slots=5, text_slots=1, text_tokens=2), 7),
                        seed=1)  # fmt: skip
    save_checkpoint(donor, tmp_path / "vision")
    reading = ProjectorConfig(kind="regions", slots=5, focus=True, read_slots=3)
    model = build_model("llava", config(reading, 5, 7, vision_init=str(tmp_path / "vision")), seed=2)
    for name, value in donor.multi_modal_projector.reader.state_dict().items():
        assert torch.equal(model.multi_modal_projector.reader.state_dict()[name], value), name
    save_checkpoint(build_model("llava", config(ProjectorConfig(kind="regions", slots=5), 5), seed=3),
                    tmp_path / "no-reader")  # fmt: skip
    with pytest.raises(UserError, match="read_slots 3 reads text with the OCR reader"):
        build_model("llava", config(reading, 5, 7, vision_init=str(tmp_path / "no-reader")))
