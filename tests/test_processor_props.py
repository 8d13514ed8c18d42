"""Property tests for the processor's bookkeeping: image-token counts, label mask, truncation.

Random multi-turn, multi-image conversations (unicode text, random image sizes and token
counts) in both fixed-count and Fuyu-style patch modes.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from visto.data.processor import IGNORE_INDEX, Encoded, Processor, ProcessorConfig, train_tokenizer
from visto.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
from visto.data.tokenizer import END_OF_TURN

WORDS = "how many red blue circles squares are there left of the what colour is shape".split()


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(300)]
    return train_tokenizer(texts + ["Ünïcödé 数字 😀"], vocab_size=500, loc_bins=100)


text = st.text(max_size=24).filter(lambda t: IMAGE_PLACEHOLDER not in t)


@st.composite
def samples(draw) -> Sample:
    """A conversation: optional system turn, then user/assistant rounds; images in user turns."""
    turns: list[Turn] = []
    images: list[Image.Image] = []
    if draw(st.booleans()):
        turns.append(Turn("system", draw(text)))
    for _ in range(draw(st.integers(1, 3))):
        n_images = draw(st.integers(0, 2))
        pieces = draw(st.lists(text, min_size=n_images + 1, max_size=n_images + 1))
        turns.append(Turn("user", IMAGE_PLACEHOLDER.join(pieces)))
        for _ in range(n_images):
            w, h = draw(st.integers(1, 20)), draw(st.integers(1, 20))
            colour = tuple(draw(st.lists(st.integers(0, 255), min_size=3, max_size=3)))
            images.append(Image.new("RGB", (w, h), colour))
        turns.append(Turn("assistant", draw(text)))
    return Sample("p", images=images, turns=turns)


def spans(ids: list[int], tok) -> list[tuple[int, int]]:
    """[start, end) of each <im_start> ... <im_end> span, asserting they are well formed."""
    out, start = [], None
    for i, t in enumerate(ids):
        if t == tok.im_start_id:
            assert start is None, "nested image span"
            start = i
        elif t == tok.im_end_id:
            assert start is not None, "<im_end> without <im_start>"
            out.append((start, i + 1))
            start = None
        elif t in (tok.image_id, tok.im_newline_id):
            assert start is not None, "image token outside a span"
    assert start is None, "an image span was cut in half"
    return out


def check_consistent(enc: Encoded, proc: Processor) -> None:
    tok = proc.tokenizer
    ids = enc.input_ids.tolist()
    found = spans(ids, tok)
    n = len(found)
    assert len(enc.image_token_counts) == n
    assert ids.count(tok.image_id) == sum(enc.image_token_counts)
    for (start, end), count in zip(found, enc.image_token_counts, strict=True):
        assert ids[start:end].count(tok.image_id) == count
    if proc.config.resize_mode == "patch":
        assert len(enc.image_grids) == n
        assert [r * c for r, c in enc.image_grids] == enc.image_token_counts
        assert enc.pixel_values.shape[0] == sum(enc.image_token_counts)
    else:
        assert enc.pixel_values.shape[0] == n
    assert enc.input_ids.shape == enc.labels.shape


def make_processor(tokenizer, patch: bool) -> Processor:
    if patch:
        cfg = ProcessorConfig(image_size=12, resize_mode="patch", patch_size=4)
    else:
        cfg = ProcessorConfig(image_size=8, resize_mode="pad")
    return Processor(cfg, tokenizer)


@settings(max_examples=40, deadline=None)
@given(sample=samples(), patch=st.booleans(), data=st.data())
def test_image_ids_match_features_and_labels_cover_exactly_the_answers(
    tokenizer, sample: Sample, patch: bool, data
) -> None:
    proc = make_processor(tokenizer, patch)
    counts = None
    if not patch:
        counts = data.draw(
            st.lists(st.integers(1, 6), min_size=len(sample.images), max_size=len(sample.images))
        )
    enc = proc.encode(sample, image_token_counts=counts)
    check_consistent(enc, proc)
    assert enc.pixel_values.shape[0] == (
        sum(enc.image_token_counts) if patch else len(sample.images)
    )
    if counts is not None:
        assert enc.image_token_counts == counts

    # The unmasked labels are the input ids themselves, in runs, one run per assistant turn,
    # each decoding to that turn's text followed by the end-of-turn marker.
    ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
    runs, current = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert lab == i
            current.append(i)
    if current:
        runs.append(current)
    expected = [t.content + END_OF_TURN for t in sample.turns if t.role == "assistant"]
    assert [tokenizer.decode(run) for run in runs] == expected
    assert all(run[-1] == tokenizer.end_id for run in runs)
    # and the whole sequence decodes back to the rendered, expanded conversation
    assert tokenizer.decode(ids).count(IMAGE_PLACEHOLDER) == sum(enc.image_token_counts)


@settings(max_examples=20, deadline=None)
@given(sample=samples(), patch=st.booleans())
def test_truncation_at_every_length_keeps_whole_images(
    tokenizer, sample: Sample, patch: bool
) -> None:
    proc = make_processor(tokenizer, patch)
    full = proc.encode(sample)
    full_ids = full.input_ids.tolist()
    full_spans = spans(full_ids, tokenizer)
    for max_length in range(1, len(full_ids) + 2):
        enc = proc.encode(sample, max_length=max_length)
        n = len(enc.input_ids)
        assert n <= max_length
        assert enc.input_ids.tolist() == full_ids[:n]
        assert enc.labels.tolist() == full.labels.tolist()[:n]
        assert enc.truncated == (max_length < len(full_ids))
        # it only falls short of max_length when max_length lands inside an image span
        if n < min(max_length, len(full_ids)):
            assert (n, True) in [(s, s < max_length < e) for s, e in full_spans]
        check_consistent(enc, proc)
        kept = len(enc.image_token_counts)
        assert enc.image_token_counts == full.image_token_counts[:kept]
        rows = sum(enc.image_token_counts) if patch else kept
        assert torch.equal(enc.pixel_values, full.pixel_values[:rows])


@settings(max_examples=20, deadline=None)
@given(batch=st.lists(samples(), min_size=1, max_size=4), left=st.booleans())
def test_collated_batches_keep_images_with_their_rows(
    tokenizer, batch: list[Sample], left: bool
) -> None:
    proc = make_processor(tokenizer, patch=False)
    encoded = [proc.encode(s) for s in batch]
    out = proc.collator("left" if left else "right")(encoded)
    per_row = (out.input_ids == tokenizer.image_id).sum(dim=1)
    expected = torch.zeros(len(batch), dtype=torch.long)
    expected.index_add_(0, out.image_sample_index, out.image_token_counts)
    assert torch.equal(per_row, expected)
    assert out.pixel_values.shape[0] == out.image_sample_index.numel()
    assert int(out.attention_mask.sum()) == sum(len(e.input_ids) for e in encoded)
    assert int((out.labels != IGNORE_INDEX).sum()) == sum(e.num_loss_tokens for e in encoded)
    assert torch.all(out.input_ids[out.attention_mask == 0] == tokenizer.pad_id)
