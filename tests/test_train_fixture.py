"""A tiny real model that implements the visto model protocol, for the trainer and checkpoint tests.

It classifies 4x4 images by their dominant colour channel: `collate` turns `Sample`s into
tensors, `forward(batch)` returns "loss" and "acc". It has a tied weight (`head.weight` is
`embed.weight`), a processor that saves/loads itself, and dropout (so resume must restore RNG).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from visto.data.sample import Sample, Turn

COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]


@dataclass
class TinyConfig:
    hidden: int = 8
    num_classes: int = 3
    dropout: float = 0.1


class TinyProcessor:
    """Scales pixels by `scale`; saved as tiny_processor.json."""

    def __init__(self, scale: float = 1 / 255) -> None:
        self.scale = scale

    def save(self, directory: str | Path) -> None:
        (Path(directory) / "tiny_processor.json").write_text(json.dumps({"scale": self.scale}))

    @classmethod
    def load(cls, directory: str | Path) -> TinyProcessor:
        return cls(**json.loads((Path(directory) / "tiny_processor.json").read_text()))


class TinyModel(nn.Module):
    family = "tiny"

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.processor = TinyProcessor()
        self.stem = nn.Linear(3, config.hidden)
        self.body = nn.Sequential(nn.GELU(), nn.Dropout(config.dropout), nn.LayerNorm(config.hidden))
        # A class-embedding table used both as input embedding and output head (tied).
        self.embed = nn.Embedding(config.num_classes, config.hidden)
        self.head = nn.Linear(config.hidden, config.num_classes, bias=False)
        self.head.weight = self.embed.weight

    def collate(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([
            torch.from_numpy(np.asarray(s.images[0], dtype=np.float32)).reshape(-1, 3) for s in samples
        ])  # (B, H*W, 3)
        labels = torch.tensor([s.truth["label"] for s in samples])
        return {"pixels": pixels * self.processor.scale, "labels": labels}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.body(self.stem(batch["pixels"]).mean(dim=1))  # (B, hidden)
        logits = self.head(x)  # (B, classes)
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        return {"loss": loss, "acc": acc, "logits": logits}


def make_samples(n: int, seed: int, split: str = "train") -> list[Sample]:
    rng = random.Random(f"{seed}/{split}")
    samples = []
    for i in range(n):
        label = rng.randrange(len(COLOURS))
        base = COLOURS[label]
        image = Image.new("RGB", (4, 4))
        image.putdata([tuple(min(255, max(0, c + rng.randint(-60, 60))) for c in base) for _ in range(16)])
        samples.append(Sample(
            id=f"{split}-{i}", images=[image],
            turns=[Turn("user", "<image>\nWhich colour?"), Turn("assistant", str(label))],
            truth={"label": label},
        ))
    return samples


def tiny_source(n_train: int = 48, n_val: int = 16, seed: int = 0):
    data = {"train": make_samples(n_train, seed, "train"), "val": make_samples(n_val, seed, "val")}
    return lambda split: iter(data[split])


@pytest.fixture
def tiny_family(monkeypatch):
    """Register the "tiny" family in visto.models.FAMILIES for the test's duration."""
    from visto.models import FAMILIES

    monkeypatch.setitem(FAMILIES, "tiny", (TinyConfig, TinyModel))
    return FAMILIES


def test_fixture_model_follows_the_protocol():
    torch.manual_seed(0)
    model = TinyModel(TinyConfig())
    batch = model.collate(make_samples(5, seed=1))
    assert batch["pixels"].shape == (5, 16, 3)
    out = model(batch)
    assert out["loss"].ndim == 0 and 0 <= out["acc"].item() <= 1
    assert model.head.weight is model.embed.weight
