"""Flamingo's question_focus: the region connector's question focus and pointer beside the
resampler and the gated cross-attention (models/flamingo.py, models/common.py)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from focus_family_support import FOCUS, READS, world_words_tokenizer
from visto.checkpoint import load, save_checkpoint
from visto.connectors.projector import ProjectorConfig
from visto.data.processor import Processor, ProcessorConfig
from visto.data.sample import Sample, Turn
from visto.errors import UserError
from visto.infer.engine import Engine
from visto.infer.sampling import SamplingParams
from visto.models.flamingo import FlamingoConfig, FocusedImages, idefics_export_problems
from visto.nn.language import DecoderConfig
from visto.pretrained import build_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return world_words_tokenizer(tmp_path_factory.mktemp("tok"))


def config(tokenizer, **overrides) -> FlamingoConfig:
    processor = ProcessorConfig(image_size=32, image_tokens=1, image_delimiters=False,
                                vocab_size=tokenizer.vocab_size, loc_bins=32, focus_tokens=8)  # fmt: skip
    settings = dict(question_focus=ProjectorConfig(**FOCUS), processor=processor,
                    decoder=DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size))  # fmt: skip
    return FlamingoConfig.preset("tiny", **{**settings, **overrides})


def focused(tokenizer, seed: int = 0, **overrides):
    model = build_model("flamingo", config(tokenizer, **overrides), seed=seed)
    model.processor = Processor(model.config.processor, tokenizer)
    with torch.no_grad():  # a detector that finds objects, a focus that is not zero
        model.question_focus.heads.centre.bias.fill_(5.0)
        model.question_focus.focus.out.normal_(std=0.1)
    stand_in_reader(model)
    return model


def stand_in_reader(model) -> None:
    means = {c: model.collate([sample(c, "x")])["pixel_values"][0].mean((1, 2)) for c in READS}

    def read(pixels):  # the phrase of the colour whose processed pixels the image has
        return [[(READS[min(means, key=lambda c: float((means[c] - image.mean((1, 2))).abs().sum()))],
                  [0, 0, 4, 4])] for image in pixels]  # fmt: skip

    model.question_focus.reader.forward = read


def sample(colour, answer: str | None = None, question: str = "Read the text.") -> Sample:
    turns = [Turn("user", f"<image>\n{question}")] + ([Turn("assistant", answer)] if answer else [])
    return Sample("s", [Image.new("RGB", (32, 32), colour)], turns)


def trained(tokenizer, steps: int = 40, **overrides):
    """Trained on reading: each image's answer is what its reader read (a copy)."""
    torch.manual_seed(0)
    model = focused(tokenizer, **overrides)
    batch = model.collate([sample(c, text) for c, text in READS.items()])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return model.eval(), batch, out


def test_config_and_export_refuse_what_they_cannot_hold(tokenizer):
    with pytest.raises(UserError, match="set processor.focus_tokens to 8"):
        FlamingoConfig.preset("tiny", question_focus=ProjectorConfig(**FOCUS))
    with pytest.raises(UserError, match="only question_focus fills <focus> slots"):
        FlamingoConfig.preset("tiny", processor=ProcessorConfig(image_size=32, image_tokens=1, focus_tokens=8))
    with pytest.raises(UserError, match="resampler_input 'objects' reads question_focus"):
        FlamingoConfig.preset("tiny", resampler_input="objects")
    with pytest.raises(UserError, match="kind 'regions' with focus true"):
        config(tokenizer, question_focus=ProjectorConfig(kind="regions"))
    model = focused(tokenizer)
    assert any("question focus" in why for why in idefics_export_problems(model))
    from visto.models.flamingo import export_idefics

    with pytest.raises(UserError, match="question focus"):
        export_idefics(model, "/nonexistent/never-written")


