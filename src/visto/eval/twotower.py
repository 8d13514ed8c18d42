"""Evaluation of two-tower (CLIP-family) models: zero-shot classification, retrieval, clustering.

The metric functions take plain tensors and know nothing of models or data, so each one can
be checked on a hand-made input. `evaluate_two_tower` at the bottom wires them to a model and
to the synthetic world and returns the flat `eval.json` dict:

    zeroshot.shape  zeroshot.colour  zeroshot.class              accuracy per attribute
    retrieval.t2i.r1/r5/r10  retrieval.i2t.r1/r5/r10             recall@K, caption <-> image
    cluster.purity  cluster.nmi                                   k-means on image embeddings
    heldout.<any of the above>                                    the unseen colour-shape pairs
    paraphrase.zeroshot.*                                         with --paraphrase
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

EmbedTexts = Callable[[list[str]], torch.Tensor]

# Prompt templates. CLIP (Radford et al. 2021, §3.1.4) found that "A photo of a {label}."
# beats the bare label, and that averaging the text embeddings of many templates
# ("prompt ensembling") adds more; `ensemble` is that idea at the scale of our world.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "single": ("a photo of a {}.",),
    "ensemble": (
        "a photo of a {}.",
        "a {} in the picture.",
        "an image with a {}.",
        "a picture of a {}.",
        "there is a {}.",
    ),
    # Phrasings chosen to share no frame with the world's captions: what a model that learned
    # the concepts (not the caption grammar) should still match. Used by `visto eval --paraphrase`.
    "paraphrase": (
        "somewhere in this drawing you can spot a {}.",
        "look closely: a {} appears here.",
        "this artwork features one {}.",
        "my favourite thing in the scene is the {}.",
        "a rendering that includes a {}.",
    ),
}
DEFAULT_TEMPLATES = "ensemble"
RECALL_KS: tuple[int, ...] = (1, 5, 10)


# --------------------------------------------------------------------------- zero-shot


def class_text_embeddings(
    class_names: Sequence[str], embed_texts: EmbedTexts, templates: Sequence[str]
) -> torch.Tensor:
    """One unit vector per class: the mean of its normalized template embeddings, renormalized.

    This is CLIP's prompt ensemble (§3.1.4): averaging in embedding space costs one text
    embedding per class at test time, however many templates there are.
    """
    assert class_names and templates, "need at least one class and one template"
    for t in templates:
        assert t.count("{}") == 1, f"template {t!r} must contain exactly one '{{}}'"
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = F.normalize(embed_texts(prompts).float(), dim=-1)  # (C*T, D)
    emb = emb.view(len(class_names), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(emb, dim=-1)


def zero_shot_classify(
    image_emb: torch.Tensor,
    class_names: Sequence[str],
    embed_texts: EmbedTexts,
    templates: Sequence[str],
) -> torch.Tensor:
    """Index into `class_names` of the most similar class prompt for each image, (N,)."""
    assert image_emb.dim() == 2, f"image_emb must be (N, D), got {tuple(image_emb.shape)}"
    classes = class_text_embeddings(class_names, embed_texts, templates)  # (C, D)
    assert classes.shape[1] == image_emb.shape[1], "image and text embeddings differ in width"
    sim = F.normalize(image_emb.float(), dim=-1) @ classes.T  # (N, C)
    return sim.argmax(dim=1)


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    assert pred.shape == target.shape and pred.dim() == 1, (pred.shape, target.shape)
    if pred.numel() == 0:
        return float("nan")
    return (pred == target).float().mean().item()


# --------------------------------------------------------------------------- retrieval


def recall_at_k(
    sim: torch.Tensor, positives: torch.Tensor, ks: Sequence[int] = RECALL_KS
) -> dict[int, float]:
    """Fraction of queries with at least one positive among the top K of the gallery.

    sim: (Q, G) query-to-gallery scores; positives: (Q, G) bool, every row with >= 1 True.
    A positive's rank is the number of *negatives* scoring at least as high as it (ties count
    against the query, so a collapsed model whose scores are all equal gets no credit), and
    a query's rank is that of its best positive.
    """
    assert sim.shape == positives.shape and sim.dim() == 2, (sim.shape, positives.shape)
    assert bool(positives.any(dim=1).all()), "every query needs at least one positive"
    sim = sim.float()
    neg_inf = torch.finfo(sim.dtype).min
    # Best positive score per query, then count negatives at or above it.
    best_pos = sim.masked_fill(~positives, neg_inf).max(dim=1, keepdim=True).values  # (Q, 1)
    rank = ((sim >= best_pos) & ~positives).sum(dim=1)  # (Q,)
    return {k: (rank < k).float().mean().item() for k in ks}


@dataclass
class RetrievalSet:
    """A gallery of images and their captions, several per image, possibly repeated strings.

    caption_image[j] is the index of the image that caption j was written for.
    """

    captions: list[str]
    caption_image: list[int]
    num_images: int

    def __post_init__(self) -> None:
        assert len(self.captions) == len(self.caption_image)
        assert all(0 <= i < self.num_images for i in self.caption_image)


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    gallery: RetrievalSet,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Image->text and text->image recall@K.

    text->image: every caption is a query; the hit is the image it was written for (even when
    another image has the same caption: that one is a different image).
    image->text: every image is a query against the *distinct* caption strings; any string
    that is one of its captions counts. Deduplicating matters in a world where "a red circle."
    describes many images: otherwise an identical string of another image, with an identical
    embedding, would tie with the image's own caption and count against it.
    """
    n_img = gallery.num_images
    assert image_emb.shape[0] == n_img, (image_emb.shape, n_img)
    assert text_emb.shape[0] == len(gallery.captions), (text_emb.shape, len(gallery.captions))
    image_emb = F.normalize(image_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.float(), dim=-1)
    owner = torch.tensor(gallery.caption_image)

    t2i_pos = owner[:, None] == torch.arange(n_img)[None, :]  # (T, I)
    t2i = recall_at_k(text_emb @ image_emb.T, t2i_pos, ks)

    unique: dict[str, int] = {}
    for c in gallery.captions:
        unique.setdefault(c, len(unique))
    first_row = torch.tensor([gallery.captions.index(c) for c in unique])
    i2t_pos = torch.zeros(n_img, len(unique), dtype=torch.bool)  # (I, U)
    for caption, img in zip(gallery.captions, gallery.caption_image, strict=True):
        i2t_pos[img, unique[caption]] = True
    i2t = recall_at_k(image_emb @ text_emb[first_row].T, i2t_pos, ks)

    out = {f"retrieval.t2i.r{k}": v for k, v in t2i.items()}
    out.update({f"retrieval.i2t.r{k}": v for k, v in i2t.items()})
    return out


