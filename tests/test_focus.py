"""Question focus (connectors/focus.py): each answer gets the objects its question names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visto.connectors.focus import Objects, QuestionFocus, per_row
from visto.connectors.projector import ProjectorConfig
from visto.connectors.regions import COLOUR_NAMES, SHAPE_NAMES, SIZE_NAMES, RegionConnector
from visto.data.tokenizer import Tokenizer, train_tokenizer
from visto.models.llava import LlavaConfig
from visto.pretrained import build_model

TEXTS = [f"Which colour does the {s} have? Which shape is {c}? a {c} {s}, {z}" for s in SHAPE_NAMES
         for c in COLOUR_NAMES for z in SIZE_NAMES]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir / "tokenizer.json")


def prompt(tok: Tokenizer, *questions: str) -> torch.Tensor:
    """<s> then, per question, <|user|> question <|end|> <|assistant|> "x" <|end|>."""
    ids = [tok.bos_id]
    for q in questions:
        ids += [tok.role_ids["user"], tok.image_id, *tok.encode(q), tok.end_id, tok.role_ids["assistant"]]
        ids += [*tok.encode("x"), tok.end_id]
    return torch.tensor([ids])


def world_objects(tok: Tokenizer, embed: nn.Embedding, named: list[tuple[str, str]]) -> Objects:
    """One image whose objects are (colour, shape) pairs, tagged as the regions connector tags them."""
    c = RegionConnector(8, embed.weight.shape[1], slots=len(named))
    c.set_vocabulary(tok)
    tags = torch.stack([c.word_table(embed, "colour")[COLOUR_NAMES.index(col)]
                        + c.word_table(embed, "shape")[SHAPE_NAMES.index(shp)] for col, shp in named])  # fmt: skip
    tokens = torch.randn(1, len(named), embed.weight.shape[1])
    return Objects(tokens, tags[None], torch.zeros(1, len(named), 4, embed.weight.shape[1]),
                   torch.zeros(1, len(named), 4), torch.ones(1, len(named), dtype=torch.bool))  # fmt: skip


def untrained_focus(tokenizer) -> tuple[QuestionFocus, nn.Embedding, Objects]:
    """A fresh focus at the decoder's width, embeddings N(0, 1), and four objects: a red
    circle, a blue star, a green square and a yellow triangle, in that order."""
    torch.manual_seed(0)
    embed = nn.Embedding(400, 256)
    focus = QuestionFocus(256)
    focus.set_vocabulary(tokenizer)
    objects = world_objects(tokenizer, embed, [("red", "circle"), ("blue", "star"), ("green", "square"),
                                               ("yellow", "triangle")])  # fmt: skip
    return focus, embed, objects


def test_question_is_the_mean_embedding_of_its_own_user_turn(tokenizer):
    focus = QuestionFocus(16)
    focus.set_vocabulary(tokenizer)
    embed = nn.Embedding(400, 16)
    ids = prompt(tokenizer, "Which colour does the star have?", "Which shape is red?")
    rows, cols, question = focus.questions(ids, embed)
    assert cols.tolist() == (ids[0] == tokenizer.role_ids["assistant"]).nonzero().flatten().tolist()
    for k, q in enumerate(["Which colour does the star have?", "Which shape is red?"]):
        want = embed(torch.tensor(tokenizer.encode(q))).mean(0)  # image, roles and <|end|> left out
        assert torch.allclose(question[k], want, atol=1e-6)


def test_the_untrained_focus_already_picks_the_named_object(tokenizer):
    """W_q = W_k = identity and tags in the decoder's word space: "star" in the question
    matches the star's tag from the first step (what removes the binding plateau)."""
    focus, embed, objects = untrained_focus(tokenizer)
    for question, target in [("Which colour does the star have?", 1), ("Which shape is green?", 2),
                             ("Which colour does the circle have?", 0)]:  # fmt: skip
        _, _, q = focus.questions(prompt(tokenizer, question), embed)
        weight = focus.attention(q, objects.tags, objects.present)[0]
        assert weight.argmax().item() == target and weight[target] > 0.5, (question, weight)


