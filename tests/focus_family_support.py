"""What the question_focus tests of Flamingo and Fuyu share: a tokenizer of the world's words,
compare-llava's focus at a tiny size, and what a stand-in reader reads off an image."""

from __future__ import annotations

from visto.connectors.regions import COLOUR_NAMES, SHAPE_NAMES, SIZE_NAMES
from visto.data.tokenizer import Tokenizer, train_tokenizer, with_focus_token

TEXTS = [f"Which colour does the {s} have? Which shape is {c}? a {c} {s}, {z}" for s in SHAPE_NAMES
         for c in COLOUR_NAMES for z in SIZE_NAMES]  # fmt: skip
# compare-llava's focus, at 3 objects and 4 read slots
FOCUS = dict(kind="regions", slots=3, focus=True, read_slots=4, pointer=True, named=True, box_nms=0.3,
             count_width=0.35, object_order="left_to_right", copy_answers=True, copy_json=True, copy_verdicts=True,
             question_pointer=True)  # fmt: skip
# What the stand-in reader reads off an image, by its colour (the reader is a trained model:
# test_text_reader); the answers are the words read, so the pointer has something to copy.
READS = {(200, 30, 30): "red star", (30, 30, 200): "blue circle", (30, 200, 30): "star circle square"}


def world_words_tokenizer(path) -> Tokenizer:
    """A tokenizer of TEXTS saved into `path`, with the <focus> token."""
    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return with_focus_token(Tokenizer.load(path / "tokenizer.json"))