@pytest.mark.parametrize("reads", ["patches", "objects"])
def test_a_training_step_reaches_the_focus_the_pointer_and_the_gated_blocks(tokenizer, reads):
    model = focused(tokenizer, resampler_input=reads)
    with torch.no_grad():  # open gates, as after training: the resampler gets a gradient too
        for block in model.gated_cross_attn_layers:
            block.alpha_cross_attn.fill_(0.5)
    batch = model.collate([sample(c, text) for c, text in READS.items()])
    out = model(batch)
    out["loss"].backward()
    connector = model.question_focus
    assert connector.focus.out.grad.abs().sum() > 0
    assert connector.pointer.keys.grad.abs().sum() > 0
    assert model.perceiver_resampler.latents.grad.abs().sum() > 0
    assert all(b.alpha_cross_attn.grad is not None for b in model.gated_cross_attn_layers)
    assert connector.heads.centre.bias.grad is None  # the detector is frozen (no gradient)
    # the loss on the scored positions equals the loss on every position's logits
    from visto.losses import answer_loss

    with torch.no_grad():
        torch.testing.assert_close(answer_loss(model.logits(batch), batch["labels"])["loss"], out["loss"])


def test_answers_change_with_the_image_and_decoding_equals_a_full_forward(tokenizer):
    """After training on reading, the answers are each image's words (they change with the
    image, one never in training too: a copy), and greedy decoding by prefill + decode_step
    (the engine's fused fast path and the model's own) equals a full forward's argmax."""
    model, _, out = trained(tokenizer)
    assert out["token_acc"] == 1.0
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    colours = list(READS)
    prompts = model.prompt_batch([sample(c) for c in colours])
    fast = Engine(model, model.processor.tokenizer).generate_batch(prompts, greedy)
    assert [c.text.strip() for c in fast] == list(READS.values())
    assert model.step_weights() is not None  # the gated blocks ran fused
    generic = Engine(model, model.processor.tokenizer, fast=False).generate_batch(prompts, greedy)
    assert [c.token_ids for c in generic] == [c.token_ids for c in fast]
    for row, completion in enumerate(fast):  # a full forward over prompt + answer so far
        answer = sample(colours[row], model.processor.tokenizer.decode(completion.token_ids))
        batch = model.collate([answer])
        with torch.no_grad():
            logits = model.logits(batch)
        ids = batch["input_ids"][0]
        start = int((ids == model.question_focus.focus.assistant_id).nonzero()[-1])
        predicted = logits[0, start : start + len(completion.token_ids)].argmax(-1).tolist()
        assert predicted == completion.token_ids
    # The image swapped behind the gated blocks alone changes the logits too (gates opened:
    # 40 steps of copying leave them near 0): both paths see.
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:
            block.alpha_cross_attn.fill_(1.0)
    prompt = model.prompt_batch([sample(colours[0])])
    logits, _ = model.prefill(prompt)
    original = model.visual_tokens
    try:
        other = model.prompt_batch([sample(colours[1])]).pixel_values
        model.visual_tokens = lambda pixels, states=None: original(other)
        swapped, _ = model.prefill(prompt)
    finally:
        del model.visual_tokens
    assert (logits - swapped).abs().max() > 1e-3


@pytest.mark.parametrize("reads", ["patches", "objects"])
def test_fast_path_logits_match_the_models_own_decoding_with_rows_joining(tokenizer, reads):
    """The engine's runner (fused gated steps, the pointer on its output logits) and the
    model's own prefill/decode_step agree within 1e-5 at every step; rows keep their slots
    when selected and merged."""
    from visto.infer.runner import DecoderRunner

    model, _, _ = trained(tokenizer, steps=10, resampler_input=reads)
    if reads == "objects":  # the resampler reads the object tokens, at the decoder's width
        assert model.perceiver_resampler.dim == model.config.decoder.hidden_size
    with torch.no_grad():  # gates open: the images' keys and values count in every step
        for block in model.gated_cross_attn_layers:
            block.alpha_cross_attn.fill_(1.0)
    prompts = model.prompt_batch([sample(c) for c in READS])
    runner = DecoderRunner.for_model(model)
    fast, fast_state = runner.prefill(prompts)
    own, own_state = model.prefill(prompts)
    assert isinstance(own_state.images, FocusedImages) and isinstance(fast_state.context, FocusedImages)
    torch.testing.assert_close(fast, own, rtol=1e-5, atol=1e-5)
    for _ in range(4):
        next_ids = own.argmax(-1)
        fast, fast_state = runner.decode_step(next_ids, fast_state)
        own, own_state = model.decode_step(next_ids, own_state)
        torch.testing.assert_close(fast, own, rtol=1e-5, atol=1e-5)
    rows = torch.tensor([2, 0])
    kept = own_state.select(rows).images
    merged = FocusedImages.merge([kept, own_state.images.select(torch.tensor([1]))])
    assert merged.slots.ids.shape[0] == 3 and merged.images.visual.shape[0] == 3
    assert torch.equal(merged.slots.ids[0], own_state.images.slots.ids[2])