# --------------------------------------------------------------------------- clustering


def purity(cluster_ids: Sequence[int] | np.ndarray, labels: Sequence[Any]) -> float:
    """Share of points whose cluster's majority label is their own label (1.0 = pure)."""
    clusters = np.asarray(cluster_ids)
    labels_arr = np.asarray(labels)
    assert clusters.shape == labels_arr.shape and clusters.ndim == 1
    if clusters.size == 0:
        return float("nan")
    total = 0
    for c in np.unique(clusters):
        _, counts = np.unique(labels_arr[clusters == c], return_counts=True)
        total += counts.max()
    return float(total / clusters.size)


def cluster_metrics(
    embeddings: torch.Tensor, labels: Sequence[Any], seed: int = 0, k: int | None = None
) -> dict[str, float]:
    """k-means on the (normalized) embeddings with k = number of distinct labels by default;
    purity and normalized mutual information (NMI) of the clusters against the labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    x = F.normalize(embeddings.float(), dim=-1).cpu().numpy().astype(np.float64)
    assert x.shape[0] == len(labels), (x.shape, len(labels))
    k = k or len(set(labels))
    k = max(1, min(k, x.shape[0]))
    ids = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return {
        "cluster.purity": purity(ids, labels),
        "cluster.nmi": float(normalized_mutual_info_score(list(labels), ids)),
    }
