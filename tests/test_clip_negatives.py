"""NegCLIP's hard negative captions: the word swap, collate, the loss wiring, the recipe."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from visto.data.negatives import check_swap_groups, swap_word
from visto.data.processor import Processor, ProcessorConfig
from visto.data.sample import Sample
from visto.data.synth import COLOURS, SHAPES
from visto.data.tokenizer import train_tokenizer
from visto.errors import UserError
from visto.losses import clip_loss, pair_positives, siglip_loss
from visto.models import build_model
from visto.models.clip import CLIP, CLIPConfig, negative_matches

WORLD = [list(SHAPES), [s + ("es" if s.endswith("s") else "s") for s in SHAPES], list(COLOURS)]
TOY_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TOY_SWAPS = [list(TOY_COLOURS), ["square", "circle"]]


def words(text: str) -> list[str]:
    return text.replace(".", " .").replace(",", " ,").split()


@pytest.mark.parametrize(
    "caption",
    [
        "A small blue star on a checked background.",
        "Five shapes: two circles, a square, a star and a diamond.",
        "An image with a small purple circle in the centre, a medium pink star at the bottom.",
    ],
)
def test_swap_is_one_whole_word_of_the_same_list_not_in_the_caption(caption):
    before = words(caption)
    for seed in range(50):
        neg = swap_word(caption, WORLD, random.Random(seed))
        assert neg is not None
        after = words(neg)
        assert len(after) == len(before)
        changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
        assert len(changed) == 1, (caption, neg)
        old, new = (w.lower() for w in changed[0])
        group = next(g for g in WORLD if old in g)
        assert new in group and new != old
        # never a word the caption has, in any number ("circle" is in "two circles")
        assert not any(w.lower().startswith(new) for w in before)


def test_swap_edge_cases():
    rng = random.Random(0)
    # "stars" is not a listed word, and "star" (in "stars") is no replacement: only one choice.
    assert swap_word("Two stars and a circle.", [["star", "circle", "square"]], rng) == (
        "Two stars and a square."
    )
    # whole words only: "redwood" is not "red"; capitals stay capitals
    assert swap_word("a redwood and a red circle", [["red", "blue"]], rng) == (
        "a redwood and a blue circle"
    )
    assert swap_word("Red circle.", [["red", "blue"]], rng) == "Blue circle."
    # nothing to swap, or every alternative already in the caption
    assert swap_word("a dog", [["red", "blue"]], rng) is None
    assert swap_word("a red and a blue", [["red", "blue"]], rng) is None


def test_swap_groups_are_checked():
    assert check_swap_groups([["Red", "blue"]]) == [["red", "blue"]]
    for bad, match in [
        ("shapes", "list of lists"),
        ([["red"]], "at least two"),
        ([["red", "blue"], ["red", "green"]], "list 0 and list 1"),
        ([["light blue", "red"]], "not one word"),
        ([["red", 3]], "not one word"),
    ]:
        with pytest.raises(UserError, match=match):
            CLIPConfig(hard_negative_swaps=bad)


@pytest.fixture(scope="module")
def processor() -> Processor:
    texts = [f"a {c} {s}" for c in TOY_COLOURS for s in ("square", "circle")] * 5
    config = ProcessorConfig(image_size=32, resize_mode="resize", loc_bins=4, vocab_size=300)
    return Processor(config, train_tokenizer(texts, vocab_size=300, loc_bins=4, min_frequency=1))


def toy_samples() -> list[Sample]:
    samples = []
    for i, (name, rgb) in enumerate(TOY_COLOURS.items()):
        image = Image.new("RGB", (40, 40), (250, 250, 250))
        image.paste(Image.new("RGB", (20, 20), rgb), (10, 10))
        samples.append(Sample(str(i), [image], truth={"caption": f"a {name} square"}))
    return samples


def tiny_clip(processor: Processor, **overrides) -> CLIP:
    model = build_model("clip", CLIPConfig.preset("tiny", **overrides), seed=0)
    model.processor = processor
    return model


def test_off_by_default_is_the_plain_loss(processor):
    assert CLIPConfig().hard_negative_swaps == []
    plain = tiny_clip(processor)
    batch = plain.collate(toy_samples())
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "caption_ids", "image_ids"}
    out = plain(batch)
    assert "acc_hard_negative" not in out
    image = plain.encode_image(batch["pixel_values"])
    text = plain.encode_text_tokens(batch["input_ids"], batch["attention_mask"])
    positives = pair_positives(batch["caption_ids"], batch["image_ids"])
    expected = clip_loss(image, text, plain.current_logit_scale(), positives)
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-6)
    # The same weights with hard negatives on: the real captions' part is unchanged.
    negclip = tiny_clip(processor, hard_negative_swaps=TOY_SWAPS)
    negclip.load_state_dict(plain.state_dict())
    with_negs = negclip.collate(toy_samples())
    assert torch.equal(with_negs["input_ids"], batch["input_ids"])
    assert negclip({k: v for k, v in with_negs.items() if not k.startswith("negative")})[
        "loss"
    ].item() == pytest.approx(out["loss"].item(), abs=1e-6)


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_collate_and_forward_with_hard_negatives(processor, loss):
    model = tiny_clip(processor, hard_negative_swaps=TOY_SWAPS, loss=loss)
    samples = toy_samples()
    batch = model.collate(samples)
    again = model.collate(samples)
    assert torch.equal(batch["negative_input_ids"], again["negative_input_ids"])  # seeded by ids
    assert batch["negative_of"].tolist() == [0, 1, 2]
    negatives = [
        processor.tokenizer.decode(ids[mask.bool()].tolist(), skip_special=True).strip()
        for ids, mask in zip(
            batch["negative_input_ids"], batch["negative_attention_mask"], strict=True
        )
    ]
    for sample, negative in zip(samples, negatives, strict=True):
        before, after = words(sample.truth["caption"]), words(negative)
        assert sum(a != b for a, b in zip(before, after, strict=True)) == 1, negative
    out = model(batch)
    assert "acc_hard_negative" in out
    image = model.encode_image(batch["pixel_values"])
    text = model.encode_text_tokens(batch["input_ids"], batch["attention_mask"])
    neg = model.encode_text_tokens(batch["negative_input_ids"], batch["negative_attention_mask"])
    positives = pair_positives(batch["caption_ids"], batch["image_ids"])
    matches = negative_matches(batch)
    scale = model.current_logit_scale()
    if loss == "siglip":
        expected = siglip_loss(image, text, scale, model.logit_bias, positives, neg, matches)
    else:
        expected = clip_loss(image, text, scale, positives, neg, matches)
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-6)
    out["loss"].backward()
    assert model.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0


def test_a_negative_that_is_another_caption_is_not_its_negative(processor):
    # With only red/blue to swap, each caption's negative is the other's caption.
    model = tiny_clip(processor, hard_negative_swaps=[["red", "blue"]])
    batch = model.collate([toy_samples()[0], toy_samples()[2]])  # a red / a blue square
    assert batch["negative_caption_ids"].tolist() == [1, 0]
    assert negative_matches(batch).tolist() == [[False, True], [True, False]]
    assert torch.isfinite(model(batch)["loss"])


def test_recipe_option_is_checked():
    from visto.pretrained import build_model
    from visto.train.recipe import load_recipe

    recipe = load_recipe("clip-synth", ['model.config.hard_negative_swaps=[["circle"]]'])
    with pytest.raises(UserError, match="at least two words"):
        build_model("clip", recipe.model.config)
    recipe = load_recipe("clip-synth", ["model.config.hard_negative_swaps=shapes"])
    with pytest.raises(UserError, match="list of lists"):
        build_model("clip", recipe.model.config)


def test_ablation_recipe_swaps_the_worlds_vocabulary():
    from visto.pretrained import build_model
    from visto.train.recipe import load_recipe

    recipe = load_recipe("clip-synth-negclip")
    model = build_model("clip", recipe.model.config)
    assert model.config.hard_negative_swaps == WORLD  # shapes, their plurals, colours
    assert not load_recipe("clip-synth").model.config.get("hard_negative_swaps")
