"""Does the question focus pick the object the question names? (the first hop, measured alone)

For every question of the first `--n` images of a world split that names one object (colour,
shape, size, grounding, box -> description, and a relation's subject), asked alone as at
evaluation: the object the focus weights most (`connectors.focus`, on a checkpoint built with
`projector.focus`) against the named object, matched by box IoU >= 0.5 between the detector's
box of the picked slot and the object's true box. Also the weight on the picked slot (how sure
the focus is). The decoder only has to read the picked object when this is high; when it is
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
            for (kind, _, target), w in zip(questions, weight, strict=True):
                s = stats[kind]
                s["questions"] += 1
                top = int(w.argmax())
                s["picked"] += float(objects.present[0, top] and iou(objects.boxes[0, top], truth[target]) >= 0.5)
                s["weight"] += float(w[top])
    table = {k: {"questions": int(s["questions"]), "picked": s["picked"] / s["questions"],
                 "top_weight": s["weight"] / s["questions"]} for k, s in sorted(stats.items())}  # fmt: skip
    print(f"{a.checkpoint}: {a.n} {a.split} images, {time.time() - t0:.0f} s, load {os.getloadavg()[0]:.1f}")
    print("| question | questions | focus picks the named object | weight on the pick |")
    print("|---|---:|---:|---:|")
    for k, r in table.items():
        print(f"| {k} | {r['questions']} | {r['picked']:.3f} | {r['top_weight']:.3f} |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"checkpoint": a.checkpoint, "n": a.n, "types": table}, indent=1))


if __name__ == "__main__":
    main()
