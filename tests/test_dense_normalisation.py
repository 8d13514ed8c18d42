"""Dense pretraining (train/dense.py) and the OCR reader's training (train/reader.py) normalise
pixels as the processor the tower is trained for does (`ProcessorConfig.mean/std`): the
default stays the 0.5/0.5 of before, bit for bit, and other settings reach the trainer."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from visto.data.images import normalise_pixels
from visto.data.processor import ProcessorConfig, image_transform
from visto.nn.vision import CLIP_MEAN, CLIP_STD, ViT, ViTConfig
from visto.train import reader as reader_training
from visto.train.dense import DenseTargets, batch_of, evaluate_dense, pretrain_dense

OTHER = ProcessorConfig(image_size=16, resize_mode="resize", mean=CLIP_MEAN, std=CLIP_STD)


def every_byte() -> torch.Tensor:
    """(2, 3, 16, 16) uint8 holding each of the 256 values in every channel."""
    values = torch.arange(512) % 256
    return values.view(2, 1, 16, 16).expand(2, 3, 16, 16).to(torch.uint8).contiguous()


def random_targets(n: int = 8, side: int = 16) -> DenseTargets:
    g = torch.Generator().manual_seed(0)
    cells = (side // 8) ** 2
    return DenseTargets(
        pixels=torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8),
        shape=torch.randint(0, 8, (n, cells), generator=g),
        colour=torch.randint(0, 9, (n, cells), generator=g),
        size=torch.randint(0, 4, (n, cells), generator=g),
        centre=(torch.rand(n, cells, generator=g) > 0.6).float(),
        centre_shape=torch.randint(0, 8, (n, cells), generator=g),
        box=torch.rand(n, cells, 4, generator=g),
        chars=torch.randint(0, 37, (n, cells, 2), generator=g),
    )


def test_the_default_normalisation_is_the_old_one_bit_for_bit():
    pixels = every_byte()
    targets = random_targets(n=2)
    targets.pixels = pixels
    index = torch.arange(2)
    old_dense = (pixels.float() / 255.0 - 0.5) / 0.5  # train/dense.py's normalize_pixels before
    old_reader = pixels.float() / 127.5 - 1.0  # train/reader.py's normalise before
    for got in (batch_of(targets, index)[0], batch_of(targets, index, ProcessorConfig())[0]):
        assert got.dtype == torch.float32 and torch.equal(got, old_dense)
    assert torch.equal(reader_training.normalise(pixels), old_reader)
    assert torch.equal(reader_training.normalise(pixels, ProcessorConfig()), old_reader)


def test_dense_pixels_are_the_processors_pixels():
    """The pixels a tower trains on are the float32 values the processor makes of the same
    image, for the default settings and for CLIP's."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    targets = random_targets(n=1)
    targets.pixels = torch.from_numpy(array.transpose(2, 0, 1).copy())[None]
    for config in (ProcessorConfig(image_size=16, resize_mode="resize"), OTHER):
        expected = image_transform(Image.fromarray(array), config)
        assert torch.equal(batch_of(targets, torch.arange(1), config)[0][0], expected)
        assert torch.equal(reader_training.normalise(targets.pixels, config)[0], expected)
    assert not torch.equal(batch_of(targets, torch.arange(1), OTHER)[0], batch_of(targets, torch.arange(1))[0])


def test_a_processors_mean_and_std_reach_the_dense_trainer(monkeypatch):
    """Every batch the ViT sees in training and in the final evaluation is normalised with the
    processor settings handed to pretrain_dense."""
    train, val = random_targets(), random_targets(n=4)
    seen: list[torch.Tensor] = []
    forward = ViT.forward

    def recording(self, pixel_values, *args, **kwargs):
        seen.append(pixel_values.detach().clone())
        return forward(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(ViT, "forward", recording)
    config = ViTConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2, mlp_hidden=64)
    result = pretrain_dense(config, train, val, minutes=60, max_steps=3, batch_size=4, seed=1, processor=OTHER)
    assert result.steps == 3 and len(seen) == 4  # 3 training batches, 1 validation batch
    every = torch.cat([train.pixels, val.pixels])
    expected = normalise_pixels(every, OTHER.mean, OTHER.std)
    default = normalise_pixels(every, (0.5,) * 3, (0.5,) * 3)
    for batch in seen:
        for image in batch:
            assert any(torch.equal(image, e) for e in expected)
            assert not any(torch.equal(image, d) for d in default)
    assert torch.equal(seen[-1], expected[len(train.pixels):])  # validation: val's images, in order

    # evaluate_dense alone reads the same way
    seen.clear()
    evaluate_dense(result.vit, result.heads, val, processor=OTHER)
    assert torch.equal(seen[0], expected[len(train.pixels):])


def test_a_processors_mean_and_std_reach_the_reader_trainer(monkeypatch):
    """The OCR reader trains (find and read losses) and is evaluated on pixels normalised with
    the processor settings handed to train_reader."""
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 128, 128), dtype=np.uint8))
    data = reader_training.ReaderData(images, [[("AB", [10, 10, 50, 26])], []])
    seen: list[torch.Tensor] = []
    text_logits = reader_training.TextReader.text_logits

    def recording(self, pixels):
        seen.append(pixels.detach().clone())
        return text_logits(self, pixels)

    monkeypatch.setattr(reader_training.TextReader, "text_logits", recording)
    config = ProcessorConfig(image_size=128, resize_mode="resize", mean=CLIP_MEAN, std=CLIP_STD)
    reader_training.train_reader(data, data, steps=1, batch_size=2, processor=config)
    expected = normalise_pixels(images, CLIP_MEAN, CLIP_STD)
    assert len(seen) >= 2  # the training step and the evaluation
    for batch in seen:
        for image in batch:
            assert any(torch.equal(image, e) for e in expected)
