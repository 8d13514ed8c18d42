"""A prompt batch (issue 19, time to first token): an image several rows hold (questions about
one picture) is preprocessed once, with the pixel values the row-by-row path makes; the
collator builds any batch in a fixed number of tensor ops and gives the batch it gave before."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from test_llava import tiny, tokenizer_dir  # noqa: F401 (fixture)
from visto.data import processor as processor_module
from visto.data.processor import IGNORE_INDEX, Batch, ImageMemo, Processor, ProcessorConfig
from visto.data.sample import Sample, Turn
from visto.data.tokenizer import Tokenizer
from visto.infer import Engine, SamplingParams

QUESTIONS = ["what is in the image?", "red", "is the blue square left of the circle",
             "what colour is the square", "how many", "the", "is it", "where is the circle"]  # fmt: skip


def _image(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8))


def _samples(images: list) -> list[Sample]:
    return [Sample(f"q{i}", [im], [Turn("user", "<image>\n" + QUESTIONS[i % len(QUESTIONS)])])
            for i, im in enumerate(images)]  # fmt: skip


def _processor(tokenizer_dir, **config) -> Processor:  # noqa: F811
    cfg = ProcessorConfig(**{"image_size": 32, "image_tokens": 16, "loc_bins": 32, **config})
    return Processor(cfg, Tokenizer.load(tokenizer_dir))


def _row_by_row(processor: Processor, samples: list[Sample]) -> Batch:
    """The prompt batch as it was made before the memo: every row encoded on its own."""
    return processor.collator("left")([processor.encode(s, train=False) for s in samples])


def _assert_same_batch(a: Batch, b: Batch) -> None:
    for name in ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values",
                 "image_sample_index", "image_token_counts", "image_grids", "segment_ids"):  # fmt: skip
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x.dtype == y.dtype and torch.equal(x, y), name


def _counting(monkeypatch, name: str) -> Counter:
    calls: Counter = Counter()
    real = getattr(processor_module, name)

    def counted(source, *args, **kwargs):
        calls[id(source) if isinstance(source, Image.Image) else repr(source)[:40]] += 1
        return real(source, *args, **kwargs)

    monkeypatch.setattr(processor_module, name, counted)
    return calls


@pytest.mark.parametrize("mode", ["resize", "pad"])
def test_eight_questions_on_one_image_preprocess_it_once(tokenizer_dir, monkeypatch, mode):  # noqa: F811
    processor = _processor(tokenizer_dir, resize_mode=mode)
    samples = _samples([_image(0)] * 8)
    reference = _row_by_row(processor, samples)
    calls = _counting(monkeypatch, "image_transform")
    batch = processor.prompt_batch(samples)
    assert sum(calls.values()) == 1
    _assert_same_batch(batch, reference)
    assert batch.pixel_values.shape[0] == 8


def test_rows_of_several_images_preprocess_each_once(tokenizer_dir, monkeypatch):  # noqa: F811
    processor = _processor(tokenizer_dir, resize_mode="pad")
    a, b, c = _image(0), _image(1), _image(2)
    samples = _samples([a, b, a, c, b, a])
    reference = _row_by_row(processor, samples)
    calls = _counting(monkeypatch, "image_transform")
    batch = processor.prompt_batch(samples)
    assert sorted(calls.values()) == [1, 1, 1] and len(calls) == 3
    _assert_same_batch(batch, reference)
    # equal pixels in equal images: the tower may run each distinct image once
    assert torch.equal(batch.pixel_values[0], batch.pixel_values[5])
    assert not torch.equal(batch.pixel_values[0], batch.pixel_values[1])


def test_bytes_and_paths_are_decoded_once(tokenizer_dir, monkeypatch, tmp_path):  # noqa: F811
    processor = _processor(tokenizer_dir, resize_mode="resize")
    buffer = io.BytesIO()
    _image(3).save(buffer, "PNG")
    path = tmp_path / "picture.png"
    path.write_bytes(buffer.getvalue())
    samples = _samples([buffer.getvalue(), str(path), buffer.getvalue(), path, str(path)])
    reference = _row_by_row(processor, samples)
    calls = _counting(monkeypatch, "open_image")
    batch = processor.prompt_batch(samples)
    assert sum(calls.values()) == 2  # the bytes once, the path once (str and Path alike)
    _assert_same_batch(batch, reference)


def test_patch_mode_decodes_and_patchifies_each_image_once(tokenizer_dir, monkeypatch):  # noqa: F811
    processor = _processor(tokenizer_dir, resize_mode="patch", image_size=24, patch_size=8)
    a, b = _image(4, 20), _image(5, 30)
    samples = _samples([a, a, b, a])
    reference = _row_by_row(processor, samples)
    calls = _counting(monkeypatch, "patch_image_transform")
    batch = processor.prompt_batch(samples)
    assert sorted(calls.values()) == [1, 1]
    _assert_same_batch(batch, reference)
    assert batch.image_grids is not None and batch.image_grids.shape == (4, 2)


def test_an_image_changed_between_batches_is_read_again(tokenizer_dir):  # noqa: F811
    processor = _processor(tokenizer_dir, resize_mode="resize")
    image = _image(6)
    first = processor.prompt_batch(_samples([image, image])).pixel_values.clone()
    image.paste((255, 0, 0), (0, 0, 20, 20))  # the memo lives for one batch only
    second = processor.prompt_batch(_samples([image, image])).pixel_values
    assert not torch.equal(first, second)
    _assert_same_batch(processor.prompt_batch(_samples([image])),
                       _row_by_row(processor, _samples([image])))  # fmt: skip


def test_the_memo_says_what_is_not_an_image():
    memo = ImageMemo()
    with pytest.raises(TypeError):
        memo.get("square", 3.5, lambda source: processor_module.load_rgb(source))
    assert memo.get("square", "a.png", lambda s: s.upper()) == "A.PNG"
    assert memo.get("square", "a.png", lambda s: s.lower()) == "A.PNG"  # made once


def test_engine_tokens_equal_the_row_by_row_batch(tokenizer_dir):  # noqa: F811
    torch.manual_seed(0)
    model = tiny(tokenizer_dir).eval()
    with torch.no_grad():  # peaked logits: greedy choices far from ties
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    a, b = _image(7), _image(8)
    samples = _samples([a, a, b, a, a, b, a, a])
    engine = Engine(model, model.processor.tokenizer, eos_token_ids=[])
    params = SamplingParams(max_new_tokens=8)
    fast = [c.token_ids for c in engine.generate_batch(model.prompt_batch(samples), params)]
    slow = [c.token_ids for c in engine.generate_batch(_row_by_row(model.processor, samples), params)]
    assert fast == slow


# ----------------------------------------------------------------------------- the collator


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _reference_collate(items, pad_id: int, side: str) -> dict[str, torch.Tensor]:
    """The collator's token fields as it made them before (processor.py at 0c7f9b5)."""
    width, b = max(len(e.input_ids) for e in items), len(items)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.input_ids)
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        input_ids[row, cols] = e.input_ids
        labels[row, cols] = e.labels
        attention_mask[row, cols] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_(min=0)
    pixel_values = torch.cat([e.pixel_values for e in items], dim=0)
    return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                position_ids=position_ids, pixel_values=pixel_values)  # fmt: skip


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("rows", [[0], [0, 0], [0, 1, 2], [2, 1, 0, 3, 3, 1, 0, 2]])
def test_collator_gives_the_batch_it_gave_before(tokenizer_dir, side, train, rows):  # noqa: F811
    processor = _processor(tokenizer_dir, resize_mode="resize")
    images = [_image(i) for i in range(4)]
    samples = []
    for i, row in enumerate(rows):  # some rows with an answer, some with two images
        turns = [Turn("user", "<image>\n" * (1 + row % 2) + QUESTIONS[row])]
        if train:
            turns.append(Turn("assistant", QUESTIONS[(row + 3) % len(QUESTIONS)]))
        samples.append(Sample(f"s{i}", [images[row]] * (1 + row % 2), turns))
    items = [processor.encode(s, train=train) for s in samples]
    batch = processor.collator(side)(items)
    for name, value in _reference_collate(items, processor.tokenizer.pad_id, side).items():
        got = getattr(batch, name)
        assert got.dtype == value.dtype and torch.equal(got, value), name


def test_collator_ops_do_not_grow_with_the_batch(tokenizer_dir):  # noqa: F811
    processor = _processor(tokenizer_dir, resize_mode="resize")
    image = _image(0)
    counts = {}
    for b in (2, 8):
        items = [processor.encode(s, train=False) for s in _samples([image] * b)]
        with _CountOps() as mode:
            processor.collator("left")(items)
        counts[b] = mode.ops
    assert counts[8] == counts[2], counts  # the row loop made 3 ops per row


def test_a_single_prompt_is_not_copied_twice(tokenizer_dir):  # noqa: F811
    processor = _processor(tokenizer_dir, resize_mode="resize")
    encoded = processor.encode(_samples([_image(0)])[0], train=False)
    batch = processor.collator("left")([encoded])
    assert batch.pixel_values.data_ptr() == encoded.pixel_values.data_ptr()
    assert batch.pixel_values.shape == (1, 3, 32, 32) and batch.pixel_values.is_contiguous()
