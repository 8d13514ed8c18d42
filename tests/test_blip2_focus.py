"""BLIP-2 with the region connector's question focus (`question_focus`): the focus's slots and
pointer around BLIP-2's decoder, the Q-Former's soft prompt at `<image>`, through training,
every generation path, checkpoints, and the export that refuses it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from visto.checkpoint import load, save_checkpoint
from visto.connectors.projector import ProjectorConfig
from visto.connectors.regions import COLOUR_NAMES, SHAPE_NAMES, SIZE_NAMES
from visto.data.processor import Processor
from visto.data.sample import Sample, Turn
from visto.data.tokenizer import Tokenizer, train_tokenizer, with_focus_token
from visto.errors import UserError
from visto.infer.engine import Engine
from visto.infer.sampling import SamplingParams
from visto.models.blip2 import Blip2Config, export_hf
from visto.models.common import focus_with_copies
from visto.pretrained import build_model

TEXTS = [f"Which colour does the {s} have? Read the text. a {c} {s}, {z}" for s in SHAPE_NAMES
         for c in COLOUR_NAMES for z in SIZE_NAMES]  # fmt: skip
READ = 4  # read slots after the box's 4
FOCUS = ProjectorConfig(kind="regions", slots=3, focus=True, read_slots=READ, pointer=True, named=True,
                        box_nms=0.3, count_width=0.35, object_order="left_to_right", copy_answers=True,
                        copy_json=True, copy_verdicts=True, question_pointer=True)  # fmt: skip

# What the stand-in reader reads off an image, by its colour (as tests/test_pointer.py: the
# reader itself is a trained model, tests/test_text_reader.py).
TRAIN_READS = {(200, 30, 30): "red star", (30, 30, 200): "blue circle", (30, 200, 30): "red",
               (200, 200, 30): "yellow triangle star", (30, 200, 200): "star circle square"}  # fmt: skip
TEST_READS = {(200, 30, 200): "green square", (120, 120, 120): "purple diamond"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return with_focus_token(Tokenizer.load(path / "tokenizer.json"))


def config(tokenizer, qformer_input: str = "regions", **overrides) -> Blip2Config:
    base = Blip2Config.preset("tiny")
    vocab = tokenizer.vocab_size
    fields = dict(
        losses=["lm"], qformer_input=qformer_input, region_slots=FOCUS.slots, question_focus=FOCUS,
        processor=replace(base.processor, focus_tokens=4 + READ, vocab_size=vocab),
        decoder=replace(base.decoder, vocab_size=vocab), qformer=replace(base.qformer, vocab_size=vocab),
    )  # fmt: skip
    return Blip2Config.preset("tiny", **{**fields, **overrides})


def sample(colour, answer: str | None = None, question: str = "Read the text.") -> Sample:
    turns = [Turn("user", f"<image>\n{question}")] + ([Turn("assistant", answer)] if answer else [])
    return Sample("s", [Image.new("RGB", (32, 32), colour)], turns)


def reading_blip2(tokenizer, qformer_input: str = "regions", seed: int = 0):
    model = build_model("blip2", config(tokenizer, qformer_input), seed=seed)
    model.processor = Processor(model.config.processor, tokenizer)
    stand_in_reader(model)
    return model


def stand_in_reader(model) -> None:
    reads = {**TRAIN_READS, **TEST_READS}
    means = {c: model.collate([sample(c, "x")])["pixel_values"][0].mean((1, 2)) for c in reads}

    def read(pixels):  # the phrase of the colour whose processed pixels the image has
        return [[(reads[min(means, key=lambda c: float((means[c] - image.mean((1, 2))).abs().sum()))],
                  [0, 0, 4, 4])] for image in pixels]  # fmt: skip

    model.regions.reader.forward = read


def test_the_focus_adds_the_connectors_focus_and_the_prompt_stays_the_qformers(tokenizer):
    model = reading_blip2(tokenizer).eval()
    tok = tokenizer
    batch = model.collate([sample((200, 30, 30), "red star"), sample((30, 30, 200), "blue circle")])
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    assert ((ids == tok.focus_id).sum(1) == 4 + READ).all()  # the processor's <focus> slots
    with torch.no_grad():
        embeds, copies = model.embed_with_copies(ids, pixels, batch["image_sample_index"])
        # By hand: the region connector's objects; the Q-Former over their tokens at <image>;
        # what the focus adds everywhere else.
        embed = model.language_model.model.embed_tokens
        features = model.vision_model(pixels, feature_layer=-1, pooled=False).features
        objects = model.regions.objects(features, embed)
        queries = model.qformer(model.regions.visual_tokens(objects, embed)).queries
        added, want_copies = focus_with_copies(model.regions, objects, embed, ids, pixels, batch["image_sample_index"])
        plain = model.language_model.embed(ids)
    is_image = ids == tok.image_id
    torch.testing.assert_close(embeds[is_image], model.language_projection(queries).flatten(0, 1))
    torch.testing.assert_close(embeds[~is_image], (plain + added)[~is_image])
    assert torch.equal(copies.ids, want_copies.ids)
    # the focus writes into the slots and the <|assistant|> tokens (the read tokens, the box)
    slots = ids == tok.focus_id
    assert added[slots].abs().sum() > 0
    # and nothing outside the slots and the answer starts
    outside = ~(slots | (ids == tok.role_ids["assistant"]))
    assert added[outside].abs().sum() == 0


def test_trains_copies_what_was_read_in_every_generation_path_and_round_trips(tokenizer, tmp_path):
    """Trained on images whose read words are the answers, BLIP-2 with the focus answers a
    third image's words, never an answer in training: it copies through the focus's slots, so
    its answers follow the image. The engine's fast path, its generic path (the model's own
    prefill/decode_step) and a full forward per token agree; a reloaded checkpoint gives the
    same logits and answers."""
    torch.manual_seed(0)
    model = reading_blip2(tokenizer)
    batch = model.collate([sample(c, text) for c, text in TRAIN_READS.items()])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(60):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert model.pointer.keys.grad is not None and out["token_acc"] == 1.0
    assert model.qformer.query_tokens.grad is not None  # the Q-Former trains beside the focus
    after = model.state_dict()
    assert torch.equal(after["regions.heads.centre.weight"], before["regions.heads.centre.weight"])  # frozen detector
    model.eval()

    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    prompts = model.prompt_batch([sample(c) for c in TEST_READS] + [sample((200, 30, 30))])
    fast = Engine(model, tokenizer).generate_batch(prompts, greedy)
    assert [c.text.strip() for c in fast] == [*TEST_READS.values(), "red star"]
    generic = Engine(model, tokenizer, fast=False).generate_batch(prompts, greedy)
    assert [c.token_ids for c in generic] == [c.token_ids for c in fast]

    # a full forward per generated token (answer_logits: the pointer mixed in) picks the same
    for row, colour in enumerate([*TEST_READS, (200, 30, 30)]):
        prompt = model.prompt_batch([sample(colour)])
        ids = prompt.input_ids  # one row, no padding, ending with <|assistant|>
        start = ids.shape[1] - 1
        for token in fast[row].token_ids:
            x = torch.cat([ids, torch.zeros(1, 1, dtype=torch.long)], 1)  # a dummy: the last real token is scored
            labels = torch.full_like(x, -100)
            labels[0, start + 1 :] = x[0, start + 1 :]
            full = {"input_ids": x, "labels": labels, "attention_mask": torch.ones_like(x),
                    "pixel_values": prompt.pixel_values, "image_sample_index": prompt.image_sample_index}  # fmt: skip
            with torch.no_grad():
                logits = model.answer_logits(full)
            assert int(logits[0, -2].argmax()) == token
            ids = torch.cat([ids, torch.tensor([[token]])], 1)

    # Without the pointer the same weights do not say the unseen words.
    pointer = model.regions.pointer
    model.regions.pointer = None
    blind = Engine(model, tokenizer).generate_batch(prompts, greedy)
    assert not any(c.text.strip() in TEST_READS.values() for c in blind)
    model.regions.pointer = pointer

    save_checkpoint(model, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt")
    assert again.config.question_focus == FOCUS and again.pointer is not None
    again.regions.reader.forward = model.regions.reader.forward
    with torch.no_grad():
        torch.testing.assert_close(again.answer_logits(batch), model.answer_logits(batch))
    assert [c.token_ids for c in Engine(again, tokenizer).generate_batch(prompts, greedy)] == [
        c.token_ids for c in fast
    ]


@pytest.mark.parametrize("qformer_input", ["patches", "regions"])
def test_a_step_through_visto_trains_loop_and_the_prompt_follows_the_image(tokenizer, qformer_input):
    from visto.train.loop import train_step

    model = reading_blip2(tokenizer, qformer_input, seed=1)
    batch = model.collate([sample(c, text) for c, text in TRAIN_READS.items()])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = model.qformer.query_tokens.detach().clone()
    metrics = train_step(model, opt, [batch], 1.0, torch.device("cpu"))
    assert not torch.equal(model.qformer.query_tokens, before)
    assert torch.isfinite(torch.tensor(float(metrics["loss"])))
    model.eval()
    with torch.no_grad():  # another image, the same question: other logits at the answer
        a = model.collate([sample((200, 30, 30), "red")])
        b = model.collate([sample((30, 30, 200), "red")])
        assert not torch.allclose(model.answer_logits(a), model.answer_logits(b))


def test_config_refusals_and_the_export_refuses_it(tokenizer, tmp_path):
    with pytest.raises(UserError, match="kind 'regions' and focus true"):
        config(tokenizer, question_focus=ProjectorConfig(kind="regions"))
    with pytest.raises(UserError, match="set one"):
        config(tokenizer, instruct=True)
    with pytest.raises(UserError, match="must agree"):
        config(tokenizer, region_slots=5)
    with pytest.raises(UserError, match="focus_tokens must be 8"):
        build_model("blip2", config(tokenizer, processor=replace(config(tokenizer).processor, focus_tokens=3)))
    model = reading_blip2(tokenizer)
    with pytest.raises(UserError, match="question focus"):
        export_hf(model, tmp_path / "hf")


def test_compare_blip2_shares_compare_llavas_focus_and_its_sizes_agree():
    """compare's BLIP-2 has the question focus compare's LLaVA has (the same region connector
    settings), the Q-Former reading its object tokens, and a processor that fits both."""
    from visto.config import from_dict
    from visto.train.recipe import load_recipe

    blip2 = load_recipe("compare-blip2").model.config
    llava = load_recipe("compare-llava").model.config
    assert blip2["question_focus"] == llava["projector"]
    assert blip2["processor"]["focus_tokens"] == llava["processor"]["focus_tokens"]
    cfg = from_dict(Blip2Config, blip2)
    cfg.check_sizes()
    assert cfg.qformer_input == "regions" and cfg.question_focus.pointer
