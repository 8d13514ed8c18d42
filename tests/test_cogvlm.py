"""CogVLM visual expert: text-only equals the base decoder, the language stays frozen while the
expert trains, image positions really go to the expert, KV-cache decoding equals uncached, and
the engine's fast path decodes what the model's own decode does."""

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
from visto.losses import lm_loss
from visto.models import build_model
from visto.models.cogvlm import PARAM_GROUPS, CogVLM, CogVLMConfig
from visto.nn.language import DecoderLM
from visto.train.loop import train_step
from visto.train.optim import build_param_groups

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
TEXTS = ["What colour is the square?", "Say hello.", "hello there", *COLOURS] * 3


def square(colour: str) -> Image.Image:
    image = Image.new("RGB", (40, 40), (250, 250, 250))
    image.paste(Image.new("RGB", (20, 20), COLOURS[colour]), (10, 10))
    return image


def colour_samples(n: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c = rng.choice(list(COLOURS))
        turns = [Turn("user", "What colour is the square? <image>"), Turn("assistant", c)]
        out.append(Sample(f"{seed}-{i}", [square(c)], turns))
    return out


def text_sample() -> Sample:
    return Sample("text", [], [Turn("user", "Say hello."), Turn("assistant", "hello there")])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return path


def tiny(tokenizer_dir, seed: int = 0, **overrides) -> CogVLM:
    config = CogVLMConfig.preset("tiny", tokenizer_dir=str(tokenizer_dir), **overrides)
    return build_model("cogvlm", config, seed=seed)


def perturb_experts(model: CogVLM, seed: int = 1) -> None:
    """Experts start as copies of the language weights; make them differ, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.visual_expert.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def base_decoder(model: CogVLM) -> DecoderLM:
    base = DecoderLM(model.config.decoder)
    base.load_state_dict(model.language_model.state_dict())
    return base.eval()


def test_names_groups_and_config(tokenizer_dir):
    model = tiny(tokenizer_dir)
    assert model.family == "cogvlm"
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == set(PARAM_GROUPS.values())
    names = set(model.state_dict())
    # The language model is still a plain Llama state dict; experts have their own prefix.
    assert set(model.language_model.state_dict()) == set(DecoderLM(model.config.decoder).state_dict())
    assert "visual_expert.layers.1.self_attn.q_proj.weight" in names
    assert "visual_expert.layers.0.mlp.down_proj.weight" in names
    assert "visual_expert.layers.0.self_attn.o_proj.weight" not in names
    # The language projections stay plain layers: the experts are an argument of the decoder.
    assert type(model.language_model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with pytest.raises(UserError, match="expert_modules"):
        CogVLMConfig.preset("tiny", expert_modules=["qkv"])


def test_text_only_matches_the_base_decoder_exactly(tokenizer_dir):
    model = tiny(tokenizer_dir).eval()
    perturb_experts(model)
    base = base_decoder(model)
    batch = model.collate([text_sample(), text_sample()])
    assert not (batch["input_ids"] == IMAGE_TOKEN_ID).any()
    with torch.no_grad():
        loss = model(batch)["loss"]
        logits, _ = base(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    assert torch.equal(loss, lm_loss(logits, batch["labels"]))
    prompt = model.prompt_batch([text_sample()])
    got, _ = model.prefill(prompt)
    expected, _ = base.prefill(prompt)
    assert torch.equal(got, expected)


def test_image_positions_use_the_expert(tokenizer_dir):
    """Untrained (experts = language copies) it equals LLaVA with the same weights; once the
    experts differ, the image positions and everything after them change, the text before
    the image does not (causality), so the routing really happens."""
    model = tiny(tokenizer_dir).eval()
    batch = model.collate(colour_samples(2, seed=0))
    is_image = batch["input_ids"] == IMAGE_TOKEN_ID

    def logits() -> torch.Tensor:
        with torch.no_grad():
            embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
            return model.language_model(
                inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                conditioning=model.experts(batch["input_ids"]),
            )[0]

    with torch.no_grad():
        unrouted = model.language_model(
            inputs_embeds=model.embed_inputs(batch["input_ids"], batch["pixel_values"]),
            attention_mask=batch["attention_mask"],
        )[0]
    before = logits()
    torch.testing.assert_close(before, unrouted, atol=1e-5, rtol=0)
    perturb_experts(model)
    after = logits()
    first = int(is_image[0].nonzero()[0])
    assert torch.equal(after[:, :first], before[:, :first])
    assert (after[:, first:] - before[:, first:]).abs().max() > 1e-3


def test_language_frozen_bit_identical_while_expert_trains(tokenizer_dir):
    model = tiny(tokenizer_dir).train()
    lrs = {"language_model": 0.0, "vision_tower": 0.0}
    opt = torch.optim.AdamW(build_param_groups(model, 1e-2, lrs, 0.1), lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("language_model", "vision_tower"))}
    expert = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("visual_expert")}
    batch = model.collate(colour_samples(4, seed=1))
    losses = [train_step(model, opt, [batch], 1.0, torch.device("cpu"))["loss"] for _ in range(3)]
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())
    assert all(now[n].grad is None for n in frozen)
    moved = [n for n, v in expert.items() if not torch.equal(now[n], v)]
    assert len(moved) == len(expert), set(expert) - set(moved)
    assert losses[-1] < losses[0]


def test_kv_cache_decode_equals_uncached(tokenizer_dir, tmp_path):
    model = tiny(tokenizer_dir, seed=2).eval()
    perturb_experts(model)
    samples = colour_samples(3, seed=5)
    engine = Engine(model, model.processor.tokenizer, eos_token_ids=[])
    params = SamplingParams(max_new_tokens=5)
    outs = engine.generate_batch(model.prompt_batch(samples), params)
    assert engine.runner is not None  # the fused fast path, experts on the image positions
    own = Engine(model, model.processor.tokenizer, eos_token_ids=[], fast=False)
    own_outs = own.generate_batch(model.prompt_batch(samples), params)
    assert [o.token_ids for o in own_outs] == [o.token_ids for o in outs]
    for sample, out in zip(samples, outs, strict=True):
        [alone] = engine.generate_batch(model.prompt_batch([sample]), params)
        assert alone.token_ids == out.token_ids

    # Cached: prefill + decode steps, step by step logits; uncached: one routed forward.
    prompt = model.prompt_batch(samples[:1])
    logits, state = model.prefill(prompt)
    cached = [logits]
    for token in outs[0].token_ids[:-1]:
        logits, state = model.decode_step(torch.tensor([token]), state)
        cached.append(logits)
    ids = torch.cat([prompt.input_ids, torch.tensor([outs[0].token_ids[:-1]])], dim=1)
    with torch.no_grad():
        full, _ = model.language_model(
            inputs_embeds=model.embed_inputs(ids, prompt.pixel_values), conditioning=model.experts(ids)
        )
    T = prompt.input_ids.shape[1]
    torch.testing.assert_close(torch.cat(cached), full[0, T - 1 :], atol=1e-5, rtol=1e-5)

    save_checkpoint(model, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt")
    [same] = Engine(again, again.processor.tokenizer, eos_token_ids=[]).generate_batch(prompt, params)
    assert same.token_ids == outs[0].token_ids
