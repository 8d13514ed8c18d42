"""The LM head on the scored positions only (LLaVA without a pointer, CogVLM, Fuyu): `forward`
gives the loss, token accuracy and gradients of the head over every position, to rounding."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from visto.data.sample import Sample, Turn
from visto.data.tokenizer import train_tokenizer
from visto.losses import answer_loss
from visto.models import build_model
from visto.models.cogvlm import CogVLMConfig
from visto.models.common import training_logits
from visto.models.fuyu import FuyuConfig
from visto.models.llava import LlavaConfig

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TEXTS = ["What colour is the square?", "Say hello.", "hello there", *COLOURS] * 3
CONFIGS = {"llava": LlavaConfig, "cogvlm": CogVLMConfig, "fuyu": FuyuConfig}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return path


def samples() -> list[Sample]:
    rng, out = random.Random(0), []
    for i in range(4):  # answers of different lengths: rows padded differently
        c = rng.choice(list(COLOURS))
        image = Image.new("RGB", (40, 40), (250, 250, 250))
        image.paste(Image.new("RGB", (20, 20), COLOURS[c]), (10, 10))
        answer = " ".join([c] * (i + 1))
        turns = [Turn("user", "What colour is the square? <image>"), Turn("assistant", answer)]
        out.append(Sample(str(i), [image], turns))
    out.append(Sample("t", [], [Turn("user", "Say hello."), Turn("assistant", "hello there")]))
    return out


def head_everywhere(model, batch) -> dict[str, torch.Tensor]:
    """The reference: logits at every position, then the loss on the answers."""
    conditioning = model.experts(batch["input_ids"]) if hasattr(model, "experts") else None
    if hasattr(model, "_embed_batch"):
        embeds = model._embed_batch(batch)
    else:
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch.get("image_sample_index"))
    logits = training_logits(model.language_model, embeds, batch, conditioning)
    return answer_loss(logits, batch["labels"])


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_forward_scores_like_the_head_over_every_position(family, tokenizer_dir):
    model = build_model(family, CONFIGS[family].preset("tiny", tokenizer_dir=str(tokenizer_dir)), seed=0)
    batch = model.collate(samples())
    assert int((batch["labels"] != -100).sum()) < batch["labels"].numel() // 2  # most rows unscored
    grads = []
    for loss_of in (model, lambda b: head_everywhere(model, b)):
        model.zero_grad()
        out = loss_of(batch)
        out["loss"].backward()
        grads.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ours, our_grads), (ref, ref_grads) = grads
    torch.testing.assert_close(ours["loss"], ref["loss"], atol=1e-5, rtol=1e-5)
    assert float(ours["token_acc"]) == float(ref["token_acc"])
    assert our_grads.keys() == ref_grads.keys() and len(our_grads) > 0
    for name in ref_grads:
        torch.testing.assert_close(our_grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