def test_focus_is_added_at_answer_starts_only_and_starts_at_zero(tokenizer):
    embed = nn.Embedding(400, 32)
    focus = QuestionFocus(32)
    focus.set_vocabulary(tokenizer)
    objects = world_objects(tokenizer, embed, [("red", "circle"), ("blue", "star")])
    ids = prompt(tokenizer, "Which colour does the star have?", "Which shape is red?")
    assert focus(ids, embed, objects, torch.tensor([0])).abs().sum() == 0  # W_out starts at zero
    with torch.no_grad():
        focus.out.normal_()
    added = focus(ids, embed, objects, torch.tensor([0]))[0]
    at = (ids[0] == tokenizer.role_ids["assistant"])
    assert added[at].abs().sum(-1).min() > 0 and added[~at].abs().sum() == 0
    # Each answer reads its own question: the two answer starts get different objects.
    assert not torch.allclose(added[at][0], added[at][1])


def test_images_go_to_their_rows(tokenizer):
    d = 8
    objects = Objects(torch.arange(3.0)[:, None, None].expand(3, 2, d), torch.zeros(3, 2, d),
                      torch.zeros(3, 2, 4, d), torch.zeros(3, 2, 4), torch.ones(3, 2, dtype=torch.bool))  # fmt: skip
    rowed = per_row(objects, torch.tensor([0, 2, 2]), rows=3)
    tokens, present = rowed.tokens, rowed.present
    assert tokens.shape == (3, 4, d)
    assert tokens[0, :2].eq(0).all() and not present[0, 2:].any()  # row 0: one image, then padding
    assert not present[1].any()  # row 1: no image
    assert tokens[2, :2].eq(1).all() and tokens[2, 2:].eq(2).all() and present[2].all()


def focus_llava(tokenizer_dir):
    config = LlavaConfig.preset(
        "tiny", tokenizer_dir=str(tokenizer_dir), projector=ProjectorConfig(kind="regions", slots=5, focus=True)
    )
    config.processor.image_tokens = 5
    model = build_model("llava", config, seed=0)
    with torch.no_grad():  # a detector that finds objects, and a focus that is not zero
        model.multi_modal_projector.heads.centre.bias.fill_(5.0)
        model.multi_modal_projector.focus.out.normal_(std=0.1)
    return model


def test_llava_with_focus_trains_saves_loads_and_generates_as_it_trains(tokenizer_dir, tmp_path):
    from PIL import Image

    from visto.checkpoint import load, save_checkpoint
    from visto.data.sample import Sample, Turn
    from visto.models.common import prompt_embeds

    model = focus_llava(tokenizer_dir)
    sample = Sample("s", [Image.new("RGB", (40, 40), (200, 30, 30))],
                    [Turn("user", "<image>\nWhich colour does the star have?"), Turn("assistant", "red")])  # fmt: skip
    batch = model.collate([sample, sample])
    out = model(batch)
    out["loss"].backward()
    focus = model.multi_modal_projector.focus
    assert focus.out.grad.abs().sum() > 0  # what the focus hands on learns ...
    for fixed in (focus.query, focus.key, focus.log_scale, focus.threshold, focus.side_words):
        assert fixed.grad is None  # ... the scores that pick the objects do not
    save_checkpoint(model, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt")
    assert again.config.projector.focus
    model.eval()
    again.eval()
    with torch.no_grad():
        assert torch.allclose(again(batch)["loss"], model(batch)["loss"], atol=1e-5)
        # The generation prompt ends with <|assistant|>: it gets the same focus as in training.
        train_embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["image_sample_index"])
        prompt = model.prompt_batch([sample])
        embeds, _ = prompt_embeds(model, prompt)
    n = embeds.shape[1]
    assert torch.allclose(embeds[0], train_embeds[0, :n], atol=1e-5)


def test_packed_exchanges_each_get_the_focus_of_their_own_question(tokenizer_dir):
    from PIL import Image

    from visto.data.sample import Sample, Turn

    model = focus_llava(tokenizer_dir).eval()
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    turns = [Turn("user", "<image>\nWhich colour does the star have?"), Turn("assistant", "red"),
             Turn("user", "Which shape is red?"), Turn("assistant", "star")]  # fmt: skip
    packed = model.collate([Sample("p", [image], turns, independent_turns=True)])
    alone = model.collate([Sample("a", [image], [Turn("user", "<image>\nWhich shape is red?"), turns[3]])])
    with torch.no_grad():
        e_packed = model.embed_inputs(packed["input_ids"], packed["pixel_values"], packed["image_sample_index"],
                                      packed["segment_ids"])
        e_alone = model.embed_inputs(alone["input_ids"], alone["pixel_values"], alone["image_sample_index"])
    assistant = model.processor.tokenizer.role_ids["assistant"]
    last_packed = (packed["input_ids"][0] == assistant).nonzero().max()
    last_alone = (alone["input_ids"][0] == assistant).nonzero().max()
    assert torch.allclose(e_packed[0, last_packed], e_alone[0, last_alone], atol=1e-5)


