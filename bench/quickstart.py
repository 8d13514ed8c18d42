"""Run the real `visto quickstart` and print its figures against the targets, with the wall
clock of every stage and the machine's load beside it (a shared machine inflates timings).

    .venv/bin/python bench/quickstart.py                       # the defaults: about 20 min
    .venv/bin/python bench/quickstart.py --stage2-steps 60 --n 2000   # a shorter look
    .venv/bin/python bench/quickstart.py --json bench/out/quickstart.json

Always starts fresh (a benchmark that reuses stages measures nothing) in a temporary run
directory unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from visto.quickstart import HEADLINE, QuickstartConfig, run_quickstart

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="run directory (default: a temp dir)")
    for stage in ("vision", "stage1", "stage2"):
        p.add_argument(f"--{stage}-steps", type=int, default=getattr(QuickstartConfig, f"{stage}_steps"))
    p.add_argument("--minutes", type=float, default=None, help="optional cap on the training stages")
    p.add_argument("--n", type=int, default=QuickstartConfig.n)
    p.add_argument("--eval-images", type=int, default=QuickstartConfig.eval_images)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    cfg = QuickstartConfig(minutes=args.minutes, n=args.n, eval_images=args.eval_images,
                           threads=args.threads, seed=args.seed, vision_steps=args.vision_steps,
                           stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps)  # fmt: skip
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="visto-bench-qs-") as tmp:
        run_dir = args.out or Path(tmp) / "run"
        result = run_quickstart(cfg, run_dir, fresh=True)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
        m = result.metrics
        print()
        print(f"visto quickstart: {cfg.n} images, steps {cfg.vision_steps} + {cfg.stage1_steps} + "
              f"{cfg.stage2_steps}" + ("" if cfg.minutes is None else f", --minutes {cfg.minutes:g}")
              + f", {os.cpu_count()} cores")  # fmt: skip
        print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} "
              "(above the core count: timings are inflated)")  # fmt: skip
        print(f"{'figure':<22}{'test':>8}{'held-out':>10}{'target':>8}  met")
        for key, label, target in HEADLINE:
            if key in m:
                held = m.get("heldout." + key, float("nan"))
                print(f"{label:<22}{m[key]:>8.3f}{held:>10.3f}{target:>8.2f}  "
                      f"{'yes' if m[key] >= target else 'no'}")  # fmt: skip
        print(f"{'stage':<22}{'seconds':>8}")
        for stage, seconds in result.seconds.items():
            print(f"{stage:<22}{seconds:>8.1f}")
        print(f"{'end to end':<22}{wall:>8.1f}  (target <= 1200 s on 2 idle cores)")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "config": vars(args) | {"out": str(args.out), "json": str(args.json)},
                "metrics": m, "seconds": result.seconds, "wall_s": round(wall, 1),
                "load_before": load_before, "load_after": load_after,
            }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
