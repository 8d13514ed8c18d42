"""Shared-prefix packing (`Sample.independent_turns`): one image prefix, then each exchange's
tokens exactly as if it were asked alone, in a segment the other exchanges cannot see."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from PIL import Image

from visto.data.processor import IGNORE_INDEX, Processor, ProcessorConfig, train_tokenizer
from visto.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
from visto.errors import UserError

WORDS = (
    "how many red blue circles squares are there left of the what colour is shape yes no".split()
)
QAS = [
    ("how many circles", "two"),
    ("what colour is the square", "blue"),
    ("is there a red shape", "yes"),
]


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(300)]
    return train_tokenizer(texts, vocab_size=500, loc_bins=100)


def processor(tokenizer, **kw) -> Processor:
    return Processor(ProcessorConfig(**{"image_size": 16, "image_tokens": 4, **kw}), tokenizer)


def conversation(qas, images=1, **kw) -> Sample:
    lead = (IMAGE_PLACEHOLDER * images) + "\n"
    turns = []
    for j, (q, a) in enumerate(qas):
        turns += [Turn("user", lead + q if j == 0 else q), Turn("assistant", a)]
    pictures = [Image.new("RGB", (20, 12), (40 * i, 0, 0)) for i in range(images)]
    return Sample(id="s", images=pictures, turns=turns, **kw)


@pytest.mark.parametrize("mode", ["resize", "patch"])
def test_each_segment_is_the_exchange_encoded_alone(tokenizer, mode):
    proc = processor(tokenizer, resize_mode=mode, patch_size=4)
    packed = proc.encode(conversation(QAS, images=2, independent_turns=True))
    assert packed.segment_ids is not None and not packed.truncated
    seg = packed.segment_ids
    assert seg.tolist() == sorted(seg.tolist()) and set(seg.tolist()) == {0, 1, 2, 3}
    for k, qa in enumerate(QAS, start=1):
        alone = proc.encode(conversation([qa], images=2))
        rows = torch.cat([(seg == 0).nonzero().flatten(), (seg == k).nonzero().flatten()])
        assert torch.equal(packed.input_ids[rows], alone.input_ids)
        assert torch.equal(packed.labels[rows], alone.labels)
        assert packed.position_ids[rows].tolist() == list(range(len(alone.input_ids)))
    assert torch.equal(packed.pixel_values, alone.pixel_values)  # the images once
    # The prefix ends with the last image span and carries no loss.
    assert (packed.labels[seg == 0] == IGNORE_INDEX).all()


def test_flag_off_is_the_ordinary_conversation(tokenizer):
    proc = processor(tokenizer)
    plain = proc.encode(conversation(QAS))
    assert plain.segment_ids is None and plain.position_ids is None
    # and inference ignores the flag: a prompt is a prompt
    flagged = proc.encode(conversation(QAS, independent_turns=True), train=False)
    assert torch.equal(flagged.input_ids, proc.encode(conversation(QAS), train=False).input_ids)


def test_exchanges_that_do_not_fit_are_left_out(tokenizer):
    proc = processor(tokenizer)
    full = proc.encode(conversation(QAS, independent_turns=True))
    limit = len(full.input_ids) - 1
    cut = proc.encode(conversation(QAS, independent_turns=True), max_length=limit)
    assert cut.truncated and len(cut.input_ids) <= limit
    assert set(cut.segment_ids.tolist()) < {0, 1, 2, 3} and 1 in cut.segment_ids.tolist()
    # nothing but the first exchange fits: the ordinary truncation of that exchange
    tiny = proc.encode(conversation(QAS, independent_turns=True), max_length=8)
    assert tiny.truncated and tiny.segment_ids is None and len(tiny.input_ids) <= 8


def test_collator_carries_segments_and_positions(tokenizer):
    proc = processor(tokenizer)
    items = [
        proc.encode(conversation(QAS, independent_turns=True)),
        proc.encode(conversation(QAS[:1])),
    ]
    batch = proc.collator("right")(items)
    assert batch.segment_ids is not None and batch.segment_ids.shape == batch.input_ids.shape
    n0 = len(items[0].input_ids)
    assert torch.equal(batch.segment_ids[0, :n0], items[0].segment_ids)
    assert torch.equal(batch.position_ids[0, :n0], items[0].position_ids)
    assert (batch.segment_ids[1] == 0).all()  # an ordinary row: one causal sequence
    assert proc.collator("right")([items[1]]).segment_ids is None


@pytest.mark.parametrize(
    "turns",
    [
        [
            Turn("user", "<image>\nq"),
            Turn("assistant", "a"),
            Turn("user", "<image>\nq2"),
            Turn("assistant", "b"),
        ],
        [
            Turn("user", "q"),
            Turn("assistant", "a"),
            Turn("user", "<image>\nq2"),
            Turn("assistant", "b"),
        ],
        [Turn("user", "<image>\nq"), Turn("user", "q2")],
        [Turn("system", "<image>"), Turn("user", "<image>\nq"), Turn("assistant", "a")],
    ],
    ids=["image-in-a-later-turn", "image-not-first", "roles-not-paired", "image-in-the-system-turn"],
)
def test_layouts_that_cannot_share_a_prefix_are_user_errors(tokenizer, turns):
    n = sum(t.content.count(IMAGE_PLACEHOLDER) for t in turns)
    sample = Sample(
        id="bad", images=[Image.new("RGB", (8, 8))] * n, turns=turns, independent_turns=True
    )
    with pytest.raises(UserError, match="independent_turns"):
        processor(tokenizer).encode(sample)


def test_a_system_turn_is_part_of_every_exchange(tokenizer):
    proc = processor(tokenizer)
    system = Turn("system", "answer in one word")
    packed = proc.encode(dataclasses.replace(conversation(QAS, independent_turns=True),
                                             turns=[system, *conversation(QAS).turns]))  # fmt: skip
    alone = proc.encode(
        dataclasses.replace(conversation(QAS[2:]), turns=[system, *conversation(QAS[2:]).turns])
    )
    rows = torch.cat(
        [
            (packed.segment_ids == 0).nonzero().flatten(),
            (packed.segment_ids == 3).nonzero().flatten(),
        ]
    )
    assert torch.equal(packed.input_ids[rows], alone.input_ids)
