"""Named words (connectors/named.py): what a question names, and the objects it names.

Also the detector's box NMS (regions.select with box_nms), which the counts rest on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visto.connectors.focus import (
    COUNT_BINS,
    Objects,
    QuestionFocus,
    read_for_questions,
    soft_histogram,
)
from visto.connectors.named import (
    KINDS,
    RELATIONS,
    VALUES,
    AttributeWords,
    execute,
    match,
    relation_holds,
    split_by_kind,
)
from visto.connectors.projector import ProjectorConfig
from visto.connectors.regions import RegionConnector, overlapped
from visto.data.synth.vocab import COLOURS, SHAPE_PLURALS, SHAPES, SIZES
from visto.data.tokenizer import Tokenizer, train_tokenizer
from visto.errors import UserError

TEXTS = [
    f"Is the {z} {c} {s} to the left of the {s}? How many {SHAPE_PLURALS[s]} are there? How many {c} "
    f"objects are there? Is the {s} to the right of, above or below the {c} {s}? {c} {s} {z}"
    for s in SHAPES for c in COLOURS for z in SIZES
] + ["What word is written in the image? What number is written in the image? What is in the box [700, 10, 900, 200]?",
       "Is the red star on the left to the right of the red star on the right? What colour is the star on the left?"] * 20  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(TEXTS, vocab_size=500, loc_bins=32, min_frequency=1).save(path)
    return Tokenizer.load(path)


def question(tok: Tokenizer, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([tok.encode(text)])
    return ids, torch.ones_like(ids, dtype=torch.float)


def value(kind: str, name: str) -> int:
    """The index of a named value in connectors.named's layout (shape, colour, size)."""
    at = 0
    for k, names in KINDS.items():
        if k == kind:
            return at + names.index(name)
        at += len(names)
    raise KeyError(kind)


def attributes(*objects: tuple[str, str, str]) -> torch.Tensor:
    """(1, M, VALUES) one-hot attributes of (size, colour, shape) objects."""
    out = torch.zeros(1, len(objects), VALUES)
    for m, (size, colour, shape) in enumerate(objects):
        out[0, m, [value("size", size), value("colour", colour), value("shape", shape)]] = 1
    return out


def names(vector: torch.Tensor) -> set[str]:
    flat = [n for names in KINDS.values() for n in names]
    return {flat[i] for i in vector.nonzero().flatten().tolist()}


def test_phrases_name_the_subject_first_and_a_relations_object_last(tokenizer):
    words = AttributeWords(tokenizer)
    named = words.named(*question(tokenizer, "Is the small red circle to the left of the blue star?"))
    assert names(named.first[0]) == {"small", "red", "circle"}
    assert names(named.last[0]) == {"blue", "star"}
    assert named.relation[0].tolist() == [1, 0, 0, 0]  # left
    named = words.named(*question(tokenizer, "How many stars are there?"))  # the plural names the shape
    assert names(named.first[0]) == {"star"} and names(named.last[0]) == {"star"}
    assert named.relation.sum() == 0
    nothing = words.named(*question(tokenizer, "How many objects are there?"))
    assert nothing.first.sum() == 0 and nothing.last.sum() == 0
    ids, real = question(tokenizer, "How many red objects are there?")
    real[0, : len(tokenizer.encode("How many"))] = 0
    real[0, -4:] = 0  # words outside the question (padding) name nothing
    assert names(words.named(ids, real).first[0]) == {"red"}


def test_match_counts_the_objects_that_have_every_named_value(tokenizer):
    words = AttributeWords(tokenizer)
    objects = attributes(("small", "red", "circle"), ("large", "red", "star"), ("small", "blue", "circle"))
    for text, count in [
        ("How many red objects are there?", 2),
        ("How many circles are there?", 2),
        ("Is the small red circle to the left of the star?", 1),
        ("How many stars are there?", 1),
        ("How many objects are there?", 3),  # nothing named: every object
        ("How many green objects are there?", 0),
    ]:
        named = words.named(*question(tokenizer, text))
        assert match(named.first, objects).sum().item() == pytest.approx(count), text
    soft = objects.clone()
    soft[0, 0, value("colour", "red")] = 0.6  # a detector unsure of the first object's colour
    soft[0, 0, value("colour", "blue")] = 0.4
    named = words.named(*question(tokenizer, "How many red objects are there?"))
    assert match(named.first, soft)[0].tolist() == pytest.approx([0.6, 1.0, 0.0])


