"""BLIP-2's instruction-aware queries (`instruct`) and the Q-Former reading object tokens
(`qformer_input: regions`): where the questions go, what the slots hold, packing, generation,
checkpoints, and the export that refuses them."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from visto.checkpoint import load, save_checkpoint
from visto.connectors.regions import COLOUR_NAMES, SHAPE_NAMES, SIZE_NAMES
from visto.data.sample import Sample, Turn
from visto.data.tokenizer import Tokenizer, train_tokenizer, with_focus_token
from visto.errors import UserError
from visto.models.blip2 import Blip2Config, export_hf, first_image_of_rows, question_spans
from visto.pretrained import build_model

TEXTS = [f"Which colour does the {s} have? a {c} {s}, {z}" for s in SHAPE_NAMES for c in COLOUR_NAMES
         for z in SIZE_NAMES] + ["What is this?", "How many objects are there? 2"]  # fmt: skip
K = 3  # <focus> slots before each answer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok = with_focus_token(train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1))
    tok.save(path / "tokenizer.json")
    return path


def config(tokenizer_dir, instruct: bool = True, **overrides) -> Blip2Config:
    base = Blip2Config.preset("tiny")
    vocab = Tokenizer.load(tokenizer_dir / "tokenizer.json").vocab_size
    return Blip2Config.preset(
        "tiny", tokenizer_dir=str(tokenizer_dir), losses=["lm"], instruct=instruct,
        processor=replace(base.processor, focus_tokens=K if instruct else 0, vocab_size=vocab),
        decoder=replace(base.decoder, vocab_size=vocab), qformer=replace(base.qformer, vocab_size=vocab),
        **overrides,
    )  # fmt: skip


def picture(colour=(220, 30, 30)) -> Image.Image:
    image = Image.new("RGB", (32, 32), (250, 250, 250))
    image.paste(Image.new("RGB", (12, 12), colour), (10, 10))
    return image


def sample(image, second="How many objects are there?") -> Sample:
    turns = [Turn("user", "<image>\nWhich colour does the star have?"), Turn("assistant", "red"),
             Turn("user", second), Turn("assistant", "2")]  # fmt: skip
    return Sample("s", [image], turns)


def slots_of(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(the input embeddings, the positions of the <focus> slots (answers, K))."""
    tok = model.processor.tokenizer
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds = model.embed_inputs(ids, batch["pixel_values"], batch["image_sample_index"],
                                    batch.get("segment_ids"))  # fmt: skip
    _, cols = (ids == tok.role_ids["assistant"]).nonzero(as_tuple=True)
    return embeds, cols[:, None] - K + torch.arange(K)


def test_each_answers_slots_hold_its_questions_queries(tokenizer_dir):
    model = build_model("blip2", config(tokenizer_dir), seed=0).eval()
    tok = model.processor.tokenizer
    batch = model.collate([sample(picture())])
    ids = batch["input_ids"]
    embeds, at = slots_of(model, batch)
    assert at.shape == (2, K) and (ids[0, at] == tok.focus_id).all()
    # By hand: the Q-Former over the image with the question's tokens beside the queries
    # (bidirectional), its first K query outputs through the language projection.
    with torch.no_grad():
        image = model.image_embeds(batch["pixel_values"])
        for answer, question in enumerate(["\nWhich colour does the star have?", "How many objects are there?"]):
            q = torch.tensor([tok.encode(question)])
            out = model.qformer(image, q, torch.ones_like(q), mode="bidirectional")
            want = model.language_projection(out.queries[:, :K])[0]
            torch.testing.assert_close(embeds[0, at[answer]], want)
        # the question-free visual prompt at <image> is BLIP-2's, unchanged
        prompt = model.image_features(batch["pixel_values"])[0]
        torch.testing.assert_close(embeds[0, ids[0] == tok.image_id], prompt)

    # Another second question changes the second answer's slots only; another image all of them.
    other, other_at = slots_of(model, model.collate([sample(picture(), "What is this?")]))
    # equal up to float rounding: the batches differ in length, so MKL may block the sums apart
    torch.testing.assert_close(other[0, other_at[0]], embeds[0, at[0]], atol=1e-6, rtol=0)
    assert not torch.allclose(other[0, other_at[1]], embeds[0, at[1]], atol=1e-6, rtol=0)
    recoloured, _ = slots_of(model, model.collate([sample(picture((30, 40, 220)))]))
    assert not torch.allclose(recoloured[0, at[0]], embeds[0, at[0]], atol=1e-6, rtol=0)

    # Without instruct the same seed's model has no slots: nothing before the answers reads
    # the question (the mechanism, not the weights, puts it there).
    plain = build_model("blip2", config(tokenizer_dir, instruct=False), seed=0).eval()
    plain_ids = plain.collate([sample(picture())])["input_ids"]
    assert not (plain_ids == tok.focus_id).any() and plain_ids.shape[1] == ids.shape[1] - 2 * K


