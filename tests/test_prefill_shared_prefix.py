"""Rows that begin alike are prefilled once (issue 19): several questions about one image run
the image through the vision tower once and the shared prompt prefix through the decoder
once; logits and greedy tokens stay those of the model's own path and of each row alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_llava import tiny, tokenizer_dir  # noqa: F401 (fixture)
from visto.data.sample import Sample, Turn
from visto.infer import Engine, PromptBatch, SamplingParams
from visto.infer.continuous import ContinuousBatch
from visto.infer.runner import MIN_SHARED_PREFIX, shared_prefix
from visto.nn.language import DecoderConfig, DecoderLM
from visto.nn.vision import ViT, ViTConfig, distinct_images

QUESTIONS = ["what is in the image?", "red", "is the blue square left of the circle", "what"]


@pytest.fixture(scope="module")
def model(tokenizer_dir):  # noqa: F811
    torch.manual_seed(0)
    llava = tiny(tokenizer_dir).eval()
    with torch.no_grad():  # peaked logits: greedy choices far from ties
        for p in llava.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return llava


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))


@pytest.mark.parametrize("images", [(0, 0, 0, 0), (0, 1, 0, 0)])
def test_questions_about_one_image_give_the_models_numbers(model, images):
    tokenizer = model.processor.tokenizer
    fast = Engine(model, tokenizer, eos_token_ids=[])
    slow = Engine(model, tokenizer, eos_token_ids=[], fast=False)
    pictures = {seed: _image(seed) for seed in set(images)}
    samples = [Sample(f"q{i}", [pictures[seed]], [Turn("user", "<image>\n" + QUESTIONS[i])])
               for i, seed in enumerate(images)]  # fmt: skip
    batch = model.prompt_batch(samples)
    assert not bool(batch.attention_mask.bool().all())  # left padding in the batch
    embeds, mask = model.prefill_inputs(batch)
    shared = shared_prefix(embeds, mask.bool())
    if len(set(images)) == 1:  # the template and the image's 16 tokens
        assert shared >= MIN_SHARED_PREFIX
    else:  # the template only
        assert shared < MIN_SHARED_PREFIX
    ours, state = fast.prefill(batch, room=12)
    theirs, _ = model.prefill(batch)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    params = SamplingParams(max_new_tokens=12)
    got = [c.token_ids for c in fast.generate_batch(batch, params)]
    assert got == [c.token_ids for c in slow.generate_batch(batch, params)]
    alone = [fast.generate_batch(model.prompt_batch([s]), params)[0].token_ids for s in samples]
    assert got == alone


class Ids:  # a random decoder has no vocabulary: text is the ids, space-separated
    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def text_engine():
    torch.manual_seed(1)
    cfg = DecoderConfig(vocab_size=97, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                        intermediate_size=128, max_position_embeddings=256)  # fmt: skip
    lm = DecoderLM(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return Engine(lm, Ids(), eos_token_ids=[], pad_id=0)


def _prompts(prefix_len: int, suffixes: tuple[int, ...], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(1, 97, (prefix_len,), generator=g).tolist()
    return [prefix + torch.randint(1, 97, (n,), generator=g).tolist() for n in suffixes]


def test_text_rows_with_a_common_prefix_match_each_row_alone(text_engine):
    engine, lm = text_engine, text_engine.model
    prompts = _prompts(24, (1, 5, 9), seed=2)
    prefix = prompts[0][:24]
    batch = PromptBatch.left_padded(prompts)
    embeds = lm.embed(batch.input_ids)
    assert shared_prefix(embeds, batch.attention_mask.bool()) == 24
    params = SamplingParams(max_new_tokens=10)
    got = [c.token_ids for c in engine.generate_batch(batch, params)]
    alone = [engine.generate([p], params)[0].token_ids for p in prompts]
    assert got == alone
    # The shortest row keeps a token of its own: a row that is all prefix shares one less.
    batch = PromptBatch.left_padded([prefix, prefix + [5, 6]])
    assert shared_prefix(lm.embed(batch.input_ids), batch.attention_mask.bool()) == 23
    got = [c.token_ids for c in engine.generate_batch(batch, params)]
    assert got == [engine.generate([p], params)[0].token_ids for p in (prefix, prefix + [5, 6])]


def test_a_shared_prefix_batch_joins_and_leaves_a_running_one(text_engine):
    """Continuous batching: its window (prefix, then padding in the middle) is merged with a
    running batch's and rows leave one by one; every row keeps its tokens from alone."""
    engine = text_engine
    running = _prompts(0, (30,), seed=3)
    joining = _prompts(20, (2, 7, 4), seed=4)
    lengths = (14, 6, 11, 9)
    params = [SamplingParams(max_new_tokens=n) for n in lengths]
    alone = [engine.generate([p], [q])[0].token_ids
             for p, q in zip(running + joining, params, strict=True)]  # fmt: skip
    batch = ContinuousBatch(engine, stream=False)
    requests = batch.add(PromptBatch.left_padded(running), params[:1])
    for step in range(max(lengths) + 4):
        if step == 3:
            requests += batch.add(PromptBatch.left_padded(joining), params[1:])
        batch.step()
        if not batch.busy:
            break
    assert [r.completion.token_ids for r in requests] == alone


def test_equal_sums_are_not_taken_for_equal_tokens():
    embeds = torch.zeros(2, 20, 8)
    embeds[:, :, 0] = 1.0
    embeds[1, :, :2] = torch.tensor([0.0, 1.0])  # same sum per token, other features
    real = torch.ones(2, 20, dtype=torch.bool)
    assert shared_prefix(embeds, real) == 0
    embeds[1] = embeds[0]
    embeds[1, 10:] += 1.0
    assert shared_prefix(embeds, real) == 10


def test_the_vision_tower_runs_each_distinct_image_once():
    torch.manual_seed(0)
    vit = ViT(ViTConfig.preset("tiny")).eval()
    a, b, c = torch.randn(3, 3, 32, 32).unbind()
    pixels = torch.stack([a, b, a, c, b])
    unique, inverse = distinct_images(pixels)
    assert inverse.tolist() == [0, 1, 0, 2, 1]
    assert torch.equal(unique, torch.stack([a, b, c]))
    seen = []
    vit.embeddings.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    with torch.inference_mode():
        out = vit(pixels, feature_layer=-2)
    assert seen == [3]
    with torch.no_grad():
        for row in range(5):
            one = vit(pixels[row : row + 1], feature_layer=-2)
            torch.testing.assert_close(out.features[row], one.features[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(out.pooled[row], one.pooled[0], atol=1e-5, rtol=0)
    with torch.enable_grad():  # training sees every row
        seen.clear()
        vit(pixels, feature_layer=-2)
    assert seen == [5]