def test_a_relation_holds_as_the_centres_lie():
    left, right, above, below = torch.eye(4)
    subject_left_and_above = torch.tensor([[-0.3, -0.2]])  # subject centre minus object centre
    assert relation_holds(left[None], subject_left_and_above).item() > 0.99
    assert relation_holds(right[None], subject_left_and_above).item() < 0.01
    assert relation_holds(above[None], subject_left_and_above).item() > 0.95
    assert relation_holds(below[None], subject_left_and_above).item() < 0.05
    assert relation_holds(torch.zeros(1, 4), subject_left_and_above).item() == 0


def focus_with_objects(tokenizer, named: bool) -> tuple[QuestionFocus, nn.Embedding, Objects]:
    """A fresh focus and three objects: a small red circle (top left), a large red star (bottom
    right) and a small blue circle (top right)."""
    torch.manual_seed(0)
    embed = nn.Embedding(tokenizer.vocab_size, 64)
    focus = QuestionFocus(64, named=named)
    focus.set_vocabulary(tokenizer)
    boxes = torch.tensor([[[0.0, 0.0, 0.2, 0.2], [0.7, 0.7, 0.9, 0.9], [0.7, 0.0, 0.9, 0.2]]])
    tokens = torch.randn(1, 3, 64)
    objects = Objects(tokens, torch.randn(1, 3, 64), torch.zeros(1, 3, 4, 64), boxes, torch.ones(1, 3, dtype=torch.bool),
                      attributes=attributes(("small", "red", "circle"), ("large", "red", "star"),
                                            ("small", "blue", "circle")))  # fmt: skip
    return focus, embed, objects


def answer_start(focus, tokenizer, embed, objects, text: str) -> torch.Tensor:
    """What the focus adds at the `<|assistant|>` token of a one-question prompt."""
    ids = [tokenizer.bos_id, tokenizer.role_ids["user"], tokenizer.image_id, *tokenizer.encode(text),
           tokenizer.end_id, tokenizer.role_ids["assistant"]]  # fmt: skip
    return focus(torch.tensor([ids]), embed, objects, torch.tensor([0]))[0, -1]


def test_the_named_focus_counts_and_relates_by_the_named_words(tokenizer):
    focus, embed, objects = focus_with_objects(tokenizer, named=True)
    with torch.no_grad():
        focus.count.copy_(torch.eye(COUNT_BINS, 64))
        focus.relate.copy_(torch.eye(64)[10:12])  # yes -> feature 10, no -> feature 11
    for text, count in [("How many red objects are there?", 2), ("How many circles are there?", 2),
                        ("How many stars are there?", 1), ("How many objects are there?", 3)]:  # fmt: skip
        assert int(answer_start(focus, tokenizer, embed, objects, text)[:COUNT_BINS].argmax()) == count, text
    # The circle on the top left is left of the star (true) and below it (false).
    yes = answer_start(focus, tokenizer, embed, objects, "Is the small red circle to the left of the star?")
    no = answer_start(focus, tokenizer, embed, objects, "Is the small red circle below the star?")
    assert yes[10] > 0.9 and yes[11] < 0.1 and no[10] < 0.1 and no[11] > 0.9
    # Without relation words the relate map adds nothing.
    plain = answer_start(focus, tokenizer, embed, objects, "How many red objects are there?")
    assert plain[10:12].abs().sum() == 0


def test_the_named_focus_puts_its_weight_on_the_named_object(tokenizer):
    focus, embed, objects = focus_with_objects(tokenizer, named=True)
    with torch.no_grad():
        focus.out.copy_(torch.eye(64))
    star = answer_start(focus, tokenizer, embed, objects, "Is the star to the left of the small blue circle?")
    assert torch.allclose(star, objects.tokens[0, 1], atol=1e-5)  # the star alone
    unnamed = QuestionFocus(64)  # the same weights without named words score by cosine
    unnamed.set_vocabulary(tokenizer)
    unnamed.load_state_dict(focus.state_dict())
    cosine = answer_start(unnamed, tokenizer, embed, objects, "Is the star to the left of the small blue circle?")
    assert unnamed.words is None and not torch.allclose(cosine, objects.tokens[0, 1], atol=1e-3)


def test_nms_drops_a_box_found_twice_and_keeps_the_rest():
    boxes = torch.tensor([[[0.1, 0.1, 0.3, 0.3], [0.11, 0.1, 0.31, 0.3], [0.6, 0.6, 0.8, 0.8], [0.6, 0.6, 0.8, 0.8]]])
    present = torch.tensor([[True, True, True, False]])  # sorted by confidence; the last is no candidate
    assert overlapped(boxes, present, 0.3).tolist() == [[False, True, False, True]]
    # A dropped box suppresses nothing after it.
    chain = torch.tensor([[[0.0, 0.0, 0.4, 0.4], [0.2, 0.0, 0.6, 0.4], [0.4, 0.0, 0.8, 0.4]]])
    assert overlapped(chain, torch.ones(1, 3, dtype=torch.bool), 0.3).tolist() == [[False, True, False]]


