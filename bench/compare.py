"""Run `visto compare` and print every family's headline figures and speeds as ratios to a
baseline family (default llava), with the machine's load beside them (a shared machine
inflates timings; ratios between families measured in one run suffer least).

    .venv/bin/python bench/compare.py --steps 30 --eval-images 20       # a short look
    .venv/bin/python bench/compare.py                                     # the recipes' steps (8 min each)
    .venv/bin/python bench/compare.py --out runs/compare --json bench/out/compare.json

--out reuses families already done with the same settings (visto compare is resumable);
without it the run goes into a temporary directory and starts fresh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HEADLINE = ["vqa.overall", "count.acc", "ground.acc50", "ocr.exact", "pope.f1", "caption.cider",
            "heldout.vqa.overall"]  # fmt: skip
SPEEDS = ["samples_per_s", "ttft_ms", "decode_tokens_per_s"]


def ratio(value: float, base: float) -> str:
    if base is None or value is None or not base or math.isnan(base) or math.isnan(value):
        return "   –  "
    return f"{value / base:5.2f}x"


def main(argv: list[str] | None = None) -> int:
    from visto.compare import DEFAULT_FAMILIES, CompareConfig, run_compare

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(DEFAULT_FAMILIES))
    p.add_argument("--baseline", default="llava", help="family the ratios are taken against")
    p.add_argument("--steps", type=int, default=None, help="steps per family (default: its recipe's)")
    p.add_argument("--minutes", type=float, default=None, help="optional cap per family")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--data", default=None, help="an existing 128-px world")
    p.add_argument("--eval-images", type=int, default=20)
    p.add_argument("--vision-steps", type=int, default=CompareConfig.vision_steps)
    p.add_argument("--out", type=Path, default=None, help="run directory (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the printed figures here")
    args = p.parse_args(argv)

    families = [f for f in args.families.split(",") if f]
    cfg = CompareConfig(families=families, steps=args.steps, minutes=args.minutes, n=args.n,
                        data=args.data, eval_images=args.eval_images, vision_steps=args.vision_steps)  # fmt: skip
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="visto-bench-compare-") as tmp:
        result = run_compare(cfg, args.out or Path(tmp) / "run")
    wall = time.perf_counter() - t0
    s = result.summaries
    base = s.get(args.baseline) or next(iter(s.values()))
    print()
    steps = ", ".join(f"{f} {s[f]['steps']}" for f in families)
    print(f"visto compare: {', '.join(families)}; steps {steps}; {os.cpu_count()} cores; "
          f"load before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}; {wall / 60:.1f} min end to end")  # fmt: skip
    print(f"ratios are family / {base['family']}")
    header = f"{'figure':<22}" + "".join(f"{f:>18}" for f in families)
    print(header)
    for key in HEADLINE + SPEEDS:
        cells = []
        for f in families:
            v = s[f]["metrics"].get(key) if key in HEADLINE else s[f].get(key)
            b = base["metrics"].get(key) if key in HEADLINE else base.get(key)
            cells.append(f"{'–' if v is None else f'{v:.3f}':>10} {ratio(v, b):>7}")
        print(f"{key:<22}" + "".join(f"{c:>18}" for c in cells))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": vars(cfg), "wall_s": wall, "load_before": load_before,
                                         "summaries": s}, indent=2, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