def test_packed_exchanges_read_their_own_question():
    """With shared-prefix packing (segment_ids), a later exchange's question starts at its
    segment, not at the first exchange's <|user|> in the prefix."""
    from visto.models.blip2 import QuestionIds

    ids = QuestionIds(user=5, assistant=6, focus=7, first_text=10)
    #        bos user img  q1  q1 focus asst a1  | q2  q2  q2 focus asst a2
    row = [1, 5, 3, 11, 12, 7, 6, 20, 13, 14, 15, 7, 6, 21]
    seg = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    rows, cols, question, real = question_spans(torch.tensor([row]), ids, torch.tensor([seg]))
    assert cols.tolist() == [6, 12]
    assert [q[r].tolist() for q, r in zip(question, real, strict=True)] == [[11, 12], [13, 14, 15]]
    _, _, unpacked, real = question_spans(torch.tensor([row]), ids)  # no segments: since <|user|>
    assert unpacked[1][real[1]].tolist() == [11, 12, 20, 13, 14, 15]
    assert first_image_of_rows(torch.tensor([0, 2, 2]), 4, 3).tolist() == [0, -1, 1, -1]


def test_training_step_packed_and_generation(tokenizer_dir):
    """A step on packed independent turns trains the Q-Former's text side (the questions reach
    the loss through it); the engine's tokens equal a full re-forward's argmax, prompts ending
    in the slots and <|assistant|>."""
    from visto.infer.engine import Engine
    from visto.infer.sampling import SamplingParams

    model = build_model("blip2", config(tokenizer_dir), seed=1).train()
    data = [replace(sample(picture(c)), independent_turns=True) for c in ((220, 30, 30), (30, 200, 40))]
    batch = model.collate(data)
    assert batch.get("segment_ids") is not None
    model(batch)["loss"].backward()
    grad = model.qformer.embeddings.word_embeddings.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad()
    model.eval()
    prompts = [Sample("p", [picture()], [Turn("user", "<image>\nWhich colour does the star have?")])]
    engine = Engine(model, model.processor.tokenizer)
    out = engine.generate_batch(model.prompt_batch(prompts), SamplingParams(max_new_tokens=3))[0]
    single = model.prompt_batch(prompts)
    ids = single.input_ids
    assert (ids[0, -K - 1 : -1] == model.processor.tokenizer.focus_id).all()
    with torch.no_grad():
        for token in out.token_ids:
            logits, _ = model.language_model(
                inputs_embeds=model.embed_inputs(ids, single.pixel_values, single.image_sample_index))
            assert int(logits[0, -1].argmax()) == token
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)


def test_settings_checked_saved_and_refused_by_the_export(tokenizer_dir, tmp_path):
    with pytest.raises(UserError, match="focus_tokens must be 1 to 8"):
        Blip2Config.preset("tiny", instruct=True).check_sizes()
    base = Blip2Config.preset("tiny")
    with pytest.raises(UserError, match="only instruct fills"):
        replace(base, processor=replace(base.processor, focus_tokens=2)).check_sizes()
    with pytest.raises(UserError, match="qformer_input"):
        Blip2Config.preset("tiny", qformer_input="pixels")
    # instruct adds no parameter: a model without it loads the same keys
    model = build_model("blip2", config(tokenizer_dir), seed=2)
    plain = build_model("blip2", config(tokenizer_dir, instruct=False), seed=2)
    assert set(model.state_dict()) == set(plain.state_dict())
    save_checkpoint(model, tmp_path / "ck")
    reloaded = load(tmp_path / "ck")
    assert reloaded.config.instruct and reloaded.config.processor.focus_tokens == K
    batch = model.collate([sample(picture())])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(batch)["loss"], model.eval()(batch)["loss"])
    with pytest.raises(UserError, match="instruction-aware"):
        export_hf(model, tmp_path / "hf")


def test_qformer_reads_object_tokens_of_the_towers_detector(tokenizer_dir, tmp_path):
    """qformer_input "regions": the Q-Former cross-attends the region connector's object tokens
    (decoder width), whose dense heads come from the `vision_init` tower's checkpoint (as
    compare's LLaVA takes them); its keys are new ones, absent without the option."""
    from visto.connectors.projector import ProjectorConfig
    from visto.models.llava import LlavaConfig

    llava = LlavaConfig.preset("tiny", tokenizer_dir=str(tokenizer_dir),
                               projector=ProjectorConfig(kind="regions", slots=5))  # fmt: skip
    llava.processor.image_tokens = 5
    llava.processor.vocab_size = llava.decoder.vocab_size = Tokenizer.load(tokenizer_dir / "tokenizer.json").vocab_size
    donor = build_model("llava", llava, seed=1)
    save_checkpoint(donor, tmp_path / "vision")
    cfg = config(tokenizer_dir, qformer_input="regions", region_slots=4, vision_init=str(tmp_path / "vision"))
    model = build_model("blip2", replace(cfg, vision=llava.vision), seed=3).eval()
    for name, value in donor.multi_modal_projector.heads.state_dict().items():
        assert torch.equal(model.regions.heads.state_dict()[name], value), name
    batch = model.collate([sample(picture())])
    image = model.qformer_image(batch["pixel_values"])
    assert image.shape == (1, 4, model.config.decoder.hidden_size)
    seen = {}
    original = model.qformer.forward

    def spy(image_features=None, *args, **kwargs):
        seen.setdefault("widths", []).append(image_features.shape[1:])
        return original(image_features, *args, **kwargs)

    model.qformer.forward = spy
    with torch.no_grad():
        model(batch)
    assert seen["widths"] and all(w == image.shape[1:] for w in seen["widths"])
    plain = build_model("blip2", config(tokenizer_dir), seed=3)
    assert {k for k in model.state_dict() if k not in plain.state_dict()} == {
        k for k in model.state_dict() if k.startswith("regions.")}
    with pytest.raises(UserError, match="Q-Former reads 'regions'"):
        export_hf(model, tmp_path / "hf")


