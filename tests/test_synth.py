"""The synthetic world: determinism, held-out disjointness, and ground truth that agrees with itself.

Every check reads the files on disk (jsonl, PNG images, PNG masks), not the generator's
in-memory objects, so what is tested is what a trainer reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visto.data.synth import (
    COLOURS,
    SPLITS,
    WorldConfig,
    generate_world,
    heldout_pairs,
    iter_records,
    iter_samples,
    load_world,
)
from visto.data.synth.tasks import centre, reading_order
from visto.errors import UserError


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "world"
    generate_world(WorldConfig(n=120, seed=3), out, workers=1)
    return out


def all_records(world: Path) -> list[dict]:
    return [r for s in SPLITS for r in iter_records(world, s)]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    cfg = WorldConfig(n=30, seed=7)
    generate_world(cfg, tmp_path / "a", workers=1)
    generate_world(cfg, tmp_path / "b", workers=2)
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert len(a) == 2 * 30 + 4 + 1  # images, masks, 4 jsonl, world.json
    assert a == b
    generate_world(WorldConfig(n=30, seed=8), tmp_path / "c", workers=1)
    c = tree_bytes(tmp_path / "c")
    assert a["images/000000.png"] != c["images/000000.png"]


def test_world_json_and_split_counts(world):
    meta = load_world(world)
    assert meta["counts"] == {"train": 96, "val": 6, "test": 6, "heldout": 12}
    for split in SPLITS:
        assert sum(1 for _ in iter_records(world, split)) == meta["counts"][split]
    assert len(meta["vocab"]["shapes"]) >= 6 and len(meta["vocab"]["colours"]) == 8
    pairs = {tuple(p) for p in meta["heldout_pairs"]}
    assert pairs == set(heldout_pairs())
    assert 0.10 <= len(pairs) / (len(meta["vocab"]["shapes"]) * 8) <= 0.15


def test_heldout_pairs_never_appear_outside_heldout(world):
    held = {tuple(p) for p in load_world(world)["heldout_pairs"]}
    phrases = [f"{c} {s}" for c, s in held]
    seen_in_heldout = set()
    for split in SPLITS:
        for record in iter_records(world, split):
            pairs = {(o["colour"], o["shape"]) for o in record["truth"]["objects"]}
            if split == "heldout":
                assert pairs & held, f"heldout image {record['id']} has no held-out object"
                seen_in_heldout |= pairs & held
            else:
                assert not pairs & held, f"{split} image {record['id']} shows {pairs & held}"
                # Not even in words: no caption, question or answer names a held-out pair.
                text = json.dumps(record["tasks"])
                assert not any(p in text for p in phrases), record["id"]
    assert len(seen_in_heldout) >= 3


def test_boxes_masks_and_pixels_agree(world):
    for record in all_records(world):
        truth = record["truth"]
        w, h = truth["width"], truth["height"]
        image = np.asarray(Image.open(world / record["image"]).convert("RGB"))
        mask = np.asarray(Image.open(world / record["mask"]))
        assert image.shape == (h, w, 3) and mask.shape == (h, w)
        assert mask.max() == len(truth["objects"])
        for i, obj in enumerate(truth["objects"]):
            x1, y1, x2, y2 = obj["box"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert all(0 <= v <= 999 for v in obj["box_norm"])
            ys, xs = np.nonzero(mask == i + 1)
            assert len(xs) > 0, f"object {i} of {record['id']} is fully hidden"
            assert x1 <= xs.min() and xs.max() < x2 and y1 <= ys.min() and ys.max() < y2
            assert len(xs) / obj["area"] >= 0.4, "an object is hidden beyond recognition"
            # No anti-aliasing and no text over objects: visible pixels have the exact colour.
            assert (image[ys, xs] == COLOURS[obj["colour"]]).all()
        for t in truth["texts"]:
            tx1, ty1, tx2, ty2 = t["box"]
            assert 0 <= tx1 < tx2 <= w and 0 <= ty1 < ty2 <= h
            assert (mask[ty1:ty2, tx1:tx2] == 0).all(), "text overlaps an object"


def test_vqa_answers_follow_from_the_scene(world):
    types = set()
    yes_no = {"yes": 0, "no": 0}
    for record in all_records(world):
        objs = record["truth"]["objects"]
        texts = record["truth"]["texts"]
        for qa in record["tasks"]["vqa"]:
            types.add(qa["type"])
            if qa["a"] in yes_no:
                yes_no[qa["a"]] += 1
            if qa["type"] == "count":
                expected = [
                    o
                    for o in objs
                    if o["shape"] == qa.get("shape", o["shape"])
                    and o["colour"] == qa.get("colour", o["colour"])
                ]
                assert qa["a"] == str(len(expected)), qa
            elif qa["type"] in ("colour", "shape"):
                assert qa["a"] == objs[qa["object"]][qa["type"]]
            elif qa["type"] == "attribute":
                assert qa["a"] == objs[qa["object"]]["size"]
            elif qa["type"] == "exist":
                c, s = qa["probe"]["colour"], qa["probe"]["shape"]
                there = any(o["shape"] == s and (c is None or o["colour"] == c) for o in objs)
                assert qa["a"] == ("yes" if there else "no"), qa
            elif qa["type"] == "relation":
                (xs, ys), (xo, yo) = (
                    centre(objs[qa["subject"]]["box"]),
                    centre(objs[qa["object"]]["box"]),
                )
                holds = {"left": xs < xo, "right": xs > xo, "above": ys < yo, "below": ys > yo}
                assert qa["a"] == ("yes" if holds[qa["relation"]] else "no"), qa
            elif qa["type"] == "read":
                assert qa["a"] == texts[qa["text_index"]]["text"]
    assert types == {"count", "colour", "shape", "exist", "relation", "read", "attribute"}
    assert abs(yes_no["yes"] - yes_no["no"]) <= 0.1 * sum(yes_no.values())


def test_grounding_ocr_json_and_label(world):
    singles = 0
    for record in all_records(world):
        truth, tasks = record["truth"], record["tasks"]
        objs = truth["objects"]
        for g in tasks["ground"]:
            assert json.loads(g["a"]) == objs[g["object"]]["box_norm"]
        assert len(tasks["refdesc"]) == len(objs)
        for r in tasks["refdesc"]:
            o = objs[r["object"]]
            assert (
                str(o["box_norm"]) in r["q"] and r["a"] == f"{o['size']} {o['colour']} {o['shape']}"
            )
        if truth["texts"]:
            assert tasks["ocr"]["a"] == " ".join(t["text"] for t in truth["texts"])
        else:
            assert tasks["ocr"] is None
        target = json.loads(tasks["json"]["a"])
        assert sum(target["counts"].values()) == len(objs) == len(target["objects"])
        assert target["text"] == [t["text"] for t in truth["texts"]]
        label = truth["label"]
        assert tasks["classify"]["a"] == label["class"] == f"{label['colour']} {label['shape']}"
        assert label["single"] == (len(objs) == 1)
        singles += label["single"]
        if label["single"]:
            assert not truth["texts"]
        assert len(tasks["captions"]) >= 3
    assert 0.1 <= singles / len(all_records(world)) <= 0.45


def test_iter_samples_tasks_and_truth(world):
    samples = list(iter_samples(world, "val"))
    tasks = {s.truth["task"] for s in samples}
    assert tasks >= {"caption", "vqa", "ground", "refdesc", "json", "classify"}
    for s in samples:
        assert len(s.images) == 1 and s.images[0].mode == "RGB"
        assert s.num_placeholders() == 1 and s.turns[0].content.startswith("<image>\n")
        assert [t.role for t in s.turns] == ["user", "assistant"]
        assert s.truth["split"] == "val" and "objects" in s.truth and "label" in s.truth
        assert (s.truth["qtype"] is not None) == (s.truth["task"] == "vqa")

    counts = list(iter_samples(world, "val", tasks=["count"]))
    assert counts and all(
        s.truth["qtype"] == "count" and s.turns[1].content.isdigit() for s in counts
    )

    chats = list(iter_samples(world, "val", tasks=["chat"], seed=1))
    assert all(len(s.turns) >= 4 and len(s.turns) % 2 == 0 for s in chats)
    assert [s.turns for s in chats] == [
        s.turns for s in iter_samples(world, "val", tasks=["chat"], seed=1)
    ]

    first = list(iter_samples(world, "train", tasks=["classify"], limit=5))
    assert len(first) == 5


def test_reader_errors_are_user_errors(world, tmp_path):
    with pytest.raises(UserError, match="not a synthetic world"):
        load_world(tmp_path)
    with pytest.raises(UserError, match="unknown split"):
        next(iter_records(world, "dev"))
    with pytest.raises(UserError, match="unknown task"):
        next(iter_samples(world, "train", tasks=["captions"]))


def test_config_validation():
    with pytest.raises(UserError, match="--size"):
        WorldConfig(size=8).validate()
    with pytest.raises(UserError, match="sum to 1"):
        WorldConfig(splits={"train": 0.5, "val": 0.1, "test": 0.1, "heldout": 0.1}).validate()


def test_reading_order_lines_then_left_to_right():
    texts = [
        {"text": "C", "box": [10, 80, 40, 96]},  # second line
        {"text": "B", "box": [70, 12, 100, 30]},  # first line, right (slightly lower)
        {"text": "A", "box": [5, 10, 40, 28]},  # first line, left
    ]
    assert [t["text"] for t in reading_order(texts)] == ["A", "B", "C"]
