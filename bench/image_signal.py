"""How much does a generative checkpoint use the image, per task? Answer-token loss and token
accuracy with each image as it is and with each image swapped for another image of the split.

For every question of the first `--n` images of a world split (asked alone, as at evaluation):

    loss / acc        mean answer-token cross-entropy and argmax accuracy, seeing the image
    blind loss / acc  the same with the image swapped (the seeded derangement of the split
                      that `visto eval`'s blind twin uses)
    needs image       share of answer tokens whose loss the true image lowers by > 0.5 nats
                      over the swapped one (tokens the model reads off the image)

A task whose blind loss equals its seeing loss is answered from priors. Run it on the
checkpoints of a quickstart (RUN/stage1/checkpoint, RUN/stage2/checkpoint, ...) to see which
tasks the model learns to look for, and when.

    python bench/image_signal.py runs/quickstart/checkpoint --world runs/quickstart/world --n 100 --json F
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
import torch.nn.functional as F


def labelled_qas(record: dict, loc_bins: int) -> list[tuple[str, str, str]]:
    """(task label, question, answer) for every question of one image, as the instruct mix
    asks them (boxes as location tokens outside JSON)."""
    from visto.data.tokenizer import boxes_to_loc

    t = record["tasks"]
    out = [(f"vqa.{qa.get('type', 'other')}", qa["q"], qa["a"]) for qa in t["vqa"]]
    out += [("ground", g["q"], boxes_to_loc(g["a"], loc_bins)) for g in t["ground"]]
    out += [("refdesc", boxes_to_loc(r["q"], loc_bins), r["a"]) for r in t["refdesc"]]
    if t["ocr"] is not None:
        out.append(("ocr", t["ocr"]["q"], t["ocr"]["a"]))
    out.append(("json", t["json"]["q"], t["json"]["a"]))
    return out


@torch.no_grad()
def token_losses(model, samples) -> list[torch.Tensor]:
    """Per sample, the answer tokens' cross-entropies (1-d) and whether argmax was right."""
    batch = model.collate(samples)
    if hasattr(model, "answer_logits"):  # what the model's loss scores (a pointer head mixed in)
        logits = model.answer_logits(batch)
    else:
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch.get("image_sample_index"))
        logits, _ = model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                         position_ids=batch.get("position_ids"),
                                         segment_ids=batch.get("segment_ids"))  # fmt: skip
    target = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    out = []
    for row in range(len(samples)):
        keep = target[row] != -100
        ce = F.cross_entropy(logits[row][keep], target[row][keep], reduction="none")
        hit = logits[row][keep].argmax(-1) == target[row][keep]
        out.append((ce, hit))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--world", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from visto.checkpoint import load
    from visto.data.images import open_image
    from visto.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
    from visto.data.synth import iter_records
    from visto.eval.generative import derangement  # the blind twin's own swap

    t0 = time.time()
    model = load(a.checkpoint)
    model.eval()
    loc_bins = model.processor.tokenizer.loc_bins
    world = Path(a.world)
    records = list(itertools.islice(iter_records(world, a.split), a.n))
    images = [open_image(world / r["image"]) for r in records]
    swap = derangement(len(records), a.seed)
    rows = []  # (task, image index, question, answer)
    for i, r in enumerate(records):
        rows += [(task, i, q, ans) for task, q, ans in labelled_qas(r, loc_bins)]

    def sample(image, q, ans, k):
        turns = [Turn("user", f"{IMAGE_PLACEHOLDER}\n{q}"), Turn("assistant", ans)]
        return Sample(id=str(k), images=[image], turns=turns)

    stats = defaultdict(lambda: defaultdict(float))
    for start in range(0, len(rows), a.batch):
        chunk = rows[start : start + a.batch]
        seeing = token_losses(model, [sample(images[i], q, ans, k) for k, (_, i, q, ans) in enumerate(chunk)])
        blind = token_losses(model, [sample(images[swap[i]], q, ans, k) for k, (_, i, q, ans) in enumerate(chunk)])
        for (task, *_), (ce, hit), (bce, bhit) in zip(chunk, seeing, blind, strict=True):
            s = stats[task]
            s["questions"] += 1
            s["tokens"] += len(ce)
            s["loss"] += float(ce.sum())
            s["acc"] += float(hit.sum())
            s["blind_loss"] += float(bce.sum())
            s["blind_acc"] += float(bhit.sum())
            s["needs_image"] += float(((bce - ce) > 0.5).sum())
            s["exact"] += float(hit.all())
            s["blind_exact"] += float(bhit.all())
    table = {}
    for task in sorted(stats):
        s = stats[task]
        n, q = s["tokens"], s["questions"]
        table[task] = {"questions": int(q), "tokens": int(n), "loss": s["loss"] / n, "blind_loss": s["blind_loss"] / n,
                       "acc": s["acc"] / n, "blind_acc": s["blind_acc"] / n, "needs_image": s["needs_image"] / n,
                       "exact": s["exact"] / q, "blind_exact": s["blind_exact"] / q}  # fmt: skip
    print(f"{a.checkpoint}: {len(records)} {a.split} images, {len(rows)} questions, {time.time() - t0:.0f} s, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| task | questions | loss | blind loss | token acc | blind token acc | answer exact | blind exact | needs image |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for task, r in table.items():
        print(f"| {task} | {r['questions']} | {r['loss']:.3f} | {r['blind_loss']:.3f} | {r['acc']:.3f} | "
              f"{r['blind_acc']:.3f} | {r['exact']:.3f} | {r['blind_exact']:.3f} | {r['needs_image']:.3f} |")  # fmt: skip
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"checkpoint": a.checkpoint, "n": len(records), "tasks": table}, indent=1))


if __name__ == "__main__":
    main()