def test_checkpoint_round_trip_keeps_the_focus_and_its_answers(tokenizer, tmp_path):
    model, batch, _ = trained(tokenizer, steps=10)
    save_checkpoint(model, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt").eval()
    assert again.config.question_focus is not None and again.pointer is not None
    again.question_focus.reader.forward = model.question_focus.reader.forward
    with torch.no_grad():
        torch.testing.assert_close(again(batch)["loss"], model(batch)["loss"], rtol=1e-6, atol=1e-6)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    prompts = model.prompt_batch([sample(c) for c in READS])
    assert [c.token_ids for c in Engine(again, again.processor.tokenizer).generate_batch(prompts, greedy)] == [
        c.token_ids for c in Engine(model, model.processor.tokenizer).generate_batch(prompts, greedy)
    ]


def test_the_detector_comes_from_the_vision_init_checkpoint(tokenizer, tmp_path):
    """As LLaVA's regions projector: the tower and its dense heads (and reader) from a visto
    LLaVA checkpoint; a plain Flamingo has no question_focus keys."""
    from visto.models.llava import LlavaConfig

    processor = ProcessorConfig(image_size=32, image_tokens=3, image_delimiters=False,
                                vocab_size=tokenizer.vocab_size, loc_bins=32, focus_tokens=8)  # fmt: skip
    llava_cfg = LlavaConfig.preset("tiny", projector=ProjectorConfig(kind="regions", slots=3, focus=True, read_slots=4),
                                   processor=processor,
                                   decoder=DecoderConfig.preset("tiny", vocab_size=tokenizer.vocab_size))  # fmt: skip
    llava = build_model("llava", llava_cfg, seed=1)
    llava.processor = Processor(llava_cfg.processor, tokenizer)
    with torch.no_grad():
        llava.multi_modal_projector.heads.centre.bias.fill_(3.0)
    save_checkpoint(llava, tmp_path / "tower")
    model = build_model("flamingo", config(tokenizer, vision_init=str(tmp_path / "tower")), seed=0)
    for k, v in llava.multi_modal_projector.heads.state_dict().items():
        assert torch.equal(model.question_focus.heads.state_dict()[k], v), k
    for k, v in llava.multi_modal_projector.reader.state_dict().items():
        assert torch.equal(model.question_focus.reader.state_dict()[k], v), k
    plain = build_model("flamingo", FlamingoConfig.preset("tiny"), seed=0)
    assert plain.question_focus is None and not any(k.startswith("question_focus") for k in plain.state_dict())


def test_generation_scores_with_each_answers_question_as_training_does(tokenizer, monkeypatch):
    """question_pointer (FOCUS has it): the pointer's question term reaches generation. With
    a large W_u, prefill's next-token log-probabilities at each prompt's `<|assistant|>` equal
    a full forward's there; with the question dropped from the prompt rows' slots they do not
    (so the equality is the question term's)."""
    from visto.models import common

    model = focused(tokenizer)
    pointer = model.question_focus.pointer
    with torch.no_grad():
        pointer.question.normal_(std=1.0)
        pointer.keys.normal_(std=1.0)
    questions = ["Read the text.", "Which colour does the star have?", "Which shape is red?"]
    prompts = model.prompt_batch([sample(c, question=q) for c, q in zip(READS, questions, strict=True)])
    batch = model.collate([sample(c, "x", q) for c, q in zip(READS, questions, strict=True)])
    opens = (batch["input_ids"] == model.question_focus.focus.assistant_id).nonzero(as_tuple=True)
    with torch.no_grad():
        full = model.logits(batch)[opens].log_softmax(-1)
        prefilled, state = model.prefill(prompts)
        assert state.images.slots.question is not None
        torch.testing.assert_close(prefilled.log_softmax(-1), full, rtol=1e-4, atol=1e-4)
        slots_of = common.last_answer_slots

        def without_question(*args):
            slots = slots_of(*args)
            slots.question = None
            return slots

        monkeypatch.setattr(common, "last_answer_slots", without_question)
        dropped, _ = model.prefill(prompts)
    assert (dropped.log_softmax(-1) - full).abs().max() > 1e-2