def test_the_processor_puts_focus_slots_before_every_answer(tokenizer):
    from visto.data.processor import Processor, ProcessorConfig
    from visto.data.sample import Sample, Turn
    from visto.data.tokenizer import with_focus_token
    from visto.errors import UserError

    with pytest.raises(UserError, match="no <focus> token"):
        Processor(ProcessorConfig(loc_bins=32, focus_tokens=4), tokenizer)
    tok = with_focus_token(tokenizer)
    assert tok.focus_id == tokenizer.vocab_size and with_focus_token(tok) is tok  # no id moves
    assert tok.encode("Which colour does the star have?") == tokenizer.encode("Which colour does the star have?")
    processor = Processor(ProcessorConfig(loc_bins=32, focus_tokens=4, image_delimiters=False), tok)
    sample = Sample("s", [], [Turn("user", "Which shape is red?"), Turn("assistant", "star"),
                              Turn("user", "Which shape is blue?"), Turn("assistant", "circle")])  # fmt: skip
    enc = processor.encode(sample, train=True)
    ids = enc.input_ids.tolist()
    answers = [i for i, t in enumerate(ids) if t == tok.role_ids["assistant"]]
    assert len(answers) == 2
    for a in answers:
        assert ids[a - 4 : a] == [tok.focus_id] * 4 and ids[a - 5] == tok.end_id
        assert (enc.labels[a - 4 : a] == -100).all()  # slots are inputs, never targets
    prompt = processor.encode(Sample("p", [], sample.turns[:1]), train=False).input_ids.tolist()
    assert prompt[-5:] == [tok.focus_id] * 4 + [tok.role_ids["assistant"]]
    assert processor.decode(ids).count("focus") == 0  # a special token: never in decoded text


def test_focus_slots_hold_the_named_objects_box_words_and_the_answer_start_the_object(tokenizer):
    from visto.data.tokenizer import with_focus_token

    tok = with_focus_token(tokenizer)
    torch.manual_seed(0)
    embed = nn.Embedding(tok.vocab_size, 64)
    focus = QuestionFocus(64)
    focus.set_vocabulary(tok, slots=4)
    objects = world_objects(tok, embed, [("red", "circle"), ("blue", "star")])
    box_words = torch.randn(1, 2, 4, 64)
    objects = objects._replace(box_words=box_words)
    ids = [tok.bos_id, tok.role_ids["user"], tok.image_id, *tok.encode("Which colour does the star have?"),
           tok.end_id, *[tok.focus_id] * 4, tok.role_ids["assistant"]]  # fmt: skip
    ids = torch.tensor([ids])
    with torch.no_grad():
        focus.out.copy_(torch.eye(64))
    added = focus(ids, embed, objects, torch.tensor([0]))[0]
    _, _, q = focus.questions(ids, embed)
    weight = focus.attention(q, objects.tags, objects.present)[0]  # mostly on the star (slot 1)
    slots = (ids[0] == tok.focus_id).nonzero().flatten()
    assert torch.allclose(added[slots], torch.einsum("m,mjd->jd", weight, box_words[0]), atol=1e-5)
    answer = ids[0] == tok.role_ids["assistant"]
    assert torch.allclose(added[answer][0], weight @ objects.tokens[0], atol=1e-5)  # + maps that start at 0
    # The scores take no gradient, from the box path or any other.
    added.sum().backward()
    assert focus.query.grad is None and focus.key.grad is None
    with pytest.raises(ValueError, match="must follow 4 <focus> ids"):
        focus(ids[:, [i for i in range(ids.shape[1]) if i != int(slots[0])]], embed, objects, torch.tensor([0]))


