"""Evaluation of two-tower (CLIP-family) models: zero-shot classification, retrieval, clustering.

The metric functions take plain tensors and know nothing of models or data, so each one can
be checked on a hand-made input. `evaluate_two_tower` at the bottom wires them to a model and
to the synthetic world and returns the flat `eval.json` dict:

    zeroshot.shape  zeroshot.colour  zeroshot.class              accuracy per attribute
    zeroshot.shape_via_pair  zeroshot.colour_via_pair             read off the class prediction
    retrieval.t2i.r1/r5/r10  retrieval.i2t.r1/r5/r10             recall@K, caption <-> image
    cluster.purity  cluster.nmi                                   k-means on image embeddings
    heldout.<any of the above>                                    the unseen colour-shape pairs
    paraphrase.zeroshot.*                                         with --paraphrase
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from visto.eval import EvalResult
from visto.tasks.classify import (
    DEFAULT_TEMPLATES,
    TEMPLATE_SETS,
    EmbedTexts,
    class_text_embeddings,
)

RECALL_KS: tuple[int, ...] = (1, 5, 10)


# --------------------------------------------------------------------------- zero-shot


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


# --------------------------------------------------------------------------- the world


@dataclass
class SplitData:
    """The first `n` images of a split with what the metrics need from their ground truth."""

    split: str
    images: list  # PIL images
    captions: RetrievalSet
    single: list[int]  # indices of one-object images: one right answer for zero-shot
    labels: list[dict]  # truth["label"] per image: {"shape", "colour", "class", "single"}


def load_split(data_dir: str | os.PathLike, split: str, n: int) -> SplitData:
    from visto.data.images import open_image
    from visto.data.synth import iter_records

    root = Path(data_dir)
    images, labels, captions, owner = [], [], [], []
    for i, record in enumerate(iter_records(root, split)):
        if i >= n:
            break
        images.append(open_image(root / record["image"]))
        labels.append(record["truth"]["label"])
        for caption in record["tasks"]["captions"]:
            captions.append(caption)
            owner.append(i)
    single = [i for i, lab in enumerate(labels) if lab.get("single")]
    return SplitData(split, images, RetrievalSet(captions, owner, len(images)), single, labels)


def embed_in_batches(
    embed: Callable[[list], torch.Tensor], items: Sequence, batch_size: int
) -> torch.Tensor:
    """embed(items) in batches, concatenated on the CPU in fp32: (N, D)."""
    assert len(items) > 0, "nothing to embed"
    with torch.inference_mode():
        parts = [
            embed(list(items[i : i + batch_size])).float().cpu()
            for i in range(0, len(items), batch_size)
        ]
    return torch.cat(parts)


def zero_shot_metrics(
    image_emb: torch.Tensor,
    labels: Sequence[dict],
    vocab: dict[str, list[str]],
    embed_texts: EmbedTexts,
    templates: Sequence[str],
) -> dict[str, float]:
    """Accuracy per attribute: shape (classes = shapes), colour, and the joint "colour shape"
    class among all colour x shape pairs (held-out pairs included: they are valid answers).

    Also each attribute read off the joint prediction (`zeroshot.shape_via_pair`: the shape of
    the best "colour shape" prompt), as compositional zero-shot work scores attributes. A
    prompt that names one attribute alone ("a photo of a circle.") carries what training
    taught about the other: no training image shows an orange circle, so "circle" learns to
    point away from orange, and an orange circle scores higher with "hexagon". Naming both
    attributes removes that prior; the gap between the two figures on held-out pairs measures it.
    """
    shapes, colours = vocab["shapes"], vocab["colours"]
    classes = [f"{c} {s}" for s in shapes for c in colours]
    out, preds, targets = {}, {}, {}
    for attribute, names in (("shape", shapes), ("colour", colours), ("class", classes)):
        targets[attribute] = torch.tensor([names.index(lab[attribute]) for lab in labels])
        preds[attribute] = zero_shot_classify(image_emb, names, embed_texts, templates)
        out[f"zeroshot.{attribute}"] = accuracy(preds[attribute], targets[attribute])
    # classes[k] is colour k % C of shape k // C.
    pair = preds["class"]
    out["zeroshot.shape_via_pair"] = accuracy(pair // len(colours), targets["shape"])
    out["zeroshot.colour_via_pair"] = accuracy(pair % len(colours), targets["colour"])
    return out


def evaluate_two_tower(
    model: Any,
    data_dir: str | os.PathLike,
    *,
    split: str = "test",
    n: int = 1000,
    templates: Sequence[str] = TEMPLATE_SETS[DEFAULT_TEMPLATES],
    paraphrase: bool = False,
    batch_size: int = 64,
    seed: int = 0,
    log: Callable[[str], None] = lambda _msg: None,
) -> EvalResult:
    """Zero-shot, retrieval and clustering on `split` and on the held-out split.

    `model` needs embed_images(list[PIL]) and embed_texts(list[str]) returning (N, D).
    Zero-shot and clustering use the one-object images among the first `n` (the world's
    label rule: they have exactly one right answer); retrieval uses all `n` and their
    captions (three per image).
    """
    from visto.data.synth import load_world

    world = load_world(data_dir)
    vocab = {"shapes": list(world["vocab"]["shapes"]), "colours": list(world["vocab"]["colours"])}
    runs = [(split, "heldout." if split == "heldout" else "")]
    if split != "heldout":
        runs.append(("heldout", "heldout."))
    metrics: dict[str, float] = {}
    notes: list[str] = [f"templates: {' | '.join(templates)}"]
    model.eval()
    for split_name, prefix in runs:
        data = load_split(data_dir, split_name, n)
        if not data.images:
            notes.append(f"split {split_name!r} is empty: no {prefix or 'seen'} figures")
            continue
        log(
            f"{split_name}: embedding {len(data.images)} images and {len(data.captions.captions)} captions"
        )
        image_emb = embed_in_batches(model.embed_images, data.images, batch_size)  # (N, D)
        text_emb = embed_in_batches(model.embed_texts, data.captions.captions, batch_size)
        part = retrieval_metrics(image_emb, text_emb, data.captions)
        notes.append(
            f"{split_name}: retrieval over {len(data.images)} images and "
            f"{len(data.captions.captions)} captions; zero-shot and clustering over "
            f"{len(data.single)} one-object images"
        )
        if data.single:
            single_emb = image_emb[data.single]
            single_labels = [data.labels[i] for i in data.single]

            def embed_texts(texts: list[str]) -> torch.Tensor:
                return embed_in_batches(model.embed_texts, texts, batch_size)

            part.update(zero_shot_metrics(single_emb, single_labels, vocab, embed_texts, templates))
            if paraphrase:
                para = zero_shot_metrics(
                    single_emb, single_labels, vocab, embed_texts, TEMPLATE_SETS["paraphrase"]
                )
                part.update({f"paraphrase.{k}": v for k, v in para.items()})
            if len(data.single) >= 2:
                part.update(
                    cluster_metrics(single_emb, [lab["class"] for lab in single_labels], seed)
                )
        metrics.update({prefix + k: v for k, v in part.items()})
    if paraphrase:
        notes.append(paraphrase_sentence(metrics))
    return EvalResult(metrics=metrics, notes=notes)


def paraphrase_sentence(metrics: dict[str, float]) -> str:
    """One sentence on what changes when the prompts leave the training captions' phrasing."""
    changes = []
    for prefix, where in (("", "seen"), ("heldout.", "held-out")):
        for attr in ("shape", "colour", "class"):
            a = metrics.get(f"{prefix}zeroshot.{attr}")
            b = metrics.get(f"{prefix}paraphrase.zeroshot.{attr}")
            if a is not None and b is not None:
                changes.append(f"{where} {attr} {a:.3f} -> {b:.3f} ({100 * (b - a):+.1f} pts)")
    if not changes:
        return "paraphrased prompts: no zero-shot figures to compare"
    return (
        "With paraphrased prompts that no training caption uses, zero-shot accuracy moves: "
        + "; ".join(changes)
        + "."
    )
