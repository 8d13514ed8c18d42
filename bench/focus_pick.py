"""Does the question focus pick the object the question names? (the first hop, measured alone)

For every question of the first `--n` images of a world split that names one object (colour,
shape, size, grounding, box -> description, and a relation's subject), asked alone as at
evaluation: the object the focus weights most (`connectors.focus`, on a checkpoint built with
`projector.focus`) against the named object, matched by box IoU >= 0.5 between the detector's
box of the picked slot and the object's true box. Also the weight on the picked slot (how sure
the focus is). For counting questions that name a shape or a colour: how well the scores
separate the objects they count from the others (the share of (counted, other) pairs of
detected objects whose cosines are in that order: 1 = a threshold exists), and how often the
focus's own soft count (sum of sigmoid(score - scale * threshold)) rounds to the answer. The decoder only has to read the picked object when this is high; when it is
low, the answer needs a second search the focus did not do.

    python bench/focus_pick.py runs/f0/stage1/checkpoint --world runs/f0/world --n 100 --json F
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch


def named_questions(record: dict, loc_bins: int) -> list[tuple[str, str, int]]:
    """(type, question, index of the named object) for one image's questions that name one."""
    from visto.data.tokenizer import boxes_to_loc

    t = record["tasks"]
    out = [(qa["type"], qa["q"], qa["object"]) for qa in t["vqa"]
           if qa.get("type") in ("colour", "shape", "attribute") and "object" in qa]  # fmt: skip
    out += [("relation (subject)", qa["q"], qa["subject"]) for qa in t["vqa"] if qa.get("type") == "relation"]
    out += [("ground", g["q"], g["object"]) for g in t["ground"]]
    out += [("refdesc", boxes_to_loc(r["q"], loc_bins), r["object"]) for r in t["refdesc"]]
    return out


def count_stats(focus, model, record, image, objects, truth, embed, stats) -> None:
    """Counting questions of one image that name a shape or a colour: see the module doc."""
    from visto.data.sample import IMAGE_PLACEHOLDER, Sample, Turn

    asks = [qa for qa in record["tasks"]["vqa"] if qa.get("type") == "count" and ("shape" in qa or "colour" in qa)]
    if not asks:
        return
    batch = model.prompt_batch([Sample(str(k), [image], [Turn("user", f"{IMAGE_PLACEHOLDER}\n{qa['q']}")])
                                for k, qa in enumerate(asks)])  # fmt: skip
    _, _, question = focus.questions(batch.input_ids, embed)
    n = question.shape[0]
    tags = objects.tags if objects.count_tags is None else objects.count_tags
    score = focus.scores(question, tags.expand(n, -1, -1))  # (n, S)
    scale = focus.log_scale.exp()
    present = objects.present[0]
    objs = record["truth"]["objects"]
    # Each detected slot -> the true object it found (IoU >= 0.5), or None.
    found = []
    for k in range(present.shape[0]):
        hits = [i for i, box in enumerate(truth) if present[k] and iou(objects.boxes[0, k], box) >= 0.5]
        found.append(hits[0] if hits else None)
    s = stats["count"]
    for qa, row in zip(asks, score, strict=True):
        key = "shape" if "shape" in qa else "colour"
        counted = [k for k, i in enumerate(found) if i is not None and objs[i][key] == qa[key]]
        others = [k for k, i in enumerate(found) if i is not None and objs[i][key] != qa[key]]
        s["questions"] += 1
        s["pairs"] += len(counted) * len(others)
        s["ordered"] += sum(float(row[a] > row[b]) for a in counted for b in others)
        soft = float((torch.sigmoid(row - scale * focus.threshold) * present).sum())
        s["exact"] += float(round(soft) == qa["count"])


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    w = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp(min=0)
    h = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp(min=0)
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union.clamp(min=1e-9))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--world", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from visto.checkpoint import load
    from visto.data.images import open_image
    from visto.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
    from visto.data.synth import iter_records

    t0 = time.time()
    model = load(a.checkpoint).eval()
    connector = model.multi_modal_projector
    if getattr(connector, "focus", None) is None:
        raise SystemExit(f"{a.checkpoint} has no question focus (projector.focus is off)")
    embed = model.language_model.model.embed_tokens
    loc_bins = model.processor.tokenizer.loc_bins
    world = Path(a.world)
    stats: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    with torch.no_grad():
        for r in itertools.islice(iter_records(world, a.split), a.n):
            image = open_image(world / r["image"])
            truth = [torch.tensor(o["box_norm"], dtype=torch.float) / 1000 for o in r["truth"]["objects"]]
            questions = named_questions(r, loc_bins)
            if not questions:
                continue
            samples = [Sample(str(k), [image], [Turn("user", f"{IMAGE_PLACEHOLDER}\n{q}")])
                       for k, (_, q, _) in enumerate(questions)]  # fmt: skip
            batch = model.prompt_batch(samples)
            pixels = batch.pixel_values[:1]  # one image, asked every question
            objects = connector.objects(model.patch_features(pixels), embed)
            _, _, question = connector.focus.questions(batch.input_ids, embed)
            n = question.shape[0]
            weight = connector.focus.attention(
                question, objects.tags.expand(n, -1, -1), objects.present.expand(n, -1)
            )  # (n, S)
            count_stats(connector.focus, model, r, image, objects, truth, embed, stats)
            for (kind, _, target), w in zip(questions, weight, strict=True):
                s = stats[kind]
                s["questions"] += 1
                top = int(w.argmax())
                s["picked"] += float(objects.present[0, top] and iou(objects.boxes[0, top], truth[target]) >= 0.5)
                s["weight"] += float(w[top])
    counting = stats.pop("count", None)
    table = {k: {"questions": int(s["questions"]), "picked": s["picked"] / s["questions"],
                 "top_weight": s["weight"] / s["questions"]} for k, s in sorted(stats.items())}  # fmt: skip
    if counting:
        table["count (names a shape or colour)"] = {
            "questions": int(counting["questions"]),
            "pairs_ordered": counting["ordered"] / max(counting["pairs"], 1),
            "soft_count_exact": counting["exact"] / counting["questions"],
        }
    print(f"{a.checkpoint}: {a.n} {a.split} images, {time.time() - t0:.0f} s, load {os.getloadavg()[0]:.1f}")
    print("| question | questions | focus picks the named object | weight on the pick |")
    print("|---|---:|---:|---:|")
    for k, r in table.items():
        if "picked" in r:
            print(f"| {k} | {r['questions']} | {r['picked']:.3f} | {r['top_weight']:.3f} |")
    if "count (names a shape or colour)" in table:
        c = table["count (names a shape or colour)"]
        print(f"counting, {c['questions']} questions: counted objects score above the others in "
              f"{c['pairs_ordered']:.3f} of pairs; the soft count rounds to the answer {c['soft_count_exact']:.3f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"checkpoint": a.checkpoint, "n": a.n, "types": table}, indent=1))


if __name__ == "__main__":
    main()