def test_side_heads_start_on_the_first_and_the_last_object_a_relation_names(tokenizer):
    """The main head splits a two-object question between its objects; the side heads, pooled
    toward the question's first and last words, pick one each from the first step."""
    focus, embed, objects = untrained_focus(tokenizer)
    ids = prompt(tokenizer, "Is the star to the left of the square?")
    _, _, _, side = focus.head_questions(ids, embed)
    first = focus.attention(side[0], objects.tags, objects.present)[0]
    last = focus.attention(side[1], objects.tags, objects.present)[0]
    assert first.argmax().item() == 1 and last.argmax().item() == 2, (first, last)


def test_the_best_match_tells_a_full_match_from_a_partial_one(tokenizer):
    torch.manual_seed(0)
    embed = nn.Embedding(400, 256)
    focus = QuestionFocus(256)
    focus.set_vocabulary(tokenizer)
    objects = world_objects(tokenizer, embed, [("red", "square"), ("blue", "circle")])
    _, _, there = focus.questions(prompt(tokenizer, "Is there a red square?"), embed)
    _, _, not_there = focus.questions(prompt(tokenizer, "Is there a red circle?"), embed)
    with torch.no_grad():
        best = [float((focus.scores(q, objects.tags) / focus.log_scale.exp()).max()) for q in (there, not_there)]
    assert best[0] > best[1] + 0.02, best  # small at the start; training sharpens W_q, W_k


def test_a_row_with_two_images_focuses_over_both_images_objects(tokenizer):
    """Two images in one row are one pool of objects: the same as one image holding all of
    them (box slots included: this crashed when the box path mapped rows on its own)."""
    from visto.data.tokenizer import with_focus_token

    tok = with_focus_token(tokenizer)
    torch.manual_seed(0)
    embed = nn.Embedding(tok.vocab_size, 32)
    focus = QuestionFocus(32)
    focus.set_vocabulary(tok, slots=4)
    with torch.no_grad():
        focus.out.normal_()
    a = world_objects(tok, embed, [("red", "circle"), ("blue", "star")])
    b = world_objects(tok, embed, [("green", "square")])
    a, b = (o._replace(box_words=torch.randn(1, o.present.shape[1], 4, 32)) for o in (a, b))
    both = Objects(*(None if x is None else torch.cat([x, y], 1) for x, y in zip(a, b, strict=True)))
    pad = lambda o: Objects(*(None if f is None else torch.cat([f, f[:, :1].new_zeros(f[:, :1].shape)], 1) for f in o))  # noqa: E731
    two = Objects(*(None if x is None else torch.cat([x, y], 0) for x, y in zip(pad(b), a, strict=True)))  # 2 slots per image
    ids = torch.tensor([[tok.bos_id, tok.role_ids["user"], tok.image_id, tok.image_id,
                         *tok.encode("Which shape is green?"), tok.end_id, *[tok.focus_id] * 4,
                         tok.role_ids["assistant"]]])  # fmt: skip
    one_image = focus(ids, embed, both, torch.tensor([0]))
    two_images = focus(ids, embed, two, torch.tensor([0, 0]))
    assert torch.allclose(one_image, two_images, atol=1e-5)
    assert two_images.abs().sum() > 0


def reading_connector(tok, lines: list[str], read_slots: int = 4):
    """A focus connector at width 64 whose OCR reader reads `lines` off any image, counting
    how many images it was asked to read (the reader itself is tested in test_text_reader)."""
    connector = RegionConnector(8, 64, slots=2, focus=True, read_slots=read_slots)
    connector.set_vocabulary(tok, focus_slots=4 + read_slots)
    calls = []

    def read(pixels):
        calls.append(pixels.shape[0])
        return [[(text, [0, 0, 8, 8]) for text in lines] for _ in range(pixels.shape[0])]

    connector.reader.forward = read
    return connector, calls


