"""The connector's OCR reader (connectors/text_reader.py) and its tokens in the connector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from visto.connectors.projector import ProjectorConfig
from visto.connectors.regions import RegionConnector
from visto.connectors.text_reader import (
    CHARS,
    CROP_H,
    CROP_W,
    TextReader,
    crop_line,
    ctc_greedy,
    encode_text,
)
from visto.data.tokenizer import Tokenizer, train_tokenizer
from visto.train.reader import text_mask


def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    e = [CHARS.index(c) + 1 for c in "EXIT"]
    assert ctc_greedy(np.array([0, e[0], e[0], 0, e[1], e[2], e[2], 0, e[3], 0])) == "EXIT"
    oo = CHARS.index("O") + 1
    assert ctc_greedy(np.array([oo, 0, oo])) == "OO"  # a blank separates a double letter
    assert encode_text("Go 4!") == [
        CHARS.index("G") + 1,
        CHARS.index("O") + 1,
        CHARS.index("4") + 1,
    ]


def test_crop_line_keeps_the_aspect_and_pads_right():
    image = torch.ones(3, 128, 128)
    line = crop_line(image, [10, 20, 42, 36])  # 32 x 16 px -> 32 x 16 at CROP_H 16
    assert line.shape == (3, CROP_H, CROP_W)
    assert line[:, :, :32].eq(1).all() and line[:, :, 32:].eq(0).all()


def test_find_boxes_gives_one_box_per_line_in_reading_order():
    reader = TextReader()
    logits = torch.full((1, 64, 64), -5.0)
    logits[0, 30:34, 40:55] = 5.0  # a line's core lower down
    logits[0, 5:9, 20:30] = 5.0  # a line's core at the top
    logits[0, 50, 50] = 5.0  # one stray cell: noise
    reader.text_logits = lambda pixels: logits  # the finder's output, fixed
    boxes = reader.find_boxes(torch.zeros(1, 3, 128, 128))[0]
    # cells x 2 px, grown back from the core (the core is half the line's height) + PAD
    assert boxes == [[36, 4, 64, 24], [76, 54, 114, 74]]  # top line first


def test_text_mask_marks_the_core_of_each_line():
    """The core: 2 px in from the sides, a quarter of the height in from top and bottom;
    lines 2 px apart (the world allows it) get cores apart by more than a cell."""
    mask = text_mask([[("CAT", [10, 20, 30, 36]), ("DOG", [32, 20, 52, 36])], []], 128)
    assert mask.shape == (2, 64, 64) and mask[1].sum() == 0
    # core of CAT: x 12..28, y 24..32 -> cells whose centres (2k + 1) lie inside
    assert mask[0, 12:16, 6:14].eq(1).all() and mask[0, 12:16, 14:17].eq(0).all()
    assert mask[0, 11].sum() == 0 and mask[0, 16].sum() == 0


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Read the text. EXIT 9658", "CAT DOG", " DOG"] * 5
    return train_tokenizer(texts, vocab_size=300, loc_bins=16, min_frequency=1)


def test_text_slots_carry_the_read_words_as_the_answers_tokens(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    c = RegionConnector(16, 32, 2, text_slots=2, text_tokens=4)
    c.set_vocabulary(tok)
    with torch.no_grad():
        c.text_marker.fill_(0.25)
        c.empty.fill_(0.5)
    lines = [[("CAT", [0, 0, 10, 10]), ("DOG", [0, 20, 10, 30])], []]
    c.reader.forward = lambda pixels: lines  # what the reader read, fixed (two different images:
    # the connector reads each image once, by its pixels)
    embed = nn.Embedding(300, 32)
    tokens = c(torch.randn(2, 16, 16), embed, torch.randn(2, 3, 128, 128))
    assert tokens.shape == (2, 2 + 2 * 4, 32)
    assert (
        ProjectorConfig(kind="regions", slots=2, text_slots=2, text_tokens=4).num_tokens(16) == 10
    )
    text = tokens[0, 2:].view(2, 4, 32)
    for k, form in enumerate(["CAT", " DOG"]):  # later lines with their space, as "CAT DOG"
        ids = tok.encode(form)
        assert torch.allclose(text[k, : len(ids)], embed(torch.tensor(ids)) + 0.25)
        assert torch.allclose(text[k, len(ids) :], torch.full((4 - len(ids), 32), 0.5))
    assert torch.allclose(tokens[1, 2:], torch.full((8, 32), 0.5))  # nothing read: empty
    with pytest.raises(RuntimeError, match="pass pixels"):
        c(torch.randn(2, 16, 16), embed)


def test_a_reader_inside_a_connector_stays_in_eval_mode():
    """The model around it trains; the reader's BatchNorm statistics must not move."""
    c = RegionConnector(16, 32, 2, text_slots=1)
    c.train()
    assert c.training and not c.reader.training
    assert TextReader().train().training


def test_evaluate_reader_sorts_the_misses_and_keeps_the_mode():
    """Reads in eval mode (BatchNorm's running statistics, as inside the connector) and gives
    the reader back in the mode it came in."""
    from visto.train.reader import ReaderData, evaluate_reader

    box = [0, 0, 10, 10]
    truth = [[("CAT", box), ("DOG", box)], [("CAT", box), ("DOG", box)], [("CAT", box)],
             [("CAT", box)], [("EXIT", box)], []]  # fmt: skip
    read = [[("CAT", box), ("DOG", box)], [("DOG", box), ("CAT", box)], [("CAT", box), ("GO", box)],
            [("CAR", box)], [("EXIT", box)], []]  # fmt: skip
    reader = TextReader()
    modes = []
    reader.forward = lambda pixels: (modes.append(reader.training), read[: len(pixels)])[1]
    data = ReaderData(torch.zeros(6, 3, 32, 32, dtype=torch.uint8), truth)
    figures = evaluate_reader(reader, data)
    assert modes == [False] and reader.training  # read in eval mode, handed back training
    assert figures["images_with_text"] == 5 and figures["exact"] == pytest.approx(2 / 5)
    assert figures["miss_order"] == figures["miss_lines"] == figures["miss_misread"] == pytest.approx(1 / 5)
    assert figures["empty_right"] == 1.0
