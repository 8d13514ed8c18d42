"""The guard that a trained generative model looks at its image.

"The loss halves" passes for a model that answers from the question alone. Here a tiny LLaVA
is trained for a few seconds on a task only the image can answer (the colour of a picture
that is one colour all over), and then:
- its answers change when the image does (one question, four colours, four answers);
- the evaluation's blind twin (each image swapped for another, `visto.eval.generative`)
  scores far below the seeing figure.
The negative control proves the guard can fail: the same model with its projector's output
zeroed (the decoder gets no visual information) gives one answer for every image, and its
blind figure equals its seeing figure.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from visto.data.sample import Sample, Turn
from visto.data.tokenizer import train_tokenizer
from visto.eval.generative import evaluate_generative
from visto.models import build_model
from visto.models.llava import Llava, LlavaConfig
from visto.tasks.runner import make_generate

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
}
QUESTION = "What colour is this picture?"
STEPS, BATCH, LR = 50, 16, 3e-3  # 40 steps reach 1.0 here; 25 only 0.6


def picture(colour: str, rng: random.Random) -> Image.Image:
    """A 32 px picture of one colour all over, its shade jittered so no two are the same."""
    rgb = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    return Image.new("RGB", (32, 32), rgb)


def colour_samples(n: int, seed: int) -> list[Sample]:
    """`n` pictures with the question and its answer; truth as the world's VQA items carry it."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        colour = rng.choice(list(COLOURS))
        turns = [Turn("user", f"<image>\n{QUESTION}"), Turn("assistant", colour)]
        truth = {"task": "vqa", "qtype": "colour", "image_id": f"{seed}-{i}"}
        samples.append(Sample(f"{seed}-{i}", [picture(colour, rng)], turns, truth=truth))
    return samples


def train_tiny_llava(tokenizer_dir) -> Llava:
    """A tiny LLaVA trained on the colour pictures: STEPS AdamW steps of BATCH, one thread."""
    torch.manual_seed(0)
    model = build_model(
        "llava", LlavaConfig.preset("tiny", tokenizer_dir=str(tokenizer_dir)), seed=0
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    data = colour_samples(STEPS * BATCH, seed=0)
    model.train()
    for step in range(STEPS):
        loss = model(model.collate(data[step * BATCH : (step + 1) * BATCH]))["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def answers_follow_the_image(model: Llava) -> bool:
    """The guard: one question about four pictures of four colours gets four answers."""
    rng = random.Random(7)
    prompts = [
        Sample(c, [picture(c, rng)], [Turn("user", f"<image>\n{QUESTION}")]) for c in COLOURS
    ]
    answers = make_generate(model, constrain_json=False, max_new_tokens=3)(prompts)
    return len(set(answers)) == len(COLOURS)


@contextmanager
def projector_zeroed(model: Llava) -> Iterator[None]:
    """The model with no visual information: every visual token is the zero vector."""
    hook = model.multi_modal_projector.register_forward_hook(
        lambda _m, _i, out: torch.zeros_like(out)
    )
    try:
        yield
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Llava:
    path = tmp_path_factory.mktemp("tok")
    texts = [QUESTION, *COLOURS] * 3
    train_tokenizer(texts, vocab_size=400, loc_bins=32, min_frequency=1).save(
        path / "tokenizer.json"
    )
    return train_tiny_llava(path)


def seeing_and_blind(model: Llava) -> dict[str, float]:
    metrics, _ = evaluate_generative(
        make_generate(model, constrain_json=False, max_new_tokens=3), colour_samples(48, seed=1),
        batch_size=16, blind="swap", seed=0,
    )  # fmt: skip
    return metrics


def test_a_model_trained_on_an_image_only_task_looks_at_the_image(trained):
    assert answers_follow_the_image(trained)
    metrics = seeing_and_blind(trained)
    # Four colours: the blind twin is right only where the swapped-in picture has the same
    # colour (about a quarter of the time); the seeing model nearly always.
    assert metrics["vqa.overall"] >= 0.9, metrics
    assert metrics["blind.vqa.overall"] <= 0.5, metrics
    assert metrics["vqa.overall"] - metrics["blind.vqa.overall"] >= 0.4, metrics


def test_the_guard_fails_for_the_same_model_with_its_projector_zeroed(trained):
    with projector_zeroed(trained):
        assert not answers_follow_the_image(trained)
        metrics = seeing_and_blind(trained)
    # Nothing reaches the decoder from the image, so hiding the image changes nothing.
    assert metrics["vqa.overall"] == metrics["blind.vqa.overall"] <= 0.5, metrics
    assert answers_follow_the_image(trained)  # the hook is gone again