def test_read_slots_hold_the_read_text_after_the_box(tokenizer):
    from visto.data.tokenizer import with_focus_token

    tok = with_focus_token(tokenizer)
    torch.manual_seed(0)
    embed = nn.Embedding(tok.vocab_size, 64)
    connector, calls = reading_connector(tok, ["STAR", "42"], read_slots=9)
    pixels = torch.randn(2, 3, 16, 16)
    words, filled, ids = connector.read_words(pixels, embed)
    # Per image three variants: everything (joined as the world's OCR answer writes it), only
    # the words, only the numbers (what "What number is written?" copies).
    for variant, text in enumerate(["STAR 42", "STAR", "42"]):
        pieces = tok.encode(text)
        assert filled[0, variant].tolist() == [True] * len(pieces) + [False] * (9 - len(pieces))
        assert ids[0, variant, : len(pieces)].tolist() == pieces
    pieces = tok.encode("STAR 42")
    assert torch.equal(words[0, 0, : len(pieces)], embed(torch.tensor(pieces)))
    # Read once per image: the frozen reader is not asked again for the same pixels ...
    connector.read_words(pixels, embed)
    assert calls == [2]
    # ... unless its weights change (a checkpoint loaded into it).
    with torch.no_grad():
        next(connector.reader.parameters()).add_(1.0)
    connector.read_words(pixels[:1], embed)
    assert calls == [2, 1]

    focus = connector.focus
    objects = world_objects(tok, embed, [("red", "circle"), ("blue", "star")])
    ids = [tok.bos_id, tok.role_ids["user"], tok.image_id, *tok.encode("Read the text."),
           tok.end_id, *[tok.focus_id] * 13, tok.role_ids["assistant"]]  # fmt: skip
    ids = torch.tensor([ids, ids])
    both = Objects(*(None if f is None else torch.cat([f, f]) for f in objects))
    added = focus(ids, embed, both, torch.tensor([0, 1]), read=(words, filled))
    slots = (ids[0] == tok.focus_id).nonzero().flatten()
    read_at = slots[4:]
    assert torch.equal(added[0, read_at[: len(pieces)]], words[0, 0, : len(pieces)])
    assert added[0, read_at[len(pieces) :]].eq(0).all()  # nothing read: the <focus> token alone
    with pytest.raises(ValueError, match="pass `read`"):
        focus(ids, embed, both, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="writes 13"):
        connector.set_vocabulary(tok, focus_slots=4)


def test_llava_with_read_slots_puts_the_read_tokens_in_training_and_generation_prompts(tokenizer_dir):
    """End to end through LLaVA: training and generation prompts carry the read tokens in the
    slots after the box, and a config whose processor lacks them is refused."""
    from PIL import Image

    from visto.data.sample import Sample, Turn
    from visto.data.tokenizer import with_focus_token
    from visto.errors import UserError
    from visto.models.common import prompt_embeds

    tok = with_focus_token(Tokenizer.load(tokenizer_dir / "tokenizer.json"))
    projector = ProjectorConfig(kind="regions", slots=5, focus=True, read_slots=3)
    with pytest.raises(UserError, match="focus_tokens to 7"):
        build_model("llava", LlavaConfig.preset("tiny", projector=projector), seed=0)
    config = LlavaConfig.preset("tiny", projector=projector)
    config.processor.image_tokens, config.processor.focus_tokens = 5, 7
    config.processor.vocab_size = config.decoder.vocab_size = tok.vocab_size
    from visto.data.processor import Processor

    model = build_model("llava", config, seed=0)
    model.processor = Processor(config.processor, tok)
    model.multi_modal_projector.reader.forward = lambda px: [[("star", [0, 0, 4, 4])]] * px.shape[0]
    sample = Sample("s", [Image.new("RGB", (40, 40), (9, 9, 9))],
                    [Turn("user", "<image>\nRead the text."), Turn("assistant", "star")])  # fmt: skip
    batch = model.collate([sample])
    model(batch)["loss"].backward()
    with torch.no_grad():
        train = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["image_sample_index"])
        prompt, _ = prompt_embeds(model, model.prompt_batch([sample]))
    embed = model.language_model.model.embed_tokens
    first_read = int((batch["input_ids"][0] == tok.focus_id).nonzero()[4])
    star = tok.encode("star")
    assert len(star) < 3
    expect = embed(torch.tensor([tok.focus_id] * 3)) + torch.cat(
        [embed(torch.tensor(star)), torch.zeros(3 - len(star), embed.weight.shape[1])])
    assert torch.allclose(train[0, first_read : first_read + 3], expect, atol=1e-5)
    assert torch.allclose(prompt[0], train[0, : prompt.shape[1]], atol=1e-5)


