"""The OCR tool (visto.tools.ocr: PP-OCRv4 through rapidocr-onnxruntime) on the synthetic
world's rendered text: every image of a split that holds text, read by `read_lines`.

    python bench/ocr_world.py --data runs/r3/world --json bench/out/ocr_world.json
    python bench/ocr_world.py --data runs/r3/world --variants 1x-raw,3x   # before / after

Figures per variant (1x / 3x: read_lines' min_side 128 / 384, so the world's 128-px images
are read as they are / enlarged 3x, the tool's default; "-raw": words made of symbols only
kept, as the tool did before it dropped them):

    exact          the words read equal the image's texts as a multiset (order free: the world
                   places up to two separate labels, which have no reading order of their own)
    exact_world    the words joined equal the world's OCR answer (its texts in the order it
                   drew them), what the generative task's ocr.exact compares against
    cer            corpus character error rate of the order-free form (sorted words)
    misses         each miss: the id, what was read, what is written

`--reads FILE` also writes, per image id, what the OCR tool returns for `{"detail": "text"}`
(`run_ocr`'s {"text": lines joined by newlines}) as read by the variant the tool runs (3x,
symbol runs dropped), for bench/tool_use.py's --ocr-reads: the expert read once, not once per
question and way of asking.

    python bench/ocr_world.py --data runs/y0/world --variants 3x --reads bench/out/ocr_reads_y0.json

The load average before and after goes with the figures: the CPU is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

VARIANTS = {"1x-raw": (128, True), "1x": (128, False), "3x-raw": (384, True), "3x": (384, False)}


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, help="a synthetic world directory")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=1000, help="images with text to read (default 1000)")
    p.add_argument("--skip", type=int, default=0, help="images with text to pass over first")
    p.add_argument("--variants", default="1x-raw,3x", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--json", metavar="FILE")
    p.add_argument(
        "--reads",
        metavar="FILE",
        help="write the tool's text result per image id (needs the 3x variant)",
    )
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from PIL import Image

    from visto.data.synth import iter_records
    from visto.eval.metrics import character_error_rate
    from visto.tasks.parsers import normalize_ocr
    from visto.tools.ocr import read_lines

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in names if v not in VARIANTS]:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.reads and "3x" not in names:
        p.error("--reads writes what the tool reads: add the 3x variant (the tool's own)")
    records = [r for r in iter_records(args.data, args.split) if r["truth"]["texts"]]
    records = records[args.skip : args.skip + args.n]
    reads: dict[str, dict[str, str]] = {}
    out: dict = {"command": " ".join(sys.argv), "split": args.split, "images": len(records), "skip": args.skip,
                 "load_before": loadavg(), "variants": {}}  # fmt: skip
    for name in names:
        min_side, symbols = VARIANTS[name]
        start = time.perf_counter()
        exact = exact_world = 0
        preds, refs, misses = [], [], []
        for r in records:
            with Image.open(os.path.join(args.data, r["image"])) as im:
                lines = read_lines(im, min_side=min_side, symbols=symbols)
            words = [w.text for line in lines for w in line]
            if name == "3x":  # run_ocr(image, "text") of the tool, from the same lines
                reads[r["id"]] = {"text": "\n".join(" ".join(w.text for w in line)
                                                    for line in lines)}  # fmt: skip
            truth = [t["text"] for t in r["truth"]["texts"]]
            exact += sorted(words) == sorted(truth)
            exact_world += normalize_ocr(" ".join(words)) == normalize_ocr(" ".join(truth))
            preds.append(" ".join(sorted(words)))
            refs.append(" ".join(sorted(truth)))
            if sorted(words) != sorted(truth):
                misses.append({"id": r["id"], "read": " ".join(words), "truth": " ".join(truth)})
        n = max(1, len(records))
        out["variants"][name] = {
            "min_side": min_side, "symbols_kept": symbols,
            "exact": round(exact / n, 4), "exact_world": round(exact_world / n, 4),
            "cer": round(character_error_rate(preds, refs), 4),
            "seconds": round(time.perf_counter() - start, 1), "misses": misses,
        }  # fmt: skip
        v = out["variants"][name]
        print(f"{name:8s} exact {v['exact']:.3f}  exact_world {v['exact_world']:.3f}  "
              f"cer {v['cer']:.3f}  misses {len(misses)}  {v['seconds']} s", flush=True)  # fmt: skip
        for m in misses:
            print(f"    {m['id']}: read {m['read']!r}, written {m['truth']!r}")
    out["load_after"] = loadavg()
    if args.reads:
        Path(args.reads).parent.mkdir(parents=True, exist_ok=True)
        Path(args.reads).write_text(json.dumps({"data": args.data, "split": args.split,
                                                "reads": reads}, indent=1) + "\n")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
