"""Quickstart runs with and without the detector's boxes in stage 2's JSON labels
(`data.json_boxes`, QuickstartConfig.detector_json_boxes), paired by stage 1: each lever run
re-ran stage 2 (and eval) from the stage 1 of the baseline run beside it.

Prints, per run and as the medians of each arm: the JSON figures in the model's own decoding
(json.valid, json.field_acc) and under the world's grammar (json.constrained.field_acc), each
beside its blind twin (images swapped), and the rest of the headline figures (a lever that
breaks VQA or grounding is no lever). Then, pooled over the pairs, the test JSON questions
(test and held-out images) whose own answer became valid / invalid (the same images before and after: an exact sign test).

    python bench/json_boxes.py --baseline runs/q0 runs/r1n --lever runs/q0b runs/r1b \
        --json bench/out/json_boxes.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

FIGURES = ("json.valid", "json.field_acc", "json.constrained.field_acc", "blind.json.valid",
           "blind.json.field_acc", "heldout.json.field_acc", "vqa.overall", "blind.vqa.overall",
           "count.acc", "ground.acc50", "ocr.exact", "pope.f1", "heldout.vqa.overall")  # fmt: skip


def exact_sign_test(fixed: int, broke: int) -> float:
    """Two-sided exact binomial test of fixed vs broke at p = 1/2."""
    n, k = fixed + broke, min(fixed, broke)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def json_validity(run: Path) -> dict[str, bool]:
    """A run's JSON questions (test and held-out images) -> whether its own answer parsed."""
    out = {}
    for line in (run / "predictions.jsonl").read_text().splitlines():
        p = json.loads(line)
        if p["task"] != "json":
            continue
        try:
            json.loads(p["prediction"])
            out[p["id"]] = True
        except json.JSONDecodeError:
            out[p["id"]] = False
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", nargs="+", type=Path, required=True)
    ap.add_argument("--lever", nargs="+", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if len(a.baseline) != len(a.lever):
        ap.error("--baseline and --lever pair up: give as many of each")
    evals = {run: json.loads((run / "eval.json").read_text()) for run in (*a.baseline, *a.lever)}
    names = [r.name for r in (*a.baseline, *a.lever)]
    print("| figure | " + " | ".join(names) + " | median baseline | median lever |")
    print("|---|" + "---:|" * (len(names) + 2))
    table = {}
    for key in FIGURES:
        values = [evals[r].get(key, math.nan) for r in (*a.baseline, *a.lever)]
        base = statistics.median(values[: len(a.baseline)])
        lever = statistics.median(values[len(a.baseline) :])
        table[key] = {"runs": dict(zip(names, values, strict=True)), "baseline": base, "lever": lever}
        print(f"| {key} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {base:.3f} | **{lever:.3f}** |")
    fixed = broke = questions = 0
    for before_run, after_run in zip(a.baseline, a.lever, strict=True):
        before, after = json_validity(before_run), json_validity(after_run)
        for qid in before.keys() & after.keys():
            questions += 1
            fixed += after[qid] and not before[qid]
            broke += before[qid] and not after[qid]
    p = exact_sign_test(fixed, broke)
    print(f"\nown-decoding JSON validity, paired over {questions} questions: "
          f"{fixed} became valid, {broke} became invalid (sign test p {p:.2g})")  # fmt: skip
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"figures": table, "paired_validity": {
            "questions": questions, "fixed": fixed, "broke": broke, "p": p}}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
