"""Losses against values computed by hand (plain Python math) on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch

from visto.losses import clip_loss, itm_loss, lm_loss, siglip_loss

# Two unit image vectors and two unit text vectors in 2-D.
IMG = [[1.0, 0.0], [0.0, 1.0]]
TXT = [[0.6, 0.8], [0.0, 1.0]]
SCALE = 2.0


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def logits_by_hand():
    return [[SCALE * dot(i, t) for t in TXT] for i in IMG]  # [[1.2, 0.0], [1.6, 2.0]]


def ce(row, target):
    return -row[target] + math.log(sum(math.exp(v) for v in row))


def test_clip_loss_by_hand():
    L = logits_by_hand()
    i2t = (ce(L[0], 0) + ce(L[1], 1)) / 2
    cols = [[L[0][0], L[1][0]], [L[0][1], L[1][1]]]
    t2i = (ce(cols[0], 0) + ce(cols[1], 1)) / 2
    expected = (i2t + t2i) / 2
    got = clip_loss(torch.tensor(IMG), torch.tensor(TXT), torch.tensor(SCALE))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_siglip_loss_by_hand():
    bias = -1.5
    L = logits_by_hand()
    total = 0.0
    for i in range(2):
        for j in range(2):
            label = 1.0 if i == j else -1.0
            z = label * (L[i][j] + bias)
            total += -math.log(1 / (1 + math.exp(-z)))
    expected = total / 2
    got = siglip_loss(torch.tensor(IMG), torch.tensor(TXT), torch.tensor(SCALE), torch.tensor(bias))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_itm_loss_by_hand():
    logits, labels = [2.0, -1.0, 0.5], [1, 0, 0]
    expected = 0.0
    for z, y in zip(logits, labels, strict=True):
        p = 1 / (1 + math.exp(-z))
        expected += -(y * math.log(p) + (1 - y) * math.log(1 - p))
    expected /= 3
    assert itm_loss(torch.tensor(logits), torch.tensor(labels)).item() == pytest.approx(
        expected, abs=1e-6
    )


def test_lm_loss_shifts_and_ignores_by_hand():
    # One sequence of 3 positions, vocab 3. Position t predicts labels[t + 1].
    logits = [[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [5.0, 5.0, 5.0]]]
    labels = [[-100, 2, 1]]  # position 0 -> token 2, position 1 -> token 1; position 2 unused
    expected = (ce(logits[0][0], 2) + ce(logits[0][1], 1)) / 2
    got = lm_loss(torch.tensor(logits), torch.tensor(labels))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # Ignored labels contribute nothing; all ignored gives 0, not NaN.
    labels_one = [[-100, -100, 1]]
    got_one = lm_loss(torch.tensor(logits), torch.tensor(labels_one))
    assert got_one.item() == pytest.approx(ce(logits[0][1], 1), abs=1e-6)
    none = lm_loss(torch.tensor(logits, requires_grad=True), torch.full((1, 3), -100))
    assert none.item() == 0.0
    none.backward()


# NegCLIP's hard negatives: one extra text-only vector per caption.
NEG = [[0.8, 0.6], [1.0, 0.0]]


def test_clip_loss_with_hard_negatives_by_hand():
    """Image->text runs over the 2 captions + 2 negatives; text->image over the 2 images."""
    L = logits_by_hand()
    N = [[SCALE * dot(i, n) for n in NEG] for i in IMG]
    i2t = (ce(L[0] + N[0], 0) + ce(L[1] + N[1], 1)) / 2
    cols = [[L[0][0], L[1][0]], [L[0][1], L[1][1]]]
    t2i = (ce(cols[0], 0) + ce(cols[1], 1)) / 2
    got = clip_loss(
        torch.tensor(IMG), torch.tensor(TXT), torch.tensor(SCALE), negative_emb=torch.tensor(NEG)
    )
    assert got.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)
    # A negative that matches an image (the swap made its caption) is no negative of it.
    matches = torch.tensor([[False, True], [False, False]])
    i2t = (ce(L[0] + N[0][:1], 0) + ce(L[1] + N[1], 1)) / 2
    got = clip_loss(
        torch.tensor(IMG), torch.tensor(TXT), torch.tensor(SCALE), None, torch.tensor(NEG), matches
    )
    assert got.item() == pytest.approx((i2t + t2i) / 2, abs=1e-6)


def test_siglip_loss_with_hard_negatives_by_hand():
    """The negatives are 2 x 2 more pairs labelled -1 (+1 where they match an image)."""
    bias = -1.5
    L = logits_by_hand()
    N = [[SCALE * dot(i, n) for n in NEG] for i in IMG]
    matches = [[False, True], [False, False]]

    def nll(z: float, label: float) -> float:
        return -math.log(1 / (1 + math.exp(-label * (z + bias))))

    for mask in (None, matches):
        total = sum(nll(L[i][j], 1.0 if i == j else -1.0) for i in range(2) for j in range(2))
        total += sum(
            nll(N[i][n], 1.0 if mask and mask[i][n] else -1.0) for i in range(2) for n in range(2)
        )
        got = siglip_loss(
            torch.tensor(IMG), torch.tensor(TXT), torch.tensor(SCALE), torch.tensor(bias),
            negative_emb=torch.tensor(NEG),
            negative_positives=None if mask is None else torch.tensor(mask),
        )  # fmt: skip
        assert got.item() == pytest.approx(total / 2, abs=1e-6)


def test_no_hard_negatives_is_the_plain_loss():
    img, txt, scale = torch.tensor(IMG), torch.tensor(TXT), torch.tensor(SCALE)
    none = torch.zeros(0, 2)
    assert torch.equal(clip_loss(img, txt, scale, negative_emb=None), clip_loss(img, txt, scale))
    assert clip_loss(img, txt, scale, negative_emb=none).item() == pytest.approx(
        clip_loss(img, txt, scale).item(), abs=1e-6
    )
    bias = torch.tensor(-1.0)
    assert siglip_loss(img, txt, scale, bias, negative_emb=none).item() == pytest.approx(
        siglip_loss(img, txt, scale, bias).item(), abs=1e-6
    )
