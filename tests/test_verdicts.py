"""Yes/no verdicts through the pointer (ProjectorConfig.copy_verdicts; connectors.named.verdict_run):
an existence or relation answer copies the executed question's yes/no."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from visto.connectors.named import (
    ANSWER_RUNS,
    KINDS,
    VALUES,
    VERDICT_RUNS,
    AttributeWords,
    execute,
    verdict_run,
)
from visto.connectors.pointer import PointerHead, copy_runs
from visto.connectors.projector import ProjectorConfig, build_projector
from visto.data.synth.vocab import COLOURS, SHAPES, SIZES
from visto.data.tokenizer import Tokenizer, train_tokenizer
from visto.errors import UserError

TEXTS = [
    f"Is there a {c} {s} in the image? Do you see a {s}? Is the {z} {c} {s} to the left of the {s}? "
    f"Is the {s} above the {c} {s}? Is the {s} to the right of or below the {c} {s}? How many objects are in the image? What colour is the {s}?"
    for s in SHAPES for c in COLOURS for z in SIZES
] + ["yes", "no"] * 100  # the answers' first words, one token each (as in the world's tokenizer)

QUESTIONS = {  # question -> the answer on the scene below (a red star on the left, a blue circle on the right)
    "Is there a red star in the image?": "yes",
    "Is there a green star?": "no",
    "Do you see a circle?": "yes",
    "Do you see a hexagon?": "no",
    "Is the red star to the left of the blue circle?": "yes",
    "Is the red star to the right of the blue circle?": "no",
    "Is the blue circle to the right of the star?": "yes",
    "Is the circle to the left of the red star?": "no",
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(TEXTS, vocab_size=500, loc_bins=32, min_frequency=1).save(path)
    return Tokenizer.load(path)


def scene(red_share: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attributes (1, 2, VALUES), boxes (1, 2, 4), present (1, 2)): a large red star on the
    left (its colour `red_share` red, the rest orange) and a small blue circle on the right."""
    attrs = torch.zeros(1, 2, VALUES)
    colour_at, size_at = len(KINDS["shape"]), len(KINDS["shape"]) + len(KINDS["colour"])
    attrs[0, 0, SHAPES.index("star")] = 1
    attrs[0, 0, colour_at + list(COLOURS).index("red")] = red_share
    attrs[0, 0, colour_at + list(COLOURS).index("orange")] = 1 - red_share
    attrs[0, 0, size_at + list(SIZES).index("large")] = 1
    attrs[0, 1, SHAPES.index("circle")] = 1
    attrs[0, 1, colour_at + list(COLOURS).index("blue")] = 1
    attrs[0, 1, size_at + list(SIZES).index("small")] = 1
    boxes = torch.tensor([[[0.05, 0.4, 0.25, 0.6], [0.7, 0.4, 0.9, 0.6]]])
    return attrs, boxes, torch.ones(1, 2, dtype=torch.bool)


def verdicts(tok: Tokenizer, questions: list[str], red_share: float = 1.0):
    """The verdict run of each question on `scene`: (ids (P, 1, 2), weights (P, 1, 2))."""
    words = AttributeWords(tok)
    attrs, boxes, present = scene(red_share)
    out_ids, out_weights = [], []
    for q in questions:
        ids = torch.tensor([tok.encode(q)])
        named = words.named(ids, torch.ones_like(ids, dtype=torch.float))
        uniform = torch.full((1, 2), 0.5)
        run = execute(named, attrs, boxes, present, uniform, uniform)
        i, w = verdict_run(words, named, run)
        out_ids.append(i)
        out_weights.append(w)
    return torch.cat(out_ids), torch.cat(out_weights)


def test_the_verdict_is_whether_the_named_subject_is_there_or_the_named_relation_holds(tokenizer):
    ids, weights = verdicts(tokenizer, list(QUESTIONS))
    assert [tokenizer.decode([int(i)]) for i in ids[0, 0]] == ["yes", "no"]
    assert ids.shape == (len(QUESTIONS), 1, 2)
    for (q, answer), w in zip(QUESTIONS.items(), weights[:, 0], strict=True):
        assert float(w.sum()) == pytest.approx(1.0), q  # one full slot
        said = "yes" if w[0] > w[1] else "no"
        assert said == answer and float(w.max()) > 0.9, (q, w.tolist())


def test_a_question_that_names_nothing_leaves_the_verdict_slot_empty(tokenizer):
    ids, weights = verdicts(tokenizer, ["How many objects are in the image?"])
    assert weights.sum() == 0
    slots = copy_runs([(ids, weights)], end_id=7)  # an empty run: no end slot either
    assert slots.weights.sum() == 0


def test_existence_follows_the_detectors_probabilities(tokenizer):
    # the star is 0.7 red: "is there a red star?" is yes at 0.7; "an orange star?" at 0.3
    _, weights = verdicts(tokenizer, ["Is there a red star in the image?", "Is there a orange star?"], red_share=0.7)
    torch.testing.assert_close(weights[:, 0], torch.tensor([[0.7, 0.3], [0.3, 0.7]]))


