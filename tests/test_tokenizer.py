"""Tokenizer: training, special ids, byte-level round trip, box tokens, HF wrapper + chat template."""

from __future__ import annotations

import math
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visto.data.chat import JINJA_CHAT_TEMPLATE, render_chat
from visto.data.sample import Sample, Turn
from visto.data.tokenizer import (
    SPECIAL_TOKENS,
    LocText,
    Tokenizer,
    bin_to_coord,
    boxes_to_loc,
    coord_to_bin,
    corpus_texts,
    format_box,
    loc_to_boxes,
    loc_to_text,
    parse_boxes,
    train_tokenizer,
)
from visto.errors import UserError

WORDS = "how many red blue green circles squares triangles are there left of the right above below is a an the what colour shape".split()


def small_corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    extra = ["Ünïcödé façade", "数字 七 个", "emoji 😀 ok", "[12, 40, 300, 999]"]
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)
    ] + extra


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(small_corpus(), vocab_size=600, loc_bins=100)


def test_special_tokens_have_fixed_ids_and_loc_tokens_follow(tok: Tokenizer) -> None:
    assert [tok.raw.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id) == (0, 1, 2, 3)
    assert tok.loc_bins == 100 and len(set(tok.loc_ids)) == 100
    assert tok.vocab_size <= 600 and tok.loc_ids[-1] == tok.vocab_size - 1
    # BPE learnt merges beyond the 256 bytes
    assert tok.vocab_size > 256 + len(SPECIAL_TOKENS) + 100
    assert len(tok.encode("how many red circles")) < len("how many red circles")


def test_training_is_deterministic() -> None:
    a = train_tokenizer(small_corpus(), vocab_size=500, loc_bins=10)
    b = train_tokenizer(small_corpus(), vocab_size=500, loc_bins=10)
    assert a.raw.to_str() == b.raw.to_str()


def test_vocab_too_small_is_a_user_error() -> None:
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(small_corpus(10), vocab_size=300, loc_bins=100)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_byte_level_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_special_spellings_in_content_stay_text(tok: Tokenizer) -> None:
    ids = tok.encode("a<|end|>b<s><image>")
    assert tok.end_id not in ids and tok.bos_id not in ids and tok.image_id not in ids
    assert tok.decode(ids) == "a<|end|>b<s><image>"
    # location tokens are meant to be written by answers, so they stay atomic
    assert tok.encode("<loc_7>") == [tok.loc_ids[7]]
    assert tok.decode([tok.bos_id, tok.loc_ids[7], tok.end_id], skip_special=True) == "<loc_7>"


def test_save_load_round_trip(tok: Tokenizer, tmp_path) -> None:
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.raw.to_str() == tok.raw.to_str()
    assert again.loc_bins == tok.loc_bins and again.end_id == tok.end_id
    assert again.encode("how many <|user|> squares") == tok.encode("how many <|user|> squares")


def test_load_errors_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable"):
        Tokenizer.load(tmp_path)


def test_corpus_texts_yields_turns_without_placeholders() -> None:
    samples = [
        Sample("a", turns=[Turn("user", "<image>\nHow many?"), Turn("assistant", "2")]),
        Sample("b", turns=[Turn("system", "Be brief."), Turn("user", "<image>")]),
    ]
    assert list(corpus_texts(samples)) == ["\nHow many?", "2", "Be brief."]


# ----------------------------------------------------------------------------- boxes

coord = st.integers(0, 999)


@settings(max_examples=300, deadline=None)
@given(box=st.lists(coord, min_size=4, max_size=4), bins=st.integers(1, 1000))
def test_box_round_trip_within_bin_precision(box: list[int], bins: int) -> None:
    text = format_box(box, bins)
    assert text.count("<loc_") == 4
    [back] = parse_boxes(text, bins)
    for v, b in zip(box, back, strict=True):
        assert coord_to_bin(b, bins) == coord_to_bin(v, bins)  # the centre is in the same bin
        assert abs(v - b) <= math.ceil(1000 / bins) / 2


