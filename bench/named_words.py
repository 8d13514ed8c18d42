"""What a checkpoint's detector and the question's named words answer alone, before any decoder.

The question focus hands the decoder a count, an existence signal and a relation's truth
computed from the region connector's detections and the attribute words the question names
(`connectors.named.execute`: NS-VQA's filter / count / relate). This script measures those
signals against the world's truth, on the first `--n` images of a split, each question asked
alone as at evaluation:

  - object count exact: the detector finds as many objects as there are (without box NMS, and
    with each `--nms` IoU), and how it errs (one object found twice, two found as one);
  - count: the executed count of the question's subject rounds to the answer;
  - exist: an executed count above 0.5 says "yes" exactly when the answer is yes;
  - relation: the executed relation truth above 0.5 says "yes" exactly when the answer is yes
    (twins told apart by "on the left" / "on the right": `named.by_side`);
  - box -> description: the object a written box names (`named.box_match`) has the described
    size, colour and shape (its most likely ones);
  - read: what the reader read, of the kind the question asks ("What number is written?":
    `named.split_by_kind`), is the answer;
  - the old cosine count (`QuestionFocus`'s soft count), and a hard count (matches above 0.5),
    for comparison, and the count by its true answer (0, 1, 2, 3 and more).

The decoder reaches at most these figures through the focus; its own (bench/image_signal.py,
`visto eval`) say how much of them it learned to read.

    python bench/named_words.py runs/n0/checkpoint --world runs/n0/world --n 200 --exec-nms 0.3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--world", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--nms", type=float, nargs="+", default=[0.3, 0.5], help="box NMS IoUs to compare with none")
    ap.add_argument("--exec-nms", type=float, help="box NMS IoU for the executed answers (default: the checkpoint's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from visto.checkpoint import load
    from visto.connectors.named import AttributeWords, execute, match
    from visto.data.images import open_image
    from visto.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
    from visto.data.synth import iter_records
    from visto.errors import UserError

    t0 = time.time()
    model = load(a.checkpoint).eval()
    connector = model.multi_modal_projector
    focus = getattr(connector, "focus", None)
    if focus is None:
        raise UserError(f"{a.checkpoint} has no question focus (projector.kind regions with focus)")
    words = focus.words or AttributeWords(model.processor.tokenizer)
    embed = model.language_model.model.embed_tokens
    world = Path(a.world)
    saved_nms = connector.box_nms if a.exec_nms is None else a.exec_nms
    settings = [0.0, *a.nms]
    detected: dict[float, Counter] = {nms: Counter() for nms in settings}
    answered: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # type -> [right, asked]
    with torch.no_grad():
        for r in itertools.islice(iter_records(world, a.split), a.n):
            image = open_image(world / r["image"])
            truth = len(r["truth"]["objects"])
            asks = [qa for qa in r["tasks"]["vqa"] if qa.get("type") in ("count", "exist", "relation", "read")]
            asks += [{**qa, "type": "refdesc"} for qa in r["tasks"]["refdesc"]]
            batch = model.prompt_batch([Sample(str(k), [image], [Turn("user", f"{IMAGE_PLACEHOLDER}\n{qa['q']}")])
                                        for k, qa in enumerate(asks or [{"q": "?"}])])  # fmt: skip
            features = model.patch_features(batch.pixel_values[:1])
            for nms in settings:
                connector.box_nms = nms
                found = int(connector.objects(features, embed).present.sum())
                detected[nms][found - truth] += 1
            connector.box_nms = saved_nms
            if not asks:
                continue
            objects = connector.objects(features, embed)
            rows, _, at, real = focus.spans(batch.input_ids)
            P = len(rows)
            attributes, boxes = objects.attributes.expand(P, -1, -1), objects.boxes.expand(P, -1, -1)
            present = objects.present.expand(P, -1)
            uniform = present.float() / present.float().sum(-1, keepdim=True).clamp(min=1)
            named = words.named(batch.input_ids[rows[:, None], at], real.float())
            run = execute(named, attributes, boxes, present, uniform, uniform)
            _, _, question = focus.questions(batch.input_ids, embed)
            tags = objects.count_tags if objects.count_tags is not None else objects.tags
            scale = focus.log_scale.exp()
            cosine = (torch.sigmoid(focus.scores(question, tags.expand(P, -1, -1)) - scale * focus.threshold)
                      * present).sum(-1)  # fmt: skip
            hard = ((match(named.first, attributes) * present) > 0.5).sum(-1)  # matches above 0.5
            read = None
            if connector.read_slots:
                from visto.connectors.focus import read_for_questions

                ids, filled = connector.read_tokens(batch.pixel_values[:1])
                read = read_for_questions([ids.expand(P, -1, -1), filled.expand(P, -1, -1)], named)[0]
            described = describe_objects(attributes[0])
            for p, (qa, count, holds, old, strict) in enumerate(zip(asks, run.count, run.holds, cosine, hard, strict=True)):
                kind = qa["type"]
                if kind == "count":
                    right = round(float(count)) == qa["count"]
                    by_truth = f"count, answer {min(qa['count'], 3)}{'+' if qa['count'] >= 3 else ''}"
                    answered[by_truth][0] += right
                    answered[by_truth][1] += 1
                    answered["count (hard: matches above 0.5)"][0] += int(strict) == qa["count"]
                    answered["count (hard: matches above 0.5)"][1] += 1
                    answered["count (cosine, before)"][0] += round(float(old)) == qa["count"]
                    answered["count (cosine, before)"][1] += 1
                elif kind == "exist":
                    right = (float(count) > 0.5) == (qa["a"] == "yes")
                elif kind == "refdesc":
                    right = bool(run.subject_named[p]) and described[int(run.subject[p].argmax())] == qa["a"]
                elif kind == "read":
                    if read is None:
                        continue
                    tokens = [t for t in read[p].tolist() if t]
                    right = model.processor.tokenizer.decode(tokens).strip() == qa["a"]
                else:
                    right = (float(holds) > 0.5) == (qa["a"] == "yes")
                answered[kind][0] += right
                answered[kind][1] += 1
    images = sum(detected[0.0].values())
    table = {
        "detected_exact": {str(nms): detected[nms][0] / images for nms in settings},
        "detected_errors": {str(nms): dict(sorted(detected[nms].items())) for nms in settings},
        "answered": {k: {"right": v[0] / v[1], "asked": v[1]} for k, v in sorted(answered.items())},
    }
    print(f"{a.checkpoint}: {images} {a.split} images, {time.time() - t0:.0f} s, load {os.getloadavg()[0]:.1f}")
    print("| box NMS IoU | object count exact | found - true: images |")
    print("|---|---:|---|")
    for nms in settings:
        errors = ", ".join(f"{d:+d}: {n}" for d, n in sorted(detected[nms].items()))
        print(f"| {'off' if nms == 0 else nms} | {detected[nms][0] / images:.3f} | {errors} |")
    print(f"\nexecuted from the named words (box NMS {saved_nms or 'off'}, the checkpoint's):")
    print("| question | asked | right |")
    print("|---|---:|---:|")
    for k, v in table["answered"].items():
        print(f"| {k} | {v['asked']} | {v['right']:.3f} |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"checkpoint": a.checkpoint, "n": images, **table}, indent=1))


def describe_objects(attributes: torch.Tensor) -> list[str]:
    """(M, VALUES) attribute probabilities -> each object's most likely "size colour shape"."""
    from visto.connectors.named import KINDS

    picks, at = {}, 0
    for kind, names in KINDS.items():
        picks[kind] = [names[i] for i in attributes[:, at : at + len(names)].argmax(-1).tolist()]
        at += len(names)
    return [f"{z} {c} {s}" for z, c, s in zip(picks["size"], picks["colour"], picks["shape"], strict=True)]


if __name__ == "__main__":
    main()
