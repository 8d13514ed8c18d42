"""Fuyu: raw patches of any aspect ratio, newline per patch row, training, engine, transformers."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from visto.checkpoint import load, save_checkpoint
from visto.data.sample import Sample, Turn
from visto.data.special_tokens import IMAGE_TOKEN_ID
from visto.data.tokenizer import train_tokenizer
from visto.errors import UserError
from visto.infer.engine import Engine
from visto.infer.sampling import SamplingParams
from visto.models import build_model
from visto.models.fuyu import PARAM_GROUPS, Fuyu, FuyuConfig
from visto.train.loop import train_step
from visto.train.optim import build_param_groups

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def block(colour: str, width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (250, 250, 250))
    image.paste(Image.new("RGB", (width // 2, height // 2), COLOURS[colour]), (width // 4, height // 4))
    return image


def colour_samples(n: int, seed: int) -> list[Sample]:
    """Wide, tall and square images mixed, so batches carry several grids."""
    rng = random.Random(seed)
    sizes = [(32, 16), (16, 32), (24, 24), (40, 20)]
    out = []
    for i in range(n):
        c = rng.choice(list(COLOURS))
        turns = [Turn("user", "<image>\nWhat colour is it?"), Turn("assistant", c)]
        out.append(Sample(f"{seed}-{i}", [block(c, *rng.choice(sizes))], turns))
    return out


TEXTS = ["What colour is it?", "Describe both.", *COLOURS] * 3


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return path


def tiny(tokenizer_dir, seed: int = 0, **overrides) -> Fuyu:
    return build_model("fuyu", FuyuConfig.preset("tiny", tokenizer_dir=str(tokenizer_dir), **overrides), seed=seed)


def test_registry_and_groups(tokenizer_dir):
    model = tiny(tokenizer_dir)
    assert isinstance(model, Fuyu) and model.family == "fuyu"
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == set(PARAM_GROUPS.values())
    with pytest.raises(UserError, match="resize_mode"):
        FuyuConfig.preset("tiny", processor=FuyuConfig.preset("tiny").processor.__class__(resize_mode="pad"))


def test_two_aspect_ratios_in_one_batch(tokenizer_dir):
    """A wide (32x16) and a tall (16x32) image: grids 2x4 and 4x2, a newline after every row,
    one patch embedding per <image> position, in order, and no resize to a square."""
    model = tiny(tokenizer_dir).eval()
    wide = Sample("w", [block("red", 32, 16)], [Turn("user", "<image>\nWhat colour is it?"), Turn("assistant", "red")])
    tall = Sample("t", [block("blue", 16, 32)], [Turn("user", "What colour is it? <image>"), Turn("assistant", "blue")])
    batch = model.collate([wide, tall])
    assert batch["image_grids"].tolist() == [[2, 4], [4, 2]]
    assert batch["pixel_values"].shape == (16, 3 * 8 * 8)
    tok = model.processor.tokenizer
    ids = batch["input_ids"]
    assert int((ids == IMAGE_TOKEN_ID).sum()) == batch["pixel_values"].shape[0]
    assert (ids == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [8, 8]
    assert (ids == tok.im_newline_id).sum(dim=1).tolist() == [2, 4]
    row0 = ids[0].tolist()
    first = row0.index(IMAGE_TOKEN_ID)
    assert row0[first : first + 10] == [IMAGE_TOKEN_ID] * 4 + [tok.im_newline_id] + [IMAGE_TOKEN_ID] * 4 + [tok.im_newline_id]
    with torch.no_grad():
        embeds = model.embed_inputs(ids, batch["pixel_values"], batch["image_sample_index"], batch["image_token_counts"])
        patches = model.vision_embed_tokens(batch["pixel_values"])
        plain = model.language_model.embed(ids)
    is_image = ids == IMAGE_TOKEN_ID
    torch.testing.assert_close(embeds[0][is_image[0]], patches[:8])
    torch.testing.assert_close(embeds[1][is_image[1]], patches[8:])
    torch.testing.assert_close(embeds[~is_image], plain[~is_image])  # newlines keep their embedding
    # The top-left patch of the wide image is background; its red block starts in patch (0, 1).
    with pytest.raises(AssertionError, match="<image> ids but 15 patches"):
        model.embed_inputs(ids, batch["pixel_values"][:15])
    with pytest.raises(AssertionError, match="per row"):
        model.embed_inputs(ids, batch["pixel_values"], torch.tensor([0, 0]), batch["image_token_counts"])


def test_trains_loss_falls(tokenizer_dir):
    torch.manual_seed(0)
    model = tiny(tokenizer_dir).train()
    opt = torch.optim.AdamW(build_param_groups(model, 3e-3, {}, 0.0), lr=3e-3)
    batch = model.collate(colour_samples(8, seed=1))
    losses = [train_step(model, opt, [batch], 1.0, torch.device("cpu"))["loss"] for _ in range(25)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_engine_kv_cache_matches_full_forward_and_batching(tokenizer_dir, tmp_path):
    model = tiny(tokenizer_dir, seed=3).eval()
    samples = colour_samples(3, seed=4)
    engine = Engine(model, model.processor.tokenizer, eos_token_ids=[])  # always 6 tokens
    params = SamplingParams(max_new_tokens=6)
    batch = model.prompt_batch(samples)
    outs = engine.generate_batch(batch, params)
    # The engine's fast path (fused decoder weights) runs Fuyu and equals its own decode.
    assert engine.can_join
    slow = Engine(model, model.processor.tokenizer, eos_token_ids=[], fast=False)
    assert [o.token_ids for o in slow.generate_batch(batch, params)] == [o.token_ids for o in outs]
    # Each prompt alone gives the same tokens (left padding and grids do not leak across rows).
    for sample, out in zip(samples, outs, strict=True):
        [alone] = engine.generate_batch(model.prompt_batch([sample]), params)
        assert alone.token_ids == out.token_ids
    # The cached decode equals an uncached forward over prompt + generated tokens.
    one = model.prompt_batch(samples[:1])
    ids = torch.cat([one.input_ids, torch.tensor([outs[0].token_ids[:-1]])], dim=1)
    with torch.no_grad():
        embeds = model.embed_inputs(ids, one.pixel_values)
        logits, _ = model.language_model(inputs_embeds=embeds)
    assert logits[0, one.input_ids.shape[1] - 1 :].argmax(-1).tolist() == outs[0].token_ids
    # Streaming through the engine works and a checkpoint round trip keeps the answers.
    pieces = list(engine.stream(model.prompt_batch(samples[:1]), params))
    assert "".join(pieces) == outs[0].text
    save_checkpoint(model, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt")
    [same] = Engine(again, again.processor.tokenizer, eos_token_ids=[]).generate_batch(model.prompt_batch(samples[:1]), params)
    assert same.token_ids == outs[0].token_ids