def test_select_with_box_nms_counts_an_object_seen_from_two_patches_once(tokenizer):
    connector = RegionConnector(8, 16, slots=4, box_nms=0.3)
    connector.set_vocabulary(tokenizer)
    centre = torch.full((1, 16), -5.0)
    centre[0, [2, 3, 9]] = torch.tensor([3.0, 2.0, 4.0])  # patches 2 and 3 see the same object
    box = torch.zeros(1, 16, 4)
    box[0, 2] = torch.tensor([0.1, 0.1, 0.3, 0.3])
    box[0, 3] = torch.tensor([0.12, 0.1, 0.32, 0.3])
    box[0, 9] = torch.tensor([0.6, 0.6, 0.8, 0.8])
    index, present = connector.select({"centre": centre, "box": box})
    assert index[present].tolist() == [2, 9]
    connector.box_nms = 0.0
    assert connector.select({"centre": centre, "box": box})[1].sum() == 3


def test_config_refuses_named_without_focus_and_an_nms_outside_0_1():
    with pytest.raises(UserError, match="named needs focus"):
        ProjectorConfig(kind="regions", named=True)
    with pytest.raises(UserError, match="box_nms"):
        ProjectorConfig(kind="regions", box_nms=1.0)


def test_the_quickstart_builds_its_model_with_named_words_and_nms():
    from visto.quickstart import QuickstartConfig, llava_config

    projector = llava_config(QuickstartConfig(), vocab_size=1024).projector
    assert projector.named and projector.focus and projector.box_nms == 0.3
    off = llava_config(QuickstartConfig(named=False, box_nms=0.0), vocab_size=1024).projector
    assert not off.named and off.box_nms == 0.0


def test_a_tokenizer_without_the_worlds_words_names_nothing(tmp_path):
    path = tmp_path / "tokenizer.json"
    train_tokenizer(["zzz qqq"] * 4, vocab_size=280, loc_bins=4, min_frequency=1).save(path)
    words = AttributeWords(Tokenizer.load(path))
    named = words.named(torch.tensor([[5, 6, 7]]), torch.ones(1, 3))
    assert named.first.sum() == 0 and named.relation.sum() == 0


def test_a_written_box_names_the_object_it_overlaps(tokenizer):
    words = AttributeWords(tokenizer)
    named = words.named(*question(tokenizer, "What is in the box [700, 10, 900, 200]?"))
    assert named.has_box.tolist() == [True] and named.box[0].tolist() == pytest.approx([0.7, 0.01, 0.9, 0.2])
    assert not words.named(*question(tokenizer, "How many stars are there?")).has_box.any()
    focus, embed, objects = focus_with_objects(tokenizer, named=True)
    with torch.no_grad():
        focus.out.copy_(torch.eye(64))
    # The small blue circle's box (top right): its token alone, though the question names no attribute.
    blue = answer_start(focus, tokenizer, embed, objects, "What is in the box [700, 10, 900, 200]?")
    assert torch.allclose(blue, objects.tokens[0, 2], atol=1e-5)
    # A box that overlaps no object keeps the fallback (cosine) weights: a mix, not one object.
    nowhere = answer_start(focus, tokenizer, embed, objects, "What is in the box [300, 400, 500, 600]?")
    assert not any(torch.allclose(nowhere, objects.tokens[0, m], atol=1e-3) for m in range(3))