def test_prompt_words_mix_the_decoders_word_embeddings(tokenizer_dir, tmp_path):
    """prompt_words: each prompt vector is language_projection(q) + softmax(word_head(q)) @ E,
    in the <image> ids and in the instruct slots alike; a word head that picks one word puts
    that word's embedding into the prompt; the option round-trips and the export refuses it."""
    model = build_model("blip2", config(tokenizer_dir, prompt_words=True), seed=4).eval()
    plain = build_model("blip2", config(tokenizer_dir), seed=4)
    assert set(model.state_dict()) - set(plain.state_dict()) == {"word_head.weight", "word_head.bias"}
    E = model.language_model.model.embed_tokens.weight
    red = model.processor.tokenizer.encode(" red")[0]
    with torch.no_grad():  # a word head certain of " red"
        model.word_head.bias.fill_(-1e4)
        model.word_head.bias[red] = 0.0
    batch = model.collate([sample(picture())])
    embeds, at = slots_of(model, batch)
    with torch.no_grad():
        queries = model.query_outputs(batch["pixel_values"])
        expected = model.language_projection(queries[0]) + E[red]
        torch.testing.assert_close(model.image_features(batch["pixel_values"])[0], expected)
        slot = embeds[0, at[0, -1]] - E[red]
        # by hand: the first answer's instruct pass, its last slot's query through the projection
        rows, cols, question, real = question_spans(batch["input_ids"], model._question_ids, None)
        image = model.qformer_image(batch["pixel_values"])
        last = model.qformer(image[[0]], question[:1], real[:1].long(), mode="bidirectional").queries[0, K - 1]
        torch.testing.assert_close(slot, model.language_projection(last))
    # the slot's continuous part is language_projection of an instruct query output: not E
    assert slot.abs().sum() > 0
    with torch.no_grad():  # back to the zero start: the mean word, and gradients reach the head
        model.word_head.bias.zero_()
    model.train()
    model(batch)["loss"].backward()
    assert model.word_head.weight.grad is not None and model.word_head.weight.grad.abs().sum() > 0
    save_checkpoint(model, tmp_path / "ck")
    assert load(tmp_path / "ck").config.prompt_words
    with pytest.raises(UserError, match="word mixes"):
        export_hf(model, tmp_path / "hf")


def test_instruct_assistant_adds_the_last_slots_word_mix_to_the_answers_assistant_token(tokenizer_dir):
    with pytest.raises(UserError, match="set instruct too"):
        config(tokenizer_dir, instruct=False, instruct_assistant=True)
    on = build_model("blip2", config(tokenizer_dir, instruct_assistant=True, prompt_words=True), seed=5).eval()
    with torch.no_grad():  # a word head that is not uniform
        on.word_head.weight.normal_(std=1.0)
    off = build_model("blip2", config(tokenizer_dir, prompt_words=True), seed=5).eval()
    off.load_state_dict(on.state_dict())
    batch = on.collate([sample(picture())])
    with_, at = slots_of(on, batch)
    without, _ = slots_of(off, batch)
    assistant = at[:, -1] + 1
    assert (batch["input_ids"][0, assistant] == on.processor.tokenizer.role_ids["assistant"]).all()
    with torch.no_grad():  # by hand: each answer's instruct pass, its last slot's query -> word mix
        image = on.qformer_image(batch["pixel_values"])
        rows, cols, question, real = question_spans(batch["input_ids"], on._question_ids, None)
        queries = on.qformer(image[[0, 0]], question, real.long(), mode="bidirectional").queries
        mix = on.word_head(queries[:, K - 1]).softmax(-1) @ on.language_model.model.embed_tokens.weight
    torch.testing.assert_close(with_[0, assistant], without[0, assistant] + mix)
    rest = torch.ones(with_.shape[1], dtype=torch.bool)
    rest[assistant] = False
    assert torch.equal(with_[0, rest], without[0, rest])
