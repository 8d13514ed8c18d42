"""Where a clipseg detector loses AP50 on the synthetic world: TIDE-style error analysis
(Bolya et al. 2020) over the same protocol as visto.eval.dense (every colour-shape query on
every image, per-patch boxes after NMS, AP at IoU 0.5 per pair, averaged over pairs).

    python bench/detect_errors.py --model runs/clipseg-b/checkpoint --data runs/r3/world \
        --json bench/out/detect_errors.json

Each kept detection that is not a true positive gets one cause, in this order:

    absent   the image holds no object of the queried pair (the text scoring fired on another
             pair, usually one sharing a word: "red star" on a purple star)
    dupe     IoU >= 0.5 with an object of the pair that a higher-scored detection already took
    loc      IoU 0.1..0.5 with an object of the pair (the box regression)
    other    IoU >= 0.1 with an object of another pair in an image that holds the pair too
    bkg      nothing under it

and each object no detection covers at IoU 0.5 is a miss (`recall_cap`: the share of objects
any kept box covers, the recall AP can reach). `fixed.<cause>`: AP50 with the false positives
of that cause removed, so the gain each fix would buy; `fixed.all_fp`: with every false
positive removed (only the misses left). `present_score` / `absent_score`: per image and query,
the best patch score where the pair is present / absent (median and 95th percentile).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

CAUSES = ("absent", "dupe", "loc", "other", "bkg")


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def analyse(model, data_dir: str, split: str, pairs, n: int, batch_size: int = 32) -> dict:
    from visto.data.images import open_image
    from visto.data.synth import iter_records
    from visto.data.synth.prompts import pair_phrase
    from visto.eval.dense import average_precision, detections, greedy_matches
    from visto.eval.metrics import box_iou

    queries = [pair_phrase(*p) for p in pairs]
    # per query: (score, cause or "tp")
    found: dict[str, list[tuple[float, str]]] = {q: [] for q in queries}
    n_truth = dict.fromkeys(queries, 0)
    covered = total = 0
    present_best: list[float] = []
    absent_best: list[float] = []
    records = [r for k, r in zip(range(n), iter_records(data_dir, split), strict=False)]
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = [open_image(os.path.join(data_dir, r["image"])) for r in chunk]
        scores, boxes = model.detect(images, queries)
        for i, r in enumerate(chunk):
            objs = r["truth"]["objects"]
            for q, (pair, query) in enumerate(zip(pairs, queries, strict=True)):
                truth = [o["box"] for o in objs if (o["colour"], o["shape"]) == pair]
                others = [o["box"] for o in objs if (o["colour"], o["shape"]) != pair]
                n_truth[query] += len(truth)
                (present_best if truth else absent_best).append(float(scores[i, :, q].max()))
                kept = detections(scores[i, :, q], boxes[i], images[i].size)
                for t in truth:
                    total += 1
                    covered += any(box_iou(b, t) >= 0.5 for _, b in kept)
                for (score, box), match in zip(kept, greedy_matches(kept, truth), strict=True):
                    if match is not None:
                        found[query].append((score, "tp"))
                        continue
                    top = max((box_iou(box, t) for t in truth), default=0.0)
                    if not truth:
                        cause = "absent"
                    elif top >= 0.5:
                        cause = "dupe"
                    elif top >= 0.1:
                        cause = "loc"
                    elif any(box_iou(box, t) >= 0.1 for t in others):
                        cause = "other"
                    else:
                        cause = "bkg"
                    found[query].append((score, cause))

    def ap(drop: set[str]) -> float:
        aps = [
            average_precision([(s, c == "tp") for s, c in found[q] if c not in drop], n_truth[q])
            for q in queries
            if n_truth[q]
        ]
        return float(np.mean(aps))

    counts = {c: sum(c2 == c for q in queries for _, c2 in found[q]) for c in ("tp", *CAUSES)}
    # false positives scored above the median true positive: the ones that cost precision
    tp_scores = [s for q in queries for s, c in found[q] if c == "tp"]
    median_tp = float(np.median(tp_scores)) if tp_scores else 1.0
    high = {
        c: sum(c2 == c and s >= median_tp for q in queries for s, c2 in found[q]) for c in CAUSES
    }
    pct = lambda v, p: round(float(np.percentile(v, p)), 3) if v else float("nan")  # noqa: E731
    return {
        "ap50": round(ap(set()), 4),
        **{f"fixed.{c}": round(ap({c}), 4) for c in CAUSES},
        "fixed.all_fp": round(ap(set(CAUSES)), 4),
        "recall_cap": round(covered / max(total, 1), 4),
        "objects": total,
        "counts": counts,
        "fp_above_median_tp": high,
        "median_tp_score": round(median_tp, 3),
        "present_score": {"median": pct(present_best, 50), "p5": pct(present_best, 5)},
        "absent_score": {"median": pct(absent_best, 50), "p95": pct(absent_best, 95)},
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="a clipseg checkpoint")
    p.add_argument("--data", required=True, help="a synthetic world directory")
    p.add_argument("--n", type=int, default=1000, help="images per split (default: all up to 1000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    import visto
    from visto.data.synth.prompts import seen_pairs
    from visto.data.synth.vocab import heldout_pairs

    torch.set_num_threads(args.threads)
    model = visto.load(args.model)
    model.eval()
    out: dict = {"command": " ".join(sys.argv), "load_before": loadavg()}
    start = time.perf_counter()
    out["test"] = analyse(model, args.data, "test", seen_pairs(), args.n)
    out["heldout"] = analyse(model, args.data, "heldout", heldout_pairs(), args.n)
    out.update(seconds=round(time.perf_counter() - start, 1), load_after=loadavg())
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