def test_a_reading_question_that_names_a_kind_reads_only_that_kind(tokenizer):
    assert split_by_kind(["EXIT 15", "PARK"]) == ["EXIT 15 PARK", "EXIT PARK", "15"]
    assert split_by_kind([]) == ["", "", ""]
    words = AttributeWords(tokenizer)
    texts = ["What number is written in the image?", "What word is written in the image?",
             "What is in the box [700, 10, 900, 200]?", "What number is written in the image?"]  # fmt: skip
    encoded = [tokenizer.encode(t) for t in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([e + [0] * (width - len(e)) for e in encoded])
    real = torch.tensor([[1.0] * len(e) + [0.0] * (width - len(e)) for e in encoded])
    named = words.named(ids, real)
    assert named.text_kind.tolist() == [[0, 1], [1, 0], [0, 0], [0, 1]]
    # Per answer: variants everything / words / numbers (ids 1.., 0 = empty); the last image read no number.
    read_ids = torch.tensor([[[1, 2, 0], [1, 0, 0], [2, 0, 0]]] * 3 + [[[1, 0, 0], [1, 0, 0], [0, 0, 0]]])
    chosen = read_for_questions([read_ids.float(), read_ids > 0, read_ids], named)[2]
    assert chosen.tolist() == [[2, 0, 0], [1, 0, 0], [1, 2, 0], [1, 0, 0]]


def test_a_narrow_count_histogram_gives_each_count_its_own_bin():
    wide, narrow = soft_histogram(torch.tensor([2.0, 1.6]), COUNT_BINS, 1.0), soft_histogram(torch.tensor([2.0, 1.6]), COUNT_BINS, 0.35)
    assert wide[0, 1] / wide[0, 2] > 0.3 and narrow[0, 1] / narrow[0, 2] < 0.001
    assert narrow[1].argmax() == 2 and narrow[1, 1] / narrow[1, 2] < 0.2  # 1.6 reads as 2, not between
    with pytest.raises(UserError, match="count_width"):
        ProjectorConfig(kind="regions", focus=True, count_width=0.0)
    from visto.quickstart import QuickstartConfig, llava_config

    assert llava_config(QuickstartConfig(), vocab_size=1024).projector.count_width == 0.35
    projector = llava_config(QuickstartConfig(), vocab_size=1024).projector
    assert projector.copy_answers and projector.object_order == "left_to_right"
    assert not llava_config(QuickstartConfig(pointer=False), vocab_size=1024).projector.copy_answers
    assert ProjectorConfig().count_width == 1.0  # checkpoints from before the setting


def test_left_to_right_order_lists_objects_as_the_json_answer_does(tokenizer):
    connector = RegionConnector(8, 16, slots=4, object_order="left_to_right")
    connector.set_vocabulary(tokenizer)
    centre = torch.full((1, 16), -5.0)
    centre[0, [1, 6, 12]] = torch.tensor([3.0, 2.0, 4.0])
    box = torch.zeros(1, 16, 4)
    box[0, 1] = torch.tensor([0.6, 0.0, 0.8, 0.2])  # top right
    box[0, 6] = torch.tensor([0.1, 0.9, 0.3, 1.0])  # bottom left: left of the others, though lower
    box[0, 12] = torch.tensor([0.6, 0.5, 0.8, 0.7])  # same left edge as patch 1, lower
    index, present = connector.select({"centre": centre, "box": box})
    assert index[present].tolist() == [6, 1, 12] and present.tolist() == [[True, True, True, False]]
    connector.object_order = "raster"
    assert connector.select({"centre": centre, "box": box})[0][0, :3].tolist() == [1, 6, 12]
    with pytest.raises(UserError, match="object_order"):
        ProjectorConfig(kind="regions", object_order="by size")


def test_on_the_left_picks_the_left_twin_and_is_no_relation(tokenizer):
    words = AttributeWords(tokenizer)
    named = words.named(*question(tokenizer, "Is the red star on the left to the right of the red star on the right?"))
    assert named.relation[0].tolist() == [0, 1, 0, 0]  # "to the right of" only
    assert named.first_side[0].tolist() == [1, 0] and named.last_side[0].tolist() == [0, 1]
    plain = words.named(*question(tokenizer, "Is the red star to the left of the blue circle?"))
    assert plain.first_side.sum() == 0 and plain.relation[0, RELATIONS.index("left")] == 1
    # Two red stars (right one first in slot order) and a blue circle.
    attrs = attributes(("large", "red", "star"), ("large", "red", "star"), ("small", "blue", "circle"))
    boxes = torch.tensor([[[0.7, 0.1, 0.9, 0.3], [0.1, 0.1, 0.3, 0.3], [0.4, 0.6, 0.6, 0.8]]])
    present = torch.ones(1, 3, dtype=torch.bool)
    uniform = torch.full((1, 3), 1 / 3)
    run = execute(named, attrs, boxes, present, uniform, uniform)
    assert run.subject[0].tolist() == [0, 1, 0] and run.object[0].tolist() == [1, 0, 0]
    assert run.holds.item() < 0.01  # the left star is not right of the right one
    one = words.named(*question(tokenizer, "What colour is the star on the left?"))
    assert execute(one, attrs, boxes, present, uniform, uniform).subject[0].tolist() == [0, 1, 0]
    unsided = words.named(*question(tokenizer, "Is the red star to the left of the blue circle?"))
    assert execute(unsided, attrs, boxes, present, uniform, uniform).subject[0].tolist() == [0.5, 0.5, 0]
