"""What `question_focus` adds to a compare-flamingo training step: the shipped recipe and the
recipe with the focus (compare-llava's settings), on the same shared tower and world, their
steps timed in alternating blocks in one process (one thread), each step on new batches as
in training (the focus's OCR reader reads every new image). The ratio sizes the budget:
compare's recipes take `max_steps` = FAMILY_REFERENCE_MINUTES of the reference machine's
steps, so a step that costs r times as much makes the same steps r times the minutes.

    python bench/flamingo_focus_cost.py --run runs/f17/focus --blocks 4 --steps 5 \
        [--set model.config.resampler_input=objects]
(RUN holds compare's world/ and vision/checkpoint, as `visto compare --out RUN` writes them.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

FOCUS = ('model.config.question_focus={"kind":"regions","slots":10,"focus":true,"read_slots":8,'
         '"pointer":true,"named":true,"box_nms":0.3,"count_width":0.35,"object_order":"left_to_right",'
         '"copy_answers":true,"copy_json":true}')  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more overrides of the focus variant (e.g. model.config.resampler_input=objects)")
    args = p.parse_args()
    torch.set_num_threads(1)

    from visto.train.distributed import Distributed
    from visto.train.loop import _setup, train_step
    from visto.train.recipe import load_recipe

    run_dir = Path(args.run)
    vision = run_dir / "vision" / "checkpoint"
    common = [f"data.source={json.dumps(str(run_dir / 'world'))}",
              f"model.config.vision_init={json.dumps(str(vision))}",
              f"model.config.tokenizer_dir={json.dumps(str(vision))}", "num_threads=1"]  # fmt: skip
    variants = {"shipped": common,
                "question_focus": [*common, FOCUS, "model.config.processor.focus_tokens=12", *args.set]}  # fmt: skip
    runs, streams = {}, {}
    for name, overrides in variants.items():
        recipe = load_recipe("compare-flamingo", overrides)
        runs[name] = _setup(recipe, Path(tempfile.mkdtemp()), False, None, Distributed())
        streams[name] = iter(runs[name].stream)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for block in range(args.blocks):
        for name, run in runs.items():
            for _ in range(args.steps):
                batch = next(streams[name])
                t0 = time.perf_counter()
                train_step(run.train_model, run.optimizer, [batch], run.recipe.optim.grad_clip, run.device)
                if block or _:  # the first step of each builds caches
                    times[name].append(time.perf_counter() - t0)
    out = {name: {"median_s": round(statistics.median(t), 3), "mean_s": round(statistics.mean(t), 3),
                  "steps": len(t)} for name, t in times.items()}  # fmt: skip
    out["ratio_median"] = round(out["question_focus"]["median_s"] / out["shipped"]["median_s"], 3)
    out["ratio_mean"] = round(out["question_focus"]["mean_s"] / out["shipped"]["mean_s"], 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
