"""The two-tower evaluation wired to a generated world, and the report it writes.

The model here is a hand-written two-tower: images embed as the histogram of their saturated
pixels over the world's palette, texts as the colour words they contain. It sees colour and
nothing else, so the evaluation must find zero-shot colour right on one-object images and
shape no better than guessing one class: a check of the wiring against the ground truth that
a learned model could not give (its accuracy is unknown in advance).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visto.data.synth import COLOURS, WorldConfig, generate_world
from visto.eval.report import metrics_table, write_report
from visto.eval.twotower import evaluate_two_tower
from visto.tasks.classify import TEMPLATE_SETS, fill_template

PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # (8, 3)
NAMES = list(COLOURS)


class PaletteTwoTower(torch.nn.Module):
    family = "clip"

    def embed_images(self, images) -> torch.Tensor:
        rows = []
        for im in images:
            px = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).view(-1, 3)
            saturated = px[(px.max(dim=1).values - px.min(dim=1).values) > 90]
            counts = torch.zeros(len(NAMES))
            if len(saturated):
                nearest = torch.cdist(saturated, PALETTE).argmin(dim=1)
                counts += torch.bincount(nearest, minlength=len(NAMES)).float()
            rows.append(counts + 1e-3)
        return F.normalize(torch.stack(rows), dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for t in texts:
            words = set(re.findall(r"[a-z]+", t.lower()))
            rows.append(torch.tensor([1.0 if c in words else 0.0 for c in NAMES]) + 1e-3)
        return F.normalize(torch.stack(rows), dim=-1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    cfg = WorldConfig(
        n=48,
        size=64,
        seed=3,
        background="plain",
        single_object_fraction=0.6,
        splits={"train": 0.2, "val": 0.05, "test": 0.4, "heldout": 0.35},
    )
    generate_world(cfg, root)
    return root


def test_fill_template_fixes_the_article():
    assert fill_template("a photo of a {}.", "orange circle") == "a photo of an orange circle."
    assert fill_template("a {} here.", "red star") == "a red star here."


def test_paraphrase_templates_share_no_phrase_with_training_captions(world):
    captions = [
        c.lower()
        for line in (world / "train.jsonl").read_text().splitlines()
        for c in json.loads(line)["tasks"]["captions"]
    ]

    def trigrams(text: str) -> set[tuple[str, ...]]:
        w = re.findall(r"[a-z]+|\{\}", text)
        return {tuple(w[i : i + 3]) for i in range(len(w) - 2)}

    seen = set().union(*(trigrams(c) for c in captions))
    for t in TEMPLATE_SETS["paraphrase"]:
        frame = {g for g in trigrams(t) if "{}" not in g}
        assert not frame & seen, (t, frame & seen)


def test_evaluate_two_tower_on_a_world(world, tmp_path):
    result = evaluate_two_tower(PaletteTwoTower(), world, n=100, paraphrase=True)
    m = result.metrics
    for prefix in ("", "heldout."):
        for name in (
            "zeroshot.shape",
            "zeroshot.colour",
            "zeroshot.class",
            "paraphrase.zeroshot.colour",
            "retrieval.t2i.r1",
            "retrieval.t2i.r5",
            "retrieval.t2i.r10",
            "retrieval.i2t.r1",
            "retrieval.i2t.r5",
            "retrieval.i2t.r10",
            "cluster.purity",
            "cluster.nmi",
        ):
            assert prefix + name in m, prefix + name
    # eval.json is flat: name -> number.
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in m.items())
    json.dumps(m)
    # A colour-only model: colour right on one-object images, seen and held-out alike ...
    assert m["zeroshot.colour"] >= 0.9 and m["heldout.zeroshot.colour"] >= 0.9
    assert m["paraphrase.zeroshot.colour"] >= 0.9
    # ... and shape prompts all embed alike, so every image gets the first shape.
    assert m["zeroshot.shape"] < 0.6
    for d in ("t2i", "i2t"):
        r = [m[f"retrieval.{d}.r{k}"] for k in (1, 5, 10)]
        assert r == sorted(r) and r[0] > 0
    assert 0 <= m["cluster.nmi"] <= 1 and 0 < m["cluster.purity"] <= 1
    assert any(n.startswith("With paraphrased prompts") for n in result.notes)

    curve = [{"step": s, "loss": 4.0 / (s + 1), "lr": 1e-3} for s in range(20)]
    report = write_report(tmp_path, "test report", m, result.notes, curve)
    text = report.read_text()
    assert "| `zeroshot.colour` |" in text and "held-out" in text
    pngs = re.findall(r"\]\(([^)]+\.png)\)", text)
    assert "zeroshot.png" in pngs and "curve.png" in pngs
    for png in pngs:
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_table_pairs_seen_and_heldout():
    table = metrics_table({"zeroshot.shape": 0.5, "heldout.zeroshot.shape": 0.25, "x.y": math.nan})
    assert "| `zeroshot.shape` | 0.500 | 0.250 |" in table
    assert "| `x.y` | – | – |" in table


def test_attributes_read_off_the_pair_prompts_escape_a_learned_colour_prior():
    """A model whose shape-only prompts learned "circle is never orange" (as training without
    orange circles teaches): an orange circle scores higher with another shape's prompt, while
    the "orange circle" pair prompt still wins among the pairs."""
    from visto.eval.twotower import zero_shot_metrics

    shapes, colours = ["circle", "star", "hexagon"], ["orange", "blue", "red"]
    never = {"circle": "orange", "star": "red", "hexagon": "blue"}  # the held-out pairs

    def onehot(word: str) -> torch.Tensor:
        return F.one_hot(torch.tensor((shapes + colours).index(word)), 6).float()

    def embed_texts(texts: list[str]) -> torch.Tensor:
        rows = []
        for t in texts:
            words = re.findall(r"[a-z]+", t.lower())
            shape = next((w for w in words if w in shapes), None)
            colour = next((w for w in words if w in colours), None)
            if shape is None:  # a colour prompt
                rows.append(onehot(colour))
            elif colour is None:  # a shape prompt, with the prior
                rows.append(onehot(shape) - 2.0 * onehot(never[shape]))
            else:
                rows.append(onehot(shape) + onehot(colour))
        return F.normalize(torch.stack(rows), dim=-1)

    labels = [{"shape": s, "colour": c, "class": f"{c} {s}"} for s, c in never.items()]
    images = F.normalize(
        torch.stack([onehot(lab["shape"]) + onehot(lab["colour"]) for lab in labels]), dim=-1
    )
    m = zero_shot_metrics(images, labels, {"shapes": shapes, "colours": colours}, embed_texts,
                          ["a photo of a {}."])  # fmt: skip
    assert m["zeroshot.shape"] == 0.0  # every held-out image gets another shape
    assert (
        m["zeroshot.class"] == m["zeroshot.shape_via_pair"] == m["zeroshot.colour_via_pair"] == 1.0
    )