def test_relation_offset_and_object_count_reach_the_answer_start(tokenizer):
    """The side heads' objects' offset (left of / above) and the number of objects enter the
    answer start through their own maps, zero at first; a checkpoint without those maps loads."""
    focus, embed, objects = untrained_focus(tokenizer)
    objects = objects._replace(boxes=torch.tensor([[[0.0, 0.0, 0.2, 0.2], [0.8, 0.8, 1.0, 1.0],
                                                   [0.4, 0.0, 0.6, 0.2], [0.0, 0.8, 0.2, 1.0]]]))  # fmt: skip
    ids = prompt(tokenizer, "Is the red circle to the left of the blue star?")
    answer = ids[0] == tokenizer.role_ids["assistant"]
    assert focus(ids, embed, objects, torch.tensor([0]))[0, answer].abs().sum() == 0  # all maps at zero
    with torch.no_grad():
        focus.relation.copy_(torch.eye(4, 256))
    added = focus(ids, embed, objects, torch.tensor([0]))[0, answer][0]
    assert added[0] < -0.3 and added[1] < -0.3  # the circle (top left) is left of and above the star
    with torch.no_grad():
        focus.relation.zero_()
        focus.objects.copy_(torch.eye(10, 256))
    added = focus(ids, embed, objects, torch.tensor([0]))[0, answer][0]
    assert int(added[:10].argmax()) == 4  # four objects
    old = {k: v for k, v in focus.state_dict().items() if k not in ("relation", "objects")}
    fresh = QuestionFocus(256)
    fresh.load_state_dict(old)
    assert fresh.relation.abs().sum() == 0 and fresh.objects.abs().sum() == 0


def test_counting_scores_tags_with_the_shapes_plural(tokenizer):
    """'How many stars?' names the star by a token of its own: the count path scores tags that
    hold the plural too, so the stars outscore the rest although the question never says 'star'."""
    torch.manual_seed(0)
    embed = nn.Embedding(400, 256)
    c = RegionConnector(8, 256, slots=3)
    c.set_vocabulary(tokenizer)
    star = SHAPE_NAMES.index("star")
    assert torch.allclose(c.word_table(embed, "plural")[star], embed(torch.tensor(tokenizer.encode(" stars"))).mean(0))
    focus = QuestionFocus(256)
    focus.set_vocabulary(tokenizer)
    objects = world_objects(tokenizer, embed, [("red", "star"), ("blue", "circle"), ("green", "star")])
    plural = torch.stack([c.word_table(embed, "plural")[SHAPE_NAMES.index(s)] for s in ("star", "circle", "star")])
    objects = objects._replace(count_tags=objects.tags + plural[None])
    _, _, q = focus.questions(prompt(tokenizer, "How many stars are there?"), embed)
    by_count_tags = focus.scores(q, objects.count_tags)[0]
    assert by_count_tags[0] > by_count_tags[1] and by_count_tags[2] > by_count_tags[1]
    with torch.no_grad():
        focus.count.copy_(torch.eye(10, 256))
    ids = prompt(tokenizer, "How many stars are there?")
    answer = ids[0] == tokenizer.role_ids["assistant"]
    with_plural = focus(ids, embed, objects, torch.tensor([0]))[0, answer][0, :10]
    without = focus(ids, embed, objects._replace(count_tags=None), torch.tensor([0]))[0, answer][0, :10]
    assert not torch.allclose(with_plural, without)  # the count path reads count_tags


def test_the_scores_read_a_fixed_copy_of_the_embeddings_taken_on_first_use(tokenizer_dir, tmp_path):
    """The decoder's embeddings train; the table the focus scores with does not, and it is
    saved with the model (a checkpoint without one takes it on first use)."""
    from PIL import Image

    from visto.checkpoint import load, save_checkpoint
    from visto.data.sample import Sample, Turn

    model = focus_llava(tokenizer_dir)
    focus = model.multi_modal_projector.focus
    assert focus.lookup.numel() == 0  # not taken yet
    sample = Sample("s", [Image.new("RGB", (40, 40), (200, 30, 30))],
                    [Turn("user", "<image>\nWhich colour does the star have?"), Turn("assistant", "red")])  # fmt: skip
    batch = model.collate([sample])
    embed = model.language_model.model.embed_tokens
    model(batch)["loss"].backward()
    taken = focus.lookup.clone()
    assert torch.equal(taken, embed.weight.detach())
    with torch.no_grad():
        embed.weight.mul_(3.0).add_(1.0)  # training moves the decoder's embeddings ...
    _, _, at, real = focus.spans(batch["input_ids"])
    words = batch["input_ids"][0, at[0][real[0]]]
    _, _, q = focus.questions(batch["input_ids"], embed)
    assert torch.equal(focus.lookup, taken)  # ... not the focus's table, which the question reads
    assert torch.allclose(q[0], taken[words].mean(0), atol=1e-6)
    assert not torch.allclose(q[0], embed.weight[words].mean(0), atol=1e-3)
    save_checkpoint(model, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt")
    assert torch.equal(again.multi_modal_projector.focus.lookup, taken)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("focus.lookup")}
    fresh = focus_llava(tokenizer_dir)
    fresh.load_state_dict(state)  # an older checkpoint: no table, taken on first use
    assert fresh.multi_modal_projector.focus.lookup.numel() == 0


