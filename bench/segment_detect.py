"""Text-prompted segmentation (mIoU) and open-vocabulary detection (AP50) of a clipseg model on
the synthetic world, optionally training it first with the clipseg-synth recipe.

    # train the heads over a CLIP (recipe clipseg-synth), then measure
    python bench/segment_detect.py --train runs/clipseg-synth --clip runs/clip-synth-dense/checkpoint \
        --data runs/world --json bench/out/segment_detect.json
    # measure a trained checkpoint
    python bench/segment_detect.py --model runs/clipseg-synth/checkpoint --data runs/world

Figures (visto.eval.dense): segment.miou.single / .shape / .colour / .text on the test split,
detect.ap50 over the seen colour-shape pairs, heldout.detect.ap50 over the 7 held-out pairs on
the held-out split, and the same segmentation figures there (heldout.segment.*). With --train:
the steps, the minutes of training and the load average before and after (the CPU is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the data-prefetch worker)."""
    import resource

    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def train(args: argparse.Namespace) -> dict:
    from visto.train.loop import train as run_training
    from visto.train.recipe import load_recipe

    overrides = [f"model.config.clip_init={args.clip}", f"data.source={args.data}",
                 f"num_threads={args.threads}"] + [f"max_steps={args.steps}"] * bool(args.steps)  # fmt: skip
    recipe = load_recipe("clipseg-synth", overrides)
    before = loadavg()
    start, cpu = time.perf_counter(), cpu_seconds()
    result = run_training(recipe, args.train, show_progress=False)
    # CPU minutes too: on a shared machine the wall clock also counts the other jobs' share
    return {"run": args.train, "steps": result.step, "minutes": round((time.perf_counter() - start) / 60, 2),
            "cpu_minutes": round((cpu_seconds() - cpu) / 60, 2),
            "threads": args.threads, "load_before": before, "load_after": loadavg(),
            "val": result.val_metrics}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="a clipseg checkpoint (default: TRAIN/checkpoint)")
    p.add_argument("--data", required=True, help="a synthetic world directory")
    p.add_argument("--train", metavar="RUN", help="train the recipe clipseg-synth into RUN first")
    p.add_argument("--clip", help="with --train: the CLIP checkpoint the heads sit on")
    p.add_argument("--steps", type=int, help="with --train: max_steps (default: the recipe's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--n", type=int, default=1000, help="images per split (default: all up to 1000)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    out: dict = {"command": " ".join(sys.argv)}
    if args.train:
        if not args.clip:
            p.error("--train needs --clip CKPT")
        out["train"] = train(args)
    model_dir = args.model or (args.train and str(Path(args.train) / "checkpoint"))
    if not model_dir:
        p.error("give --model CKPT or --train RUN")
    import visto
    from visto.eval.dense import evaluate_dense

    model = visto.load(model_dir)
    start = time.perf_counter()
    result = evaluate_dense(model, args.data, n=args.n, log=lambda m: print(m, flush=True))
    out.update(checkpoint=model_dir, data=args.data, eval_seconds=round(time.perf_counter() - start, 1),
               load=loadavg(), metrics={k: round(v, 4) for k, v in result.metrics.items()})  # fmt: skip
    for k, v in out["metrics"].items():
        print(f"{k:32s} {v:.3f}")
    if "train" in out:
        t = out["train"]
        print(f"trained {t['steps']} steps in {t['minutes']} min, {t['cpu_minutes']} CPU min "
              f"({t['threads']} thread(s)); "
              f"load {t['load_before']} -> {t['load_after']}")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
