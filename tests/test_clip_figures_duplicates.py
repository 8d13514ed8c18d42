"""Identical captions (and the same image twice) in one batch are not negatives: values by hand."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from visto.data.processor import Processor, ProcessorConfig
from visto.data.sample import Sample
from visto.data.tokenizer import train_tokenizer
from visto.losses import batch_ids, clip_loss, pair_positives, siglip_loss
from visto.models import build_model
from visto.models.clip import CLIPConfig

# Three unit images and three unit texts in 2-D; texts 0 and 2 are the same caption
# ("One shape: a circle."), so they have the same embedding.
IMG = [[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]
TXT = [[0.6, 0.8], [0.0, 1.0], [0.6, 0.8]]
SCALE = 2.0
CAPTION_IDS = [0, 1, 0]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def ce(row, target, keep):
    """Cross-entropy of `row` at `target` over the entries whose index is in `keep`."""
    return -row[target] + math.log(sum(math.exp(row[k]) for k in keep))


def test_pair_positives_from_caption_and_image_ids():
    captions = torch.tensor([0, 1, 0, 2])
    images = torch.tensor([0, 1, 2, 1])  # samples 1 and 3: the same image, two captions
    got = pair_positives(captions, images)
    expected = torch.tensor(
        [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(got, expected)
    assert torch.equal(batch_ids(["b", "a", "b", "c"]), torch.tensor([0, 1, 0, 2]))


def test_clip_loss_drops_identical_captions_from_the_negatives_by_hand():
    L = [[SCALE * dot(i, t) for t in TXT] for i in IMG]
    # Row i keeps its own text and every text that is not a duplicate of it.
    keep = [[j for j in range(3) if j == i or CAPTION_IDS[j] != CAPTION_IDS[i]] for i in range(3)]
    i2t = sum(ce(L[i], i, keep[i]) for i in range(3)) / 3
    cols = [[L[i][j] for i in range(3)] for j in range(3)]  # column j: text j against images
    t2i = sum(ce(cols[j], j, keep[j]) for j in range(3)) / 3
    expected = (i2t + t2i) / 2

    positives = pair_positives(torch.tensor(CAPTION_IDS))
    got = clip_loss(torch.tensor(IMG), torch.tensor(TXT), torch.tensor(SCALE), positives)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # Without the mask the duplicate counts as a negative: a different (larger) loss.
    plain = clip_loss(torch.tensor(IMG), torch.tensor(TXT), torch.tensor(SCALE))
    assert plain.item() > got.item() + 0.1


def test_a_perfect_model_reaches_zero_loss_only_with_the_mask():
    # Two images with the same caption, embedded perfectly: image i == its text.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    txt = img.clone()
    positives = pair_positives(torch.tensor([0, 1, 0]))
    scale = torch.tensor(100.0)
    assert clip_loss(img, txt, scale, positives).item() == pytest.approx(0.0, abs=1e-6)
    # Unmasked, images 0 and 2 can at best split their probability between two equal texts.
    assert clip_loss(img, txt, scale).item() == pytest.approx(2 / 3 * math.log(2), abs=1e-4)


def test_siglip_loss_labels_duplicates_positive_by_hand():
    bias = -1.5
    L = [[SCALE * dot(i, t) for t in TXT] for i in IMG]
    total = 0.0
    for i in range(3):
        for j in range(3):
            label = 1.0 if CAPTION_IDS[i] == CAPTION_IDS[j] else -1.0
            total += -math.log(1 / (1 + math.exp(-label * (L[i][j] + bias))))
    positives = pair_positives(torch.tensor(CAPTION_IDS))
    got = siglip_loss(
        torch.tensor(IMG), torch.tensor(TXT), torch.tensor(SCALE), torch.tensor(bias), positives
    )
    assert got.item() == pytest.approx(total / 3, abs=1e-6)


def test_collate_marks_duplicates_and_forward_counts_them_as_hits():
    texts = ["One shape: a circle.", "One shape: a square."] * 3
    config = ProcessorConfig(image_size=32, resize_mode="resize", loc_bins=4, vocab_size=300)
    processor = Processor(
        config, train_tokenizer(texts, vocab_size=300, loc_bins=4, min_frequency=1)
    )
    model = build_model("clip", CLIPConfig.preset("tiny"), seed=0)
    model.processor = processor
    red = Image.new("RGB", (32, 32), (220, 30, 30))
    blue = Image.new("RGB", (32, 32), (30, 60, 215))
    samples = [
        Sample("a-0", [red], truth={"caption": texts[0], "image_id": "a"}),
        Sample("b-0", [blue], truth={"caption": texts[1], "image_id": "b"}),
        Sample("c-0", [red], truth={"caption": texts[0], "image_id": "c"}),
        Sample("b-1", [blue], truth={"caption": "Two words.", "image_id": "b"}),
    ]
    batch = model.collate(samples)
    assert batch["caption_ids"].tolist() == [0, 1, 0, 2]
    assert batch["image_ids"].tolist() == [0, 1, 2, 1]
    out = model(batch)
    expected_loss = clip_loss(
        model.encode_image(batch["pixel_values"]),
        model.encode_text_tokens(batch["input_ids"], batch["attention_mask"]),
        model.current_logit_scale(),
        pair_positives(batch["caption_ids"], batch["image_ids"]),
    )
    assert out["loss"].item() == pytest.approx(expected_loss.item(), abs=1e-6)
    # Samples 0 and 2 are the same picture with the same caption: whichever of the two the
    # model picks, it is right, so at least those two rows are hits.
    assert out["acc_i2t"].item() >= 0.5 - 1e-6