def tool_prompt(tok: Tokenizer, question: str, result: str, then: str | None = None) -> torch.Tensor:
    """<s> <|user|> image question <|end|> <|assistant|> a call <|end|> <|user|> the tool's
    result <|end|> <|assistant|> "x" <|end|>, and a plain question `then` after it."""
    from visto.data.tool_calls import tool_call_text, tool_result_turn

    ids = [tok.bos_id, tok.role_ids["user"], tok.image_id, *tok.encode(question), tok.end_id,
           tok.role_ids["assistant"], *tok.encode(tool_call_text("ocr", {"detail": "text"})), tok.end_id,
           tok.role_ids["user"], *tok.encode(tool_result_turn(result).content), tok.end_id,
           tok.role_ids["assistant"], *tok.encode("x"), tok.end_id]  # fmt: skip
    if then is not None:
        ids += [tok.role_ids["user"], *tok.encode(then), tok.end_id, tok.role_ids["assistant"]]
    return torch.tensor([ids])


def test_the_answer_after_a_tool_result_has_the_question_before_the_call(tokenizer):
    # issue 17: the answer after the OCR tool's result read the result turn as its question,
    # so a "what number is written?" picked the first text it read instead of the number
    focus = QuestionFocus(16)
    focus.set_vocabulary(tokenizer)
    embed = nn.Embedding(400, 16)
    question, then = "Which colour does the star have?", "Which shape is red?"
    ids = tool_prompt(tokenizer, question, '{"text":"a red circle"}', then)
    rows, cols, q = focus.questions(ids, embed)
    assert len(cols) == 3  # the call, the answer after the result, the next question's answer
    want = embed(torch.tensor(tokenizer.encode(question))).mean(0)
    assert torch.allclose(q[0], want, atol=1e-6)
    assert torch.allclose(q[1], want, atol=1e-6)  # the question, not the result
    # a plain question after a tool exchange is its own, as before
    assert torch.allclose(q[2], embed(torch.tensor(tokenizer.encode(then))).mean(0), atol=1e-6)
    # the question's words only: neither the call nor the result
    _, _, at, real = focus.spans(ids, None)
    assert at[1][real[1]].tolist() == at[0][real[0]].tolist()


def test_the_answer_after_a_tool_result_in_a_packed_exchange_has_its_own_question(tokenizer_dir):
    from PIL import Image

    from visto.data.sample import Sample, Turn
    from visto.data.tool_calls import assistant_turn, tool_result_turn

    model = focus_llava(tokenizer_dir).eval()
    focus = model.multi_modal_projector.focus
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    call = assistant_turn(None, [("ocr", {"detail": "text"})])
    result = tool_result_turn('{"text":"a blue star"}')
    first, second = "Which colour does the star have?", "Which shape is red?"
    turns = [Turn("user", f"<image>\n{first}"), Turn("assistant", "red"),
             Turn("user", second), call, result, Turn("assistant", "star")]  # fmt: skip
    packed = model.collate([Sample("p", [image], turns, independent_turns=True)])
    ids = packed["input_ids"]
    rows, cols, at, real = focus.spans(ids, packed["segment_ids"])
    tok = model.processor.tokenizer
    words = [tok.decode(ids[0, at[k][real[k]]].tolist()).strip() for k in range(len(cols))]
    # the call and the answer after the result: the second exchange's question, not the result
    assert words == [first, second, second]