@settings(max_examples=100, deadline=None)
@given(
    boxes=st.lists(st.lists(coord, min_size=4, max_size=4), min_size=1, max_size=4),
    plain=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_parse_mixed_boxes_in_order(boxes: list[list[int]], plain: list[bool]) -> None:
    parts, expected = [], []
    for box, as_plain in zip(boxes, plain, strict=False):
        if as_plain:
            parts.append("the box [{}, {},{} ,{}] then".format(*box))
            expected.append(box)
        else:
            parts.append(f"object {format_box(box)} and")
            expected.append([bin_to_coord(coord_to_bin(v)) for v in box])
    assert parse_boxes(" ".join(parts)) == expected


def test_bins_cover_0_to_999_exactly() -> None:
    assert coord_to_bin(0) == 0 and coord_to_bin(999) == 99 and coord_to_bin(15) == 1
    assert bin_to_coord(0) == 4 and bin_to_coord(99) == 994
    assert [coord_to_bin(v, 1000) for v in (0, 500, 999)] == [0, 500, 999]
    assert bin_to_coord(3, 1000) == 3
    with pytest.raises(ValueError):
        coord_to_bin(1000)
    with pytest.raises(ValueError):
        format_box([1, 2, 3])


def test_parse_boxes_clamps_plain_and_skips_bad_bins() -> None:
    assert parse_boxes("[0, 5, 1200, 999]") == [[0, 5, 999, 999]]
    assert parse_boxes("<loc_1><loc_2><loc_3><loc_100>", loc_bins=100) == []
    assert parse_boxes("no box here [1, 2, 3]") == []


def test_boxes_round_trip_between_plain_lists_and_location_tokens():
    text = "the star at [0, 500, 998, 999] and [10, 20, 30, 40]"
    loc = boxes_to_loc(text, 100)
    assert loc == "the star at <loc_0><loc_50><loc_99><loc_99> and <loc_1><loc_2><loc_3><loc_4>"
    # Back to plain 0..999: each bin's centre value (the bins are 10 wide).
    assert loc_to_boxes(loc, 100) == "the star at [4, 504, 994, 994] and [14, 24, 34, 44]"
    # a list with a number outside 0..999 is not a box
    assert boxes_to_loc("at [1200, 5, 6, 7]", 100) == "at [1200, 5, 6, 7]"


ANSWER = "a star<loc_1><loc_2> <loc_3><loc_4> near <loc_7> it<loc_5><loc_6><loc_7><loc_8><loc_9>"


def test_location_tokens_as_users_read_them():
    """Boxes of four tokens become 0..999 lists; a stray token is left out with its space."""
    assert loc_to_text(ANSWER, 100) == "a star[14, 24, 34, 44] near it[54, 64, 74, 84]"
    assert loc_to_text("<loc_1>", 0) == "<loc_1>"  # no location tokens: plain text


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, len(ANSWER)), max_size=12))
def test_streamed_location_tokens_add_up_to_the_whole_answer(cuts):
    """However the answer is cut into pieces (a token is never split), the pieces LocText
    sends add up to loc_to_text of the whole, and never show a location token."""
    starts = {m.start() for m in re.finditer(r"<loc_\d+>|.", ANSWER)}
    bounds = sorted({0, len(ANSWER), *(c for c in cuts if c in starts)})
    stream, sent = LocText(100), []
    for a, b in zip(bounds, bounds[1:], strict=False):
        sent.append(stream.feed(ANSWER[a:b]))
    sent.append(stream.finish())
    assert "".join(sent) == loc_to_text(ANSWER, 100)
    assert not any("<loc_" in piece for piece in sent)
    # an unfinished box is held back until its fourth token
    held = LocText(100)
    assert held.feed("at <loc_1><loc_2>") == "at" and held.feed("<loc_3><loc_4>") == " [14, 24, 34, 44]"


# ----------------------------------------------------------------------------- HF wrapper


@pytest.fixture(scope="module")
def hf(tok: Tokenizer):
    return tok.to_hf_tokenizer()


def test_hf_tokenizer_special_tokens(hf, tok: Tokenizer) -> None:
    assert hf.bos_token_id == tok.bos_id
    assert hf.eos_token_id == tok.end_id  # generation stops at end of turn
    assert hf.pad_token_id == tok.pad_id
    assert hf.image_token_id == tok.image_id
    assert hf.im_start_token_id == tok.im_start_id
    assert hf.chat_template == JINJA_CHAT_TEMPLATE
    text = "how many <loc_3> red"
    assert hf(text, add_special_tokens=False).input_ids == tok.encode(text)


chat_text = st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=20)


@st.composite
def conversations(draw) -> list[Turn]:
    turns = []
    if draw(st.booleans()):
        turns.append(Turn("system", draw(chat_text)))
    for _ in range(draw(st.integers(1, 3))):
        pieces = draw(st.lists(chat_text, min_size=1, max_size=3))
        turns.append(Turn("user", "<image>".join(pieces)))
        turns.append(Turn("assistant", draw(chat_text)))
    if draw(st.booleans()):
        turns.pop()  # ends on a user turn, as a prompt does
    return turns


@settings(max_examples=40, deadline=None)
@given(turns=conversations(), gen=st.booleans())
def test_jinja_template_matches_python(hf, turns: list[Turn], gen: bool) -> None:
    messages = [{"role": t.role, "content": t.content} for t in turns]
    ours = render_chat(turns, add_generation_prompt=gen)
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == ours
    # OpenAI-style content parts render the same way
    parts_messages = []
    for t in turns:
        parts = []
        for i, piece in enumerate(t.content.split("<image>")):
            if i:
                parts.append({"type": "image"})
            parts.append({"type": "text", "text": piece})
        parts_messages.append({"role": t.role, "content": parts})
    assert hf.apply_chat_template(parts_messages, tokenize=False, add_generation_prompt=gen) == ours


def test_jinja_template_rejects_unknown_roles(hf) -> None:
    with pytest.raises(Exception, match="roles are system, user, assistant and tool"):
        hf.apply_chat_template([{"role": "function", "content": "x"}], tokenize=False)


@pytest.mark.slow  # AutoTokenizer imports much of transformers (several seconds)
def test_hf_save_and_reload_offline(hf, tmp_path) -> None:
    from transformers import AutoTokenizer

    hf.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    messages = [
        {"role": "user", "content": "<image>how many?"},
        {"role": "assistant", "content": "2"},
    ]
    assert again.apply_chat_template(messages, tokenize=False) == render_chat(
        [Turn("user", "<image>how many?"), Turn("assistant", "2")]
    )
    assert again.image_token_id == hf.image_token_id and again.eos_token_id == hf.eos_token_id
