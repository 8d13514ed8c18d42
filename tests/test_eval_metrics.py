"""Two-tower metrics on hand-made embeddings, where the right answer is known by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from visto.eval.twotower import (
    RetrievalSet,
    accuracy,
    cluster_metrics,
    purity,
    recall_at_k,
    retrieval_metrics,
    zero_shot_classify,
)
from visto.tasks.classify import TEMPLATE_SETS, class_text_embeddings

CLASSES = ["circle", "square", "star"]


def one_hot_embedder(dim: int = 4):
    """Embeds a prompt as the one-hot of the class name it contains (dim 3 = no class)."""

    def embed(texts: list[str]) -> torch.Tensor:
        rows = []
        for t in texts:
            v = torch.zeros(dim)
            hits = [i for i, c in enumerate(CLASSES) if c in t]
            v[hits[0] if hits else dim - 1] = 1.0
            rows.append(v)
        return torch.stack(rows)

    return embed


def test_zero_shot_perfectly_separable_is_one():
    embed = one_hot_embedder()
    images = torch.eye(4)[[0, 1, 2, 2, 0]] + 0.05  # near the class axes
    pred = zero_shot_classify(images, CLASSES, embed, TEMPLATE_SETS["ensemble"])
    assert pred.tolist() == [0, 1, 2, 2, 0]
    assert accuracy(pred, torch.tensor([0, 1, 2, 2, 0])) == 1.0


def test_zero_shot_known_confusion():
    # Images of class 1 ("square") are embedded on the circle axis: 2 of the 6 are wrong.
    embed = one_hot_embedder()
    images = torch.eye(4)[[0, 0, 0, 0, 2, 2]]
    target = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = zero_shot_classify(images, CLASSES, embed, ["a photo of a {}."])
    assert accuracy(pred, target) == pytest.approx(4 / 6)


def test_template_ensemble_is_mean_of_normalized_then_renormalized():
    table = {
        "A x": torch.tensor([3.0, 0.0]),  # norm 3: normalizing first must undo its weight
        "B x": torch.tensor([0.0, 1.0]),
        "A y": torch.tensor([1.0, 1.0]),
        "B y": torch.tensor([-1.0, 0.0]),
    }

    def embed(texts):
        return torch.stack([table[t] for t in texts])

    got = class_text_embeddings(["x", "y"], embed, ["A {}", "B {}"])
    # class x: mean(e1, e2) = (0.5, 0.5) -> (1, 1)/sqrt2
    # class y: mean((1,1)/sqrt2, (-1,0)) = ((1/sqrt2 - 1)/2, 1/(2 sqrt2)), then normalized
    s = 1 / math.sqrt(2)
    y = torch.tensor([(s - 1) / 2, s / 2])
    want = torch.stack([torch.tensor([s, s]), y / y.norm()])
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got.norm(dim=1), torch.ones(2))


def test_template_without_slot_is_rejected():
    with pytest.raises(AssertionError):
        class_text_embeddings(["x"], one_hot_embedder(), ["no slot here"])


def test_recall_at_k_hand_made_matrix():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3],  # positive 0 ranked 1st
            [0.5, 0.4, 0.6, 0.1],  # positive 1 ranked 3rd
            [0.2, 0.2, 0.2, 0.2],  # all tied: ties count against the query -> rank 4
        ]
    )
    pos = torch.zeros(3, 4, dtype=torch.bool)
    pos[0, 0] = pos[1, 1] = pos[2, 3] = True
    r = recall_at_k(sim, pos, ks=(1, 2, 3, 4))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: pytest.approx(2 / 3), 4: 1.0}


def test_recall_best_positive_counts_and_other_positives_do_not_push_down():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    pos = torch.tensor([[True, False, True, False]])
    assert recall_at_k(sim, pos, ks=(1,))[1] == 1.0
    pos = torch.tensor([[False, True, True, False]])  # best positive (0.8) has 1 negative above
    assert recall_at_k(sim, pos, ks=(1, 2)) == {1: 0.0, 2: 1.0}


def test_retrieval_with_several_and_duplicate_captions():
    # Three images on three axes. Image 0 has two captions; images 0 and 1 share the
    # string "a red circle." (same text embedding). Image 2's caption points at image 1.
    images = torch.eye(3)
    captions = ["a red circle.", "a big red circle.", "a red circle.", "a blue star."]
    owner = [0, 0, 1, 2]
    text = torch.tensor(
        [
            [1.0, 0.2, 0.0],  # "a red circle." (same vector for both owners)
            [0.9, 0.0, 0.1],
            [1.0, 0.2, 0.0],
            [0.0, 1.0, 0.1],  # the star caption is closest to image 1: a t2i miss at R@1
        ]
    )
    m = retrieval_metrics(images, text, RetrievalSet(captions, owner, 3), ks=(1, 2))
    # t2i: q0 -> img0 rank 1 (hit); q1 -> img0 hit; q2 (owner 1) -> img0 first, img1 second;
    # q3 (owner 2) -> img1 first, img2 second.  R@1 = 2/4, R@2 = 4/4.
    assert m["retrieval.t2i.r1"] == pytest.approx(0.5)
    assert m["retrieval.t2i.r2"] == pytest.approx(1.0)
    # i2t over distinct strings {red circle, big red circle, blue star}:
    # img0: best is "a red circle." (its own) -> hit@1.
    # img1: scores (0.2, 0.0, 1.0): "blue star" (not its) first, "a red circle." (its) 2nd.
    # img2: scores (0, 0.110, 0.0995) after normalizing: "big red circle" edges out its own
    # "blue star" -> rank 2.
    assert m["retrieval.i2t.r1"] == pytest.approx(1 / 3)
    assert m["retrieval.i2t.r2"] == pytest.approx(1.0)


def test_retrieval_collapsed_model_gets_no_credit():
    images = torch.ones(5, 3)
    text = torch.ones(5, 3)
    m = retrieval_metrics(
        images, text, RetrievalSet([f"c{i}" for i in range(5)], list(range(5)), 5)
    )
    assert m["retrieval.t2i.r1"] == 0.0 and m["retrieval.i2t.r1"] == 0.0


def test_purity_on_known_clusterings():
    labels = ["a", "a", "a", "b", "b", "c"]
    assert purity([0, 0, 0, 1, 1, 2], labels) == 1.0
    assert purity([0, 0, 0, 0, 0, 0], labels) == pytest.approx(3 / 6)
    assert purity([0, 0, 1, 1, 1, 1], labels) == pytest.approx((2 + 2) / 6)


def test_cluster_metrics_separated_blobs_are_pure():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=-1) * 10
    labels = [i % 4 for i in range(80)]
    emb = centres[labels] + 0.1 * torch.randn(80, 16, generator=g)
    m = cluster_metrics(emb, labels, seed=0)
    assert m["cluster.purity"] == pytest.approx(1.0)
    assert m["cluster.nmi"] == pytest.approx(1.0)
    # Labels unrelated to the geometry: NMI near 0 and purity well below 1.
    shuffled = [(i * 7 // 3) % 4 for i in range(80)]
    m = cluster_metrics(torch.randn(80, 16, generator=g), shuffled, seed=0)
    assert m["cluster.nmi"] < 0.3