def test_without_tool_result_ids_the_question_is_the_last_user_turn(tokenizer):
    # BLIP-2 calls answer_questions without them: its questions are as they were
    from visto.connectors.focus import answer_questions, tool_result_prefix

    focus = QuestionFocus(16)
    focus.set_vocabulary(tokenizer)
    assert focus.tool_result_ids == tool_result_prefix(tokenizer) and focus.tool_result_ids
    ids = tool_prompt(tokenizer, "Which colour does the star have?", '{"text":"a red circle"}')
    args = (ids, focus.user_id, focus.assistant_id, focus.focus_id, focus.first_text_id)
    _, _, at, real = answer_questions(*args)
    result = tokenizer.encode('<tool_response>{"text":"a red circle"}</tool_response>')
    assert ids[0, at[1][real[1]]].tolist() == result
    plain = prompt(tokenizer, "Which colour does the star have?", "Which shape is red?")
    old = answer_questions(plain, *args[1:])
    new = answer_questions(plain, *args[1:], tool_result_ids=focus.tool_result_ids, end_id=focus.end_id)
    assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])
    for k in range(len(old[1])):  # the same question tokens (the padding may be narrower)
        assert torch.equal(old[2][k][old[3][k]], new[2][k][new[3][k]])


def test_instruction_lines_in_front_of_a_question_are_not_its_question(tokenizer_dir):
    # The question is its user turn's last line (newline_ids): instructions on lines in front
    # of it, with attribute words of their own, are not read; a question on one line (the
    # lead "<image>\n" before it) is read as before.
    from PIL import Image

    from visto.data.sample import Sample, Turn

    model = focus_llava(tokenizer_dir).eval()
    focus = model.multi_modal_projector.focus
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    first, second = "Which colour does the star have?", "Which shape is red?"
    lines = "Answer about the blue circle.\nReply briefly.\n\n"
    tok = model.processor.tokenizer

    def questions(turns: list) -> list[str]:
        batch = model.collate([Sample("p", [image], turns, independent_turns=True)])
        rows, cols, at, real = focus.spans(batch["input_ids"], batch["segment_ids"])
        ids = batch["input_ids"]
        return [tok.decode(ids[0, at[k][real[k]]].tolist()).strip() for k in range(len(cols))]

    plain = [Turn("user", f"<image>\n{first}"), Turn("assistant", "red"),
             Turn("user", second), Turn("assistant", "star")]  # fmt: skip
    assert questions(plain) == [first, second]
    assert focus.newline_ids
    told = [Turn("system", "Use the green words.\nBe brief."), Turn("user", f"<image>\n{lines}{first}"),
            Turn("assistant", "red"), Turn("user", lines + second), Turn("assistant", "star")]  # fmt: skip
    assert questions(told) == [first, second]
    # without the last-line rule the instructions were part of the question
    from visto.connectors.focus import answer_questions

    batch = model.collate([Sample("p", [image], told, independent_turns=True)])
    _, _, at, real = answer_questions(batch["input_ids"], focus.user_id, focus.assistant_id, focus.focus_id,
                                      focus.first_text_id, batch["segment_ids"])  # fmt: skip
    assert "blue circle" in tok.decode(batch["input_ids"][0, at[0][real[0]]].tolist())


def test_instructions_after_a_question_are_not_its_question(tokenizer_dir):
    # A turn that asks with a "?" has as its question the line of its last "?", up to it:
    # instructions after it, on its line or on lines of their own (with attribute words of
    # their own), are not read; a turn without a "?" keeps its last line.
    from PIL import Image

    from visto.data.sample import Sample, Turn

    model = focus_llava(tokenizer_dir).eval()
    focus = model.multi_modal_projector.focus
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    tok = model.processor.tokenizer
    assert focus.question_ids

    def questions(*texts: str) -> list[str]:
        turns = []
        for k, text in enumerate(texts):
            turns += [Turn("user", ("<image>\n" if k == 0 else "") + text), Turn("assistant", "red")]
        batch = model.collate([Sample("p", [image], turns, independent_turns=True)])
        rows, cols, at, real = focus.spans(batch["input_ids"], batch["segment_ids"])
        ids = batch["input_ids"]
        return [tok.decode(ids[0, at[k][real[k]]].tolist()).strip() for k in range(len(cols))]

    q = "Which colour does the star have?"
    assert questions(q, f"{q} Answer about the blue circle.", f"{q}\nReply about the blue circle.\n\nBe brief.",
                     f"Be brief.\n{q}\nUse the green words.") == [q, q, q, q]  # fmt: skip
    # no "?": the last line, as before
    assert questions("Describe the image.\nUse the green words.") == ["Use the green words."]