def test_the_pointer_copies_no_where_its_lm_head_alone_says_yes(tokenizer):
    """A pointer head trained on the eight questions (one hidden state for all, and an LM head
    that always prefers "yes") answers each by its verdict slot: "no" where the scene says
    no, and then the end token. Its only way to tell them apart is the slot's content."""
    ids, weights = verdicts(tokenizer, list(QUESTIONS))
    END, OPEN = 3, 4
    slots = copy_runs([(ids, weights)], END)
    yes, no = (int(i) for i in ids[0, 0])
    answers = torch.tensor([yes if a == "yes" else no for a in QUESTIONS.values()])
    P = len(QUESTIONS)
    logits = torch.zeros(P, tokenizer.vocab_size)
    logits[:, yes], logits[:, no] = 4.0, 2.0  # the LM head alone: "yes", every time
    assert (logits.argmax(-1) == yes).all()
    torch.manual_seed(0)
    head = PointerHead(8, VERDICT_RUNS)
    head.start_id = OPEN
    hidden = torch.ones(P, 8)
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    for _ in range(40):
        loss = torch.nn.functional.nll_loss(head(hidden, logits, slots, torch.full((P,), OPEN)), answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        first = head(hidden, logits, slots, torch.full((P,), OPEN)).argmax(-1)
        assert first.tolist() == answers.tolist()
        assert no in first.tolist()
        after = head(hidden, torch.zeros_like(logits), slots, first)  # the copy ends with its run
        assert (after.argmax(-1) == END).all()


def test_config_refuses_verdicts_without_copied_answers_and_old_configs_load_without_them():
    with pytest.raises(UserError, match="copy_verdicts"):
        ProjectorConfig(kind="regions", focus=True, pointer=True, named=True, copy_verdicts=True)
    old = {"kind": "regions", "slots": 3, "focus": True, "read_slots": 2, "pointer": True, "named": True,
           "copy_answers": True}  # fmt: skip
    config = ProjectorConfig(**old)  # a config written before copy_verdicts
    assert config.copy_verdicts is False
    before = build_projector(config, 16, 32)
    on = build_projector(dataclasses.replace(config, copy_verdicts=True), 16, 32)
    # the old pointer's slots are unchanged; the verdict adds one run (its slot and its end)
    assert before.pointer.slots == (4 + 1) + (2 + 1) + sum(n + 1 for n in ANSWER_RUNS)
    assert on.pointer.slots == before.pointer.slots + sum(n + 1 for n in VERDICT_RUNS)
    assert not before.focus.copy_verdicts and on.focus.copy_verdicts
    fresh = build_projector(config, 16, 32)
    fresh.load_state_dict(before.state_dict())  # strict: an old checkpoint loads as it was


# ---------------------------------------------------------------- question-aware pointer (question_pointer)


def two_runs(tok: Tokenizer, P: int):
    """P answers' slots: a colour run holding " red" and a shape run holding " star", both full."""
    red, star = tok.encode(" red"), tok.encode(" star")
    assert len(red) == len(star) == 1
    runs = [(torch.full((P, 1, 1), red[0]), torch.ones(P, 1, 1)), (torch.full((P, 1, 1), star[0]), torch.ones(P, 1, 1))]
    return copy_runs(runs, end_id=3), red[0], star[0]


def test_a_fresh_question_term_changes_nothing_and_rows_keep_their_questions(tokenizer):
    from visto.connectors.pointer import CopySlots

    slots, *_ = two_runs(tokenizer, 2)
    torch.manual_seed(0)
    plain, aware = PointerHead(8, (1, 1)), PointerHead(8, (1, 1), question=True)
    aware.load_state_dict({**plain.state_dict(), "question": torch.zeros(8, 8)})
    hidden, logits, tokens = torch.randn(2, 8), torch.randn(2, tokenizer.vocab_size), torch.tensor([4, 4])
    plain.start_id = aware.start_id = 4
    slots.question = torch.randn(2, 8)
    torch.testing.assert_close(aware(hidden, logits, slots, tokens), plain(hidden, logits, slots, tokens))
    merged = CopySlots.merge([slots, slots.select(torch.tensor([1])), CopySlots(slots.ids[:1], slots.weights[:1])])
    assert merged.question.shape == (4, 8) and torch.equal(merged.question[2], slots.question[1])
    assert merged.question[3].abs().sum() == 0  # a row without a question: no question term


@pytest.mark.parametrize("question", [True, False])
def test_a_question_aware_pointer_picks_the_run_its_question_asks_for(tokenizer, question):
    """Colour and shape questions with the same hidden state and the same slots: only the
    question's own vector tells which run to copy. With the question term the pointer learns
    it; without, it cannot do better than one of the two."""
    P = 8
    slots, red, star = two_runs(tokenizer, P)
    torch.manual_seed(0)
    colour_q, shape_q = torch.randn(8), torch.randn(8)
    asks_colour = torch.arange(P) % 2 == 0
    slots.question = torch.where(asks_colour[:, None], colour_q, shape_q)
    answers = torch.where(asks_colour, red, star)
    head = PointerHead(8, (1, 1), question=question)
    head.start_id = 4
    hidden, logits, tokens = torch.ones(P, 8), torch.zeros(P, tokenizer.vocab_size), torch.full((P,), 4)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(60):
        loss = torch.nn.functional.nll_loss(head(hidden, logits, slots, tokens), answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        right = (head(hidden, logits, slots, tokens).argmax(-1) == answers).float().mean()
    assert (right == 1.0) if question else (right <= 0.5)


def test_config_refuses_a_question_pointer_without_a_pointer():
    with pytest.raises(UserError, match="question_pointer"):
        ProjectorConfig(kind="regions", focus=True, question_pointer=True)
    config = ProjectorConfig(kind="regions", slots=3, focus=True, pointer=True, named=True, question_pointer=True)
    connector = build_projector(config, 16, 32)
    assert connector.pointer.question is not None and connector.focus.question_pointer
    assert connector.pointer.question.abs().sum() == 0  # zero at first, not re-initialised
    assert build_projector(ProjectorConfig(kind="regions", slots=3, focus=True, pointer=True), 16, 32).pointer.question is None
