"""Which path answers in a BLIP-2 with `question_focus`: the Q-Former's soft prompt at `<image>`,
or the region connector's focus (the `<focus>` slots, the `<|assistant|>` token, the pointer).
The same checkpoint through `visto eval`'s generative path (greedy, the engine), once per arm:

    seen         as trained (the eval.json figure, without its blind twin)
    prompt-zero  the soft prompt at `<image>` all zeros; the focus sees the image
    prompt-swap  the Q-Former reads another image (the next distinct image of the batch, or
                 the previous batch's when a batch holds one); the focus sees the right one
    focus-swap   the focus (its objects, what was read, the JSON script) is another image's the
                 same way; the Q-Former reads the right one

    python bench/blip2_focus_ablation.py runs/b17/fr/blip2/checkpoint --world runs/b17/fr/world \\
        --n 200 --tasks vqa --arms seen prompt-zero prompt-swap focus-swap --out runs/b17/fr/ablation.json

Prints VQA overall and per type for test and held-out per arm (bench/README.md, "BLIP-2 in
compare, third round").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import visto
import visto.models.blip2 as blip2_module

ARMS = ("seen", "prompt-zero", "prompt-swap", "focus-swap")


class Donor:
    """Another image's tensors for each image of a batch: the batch rolled by one where it
    holds several images, else the previous call's (a different image: batches move on)."""

    def __init__(self) -> None:
        self.last: Any = None

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = tensors[0].shape[0]
        if n > 1:
            out = tuple(t.roll(1, 0) for t in tensors)
        elif self.last is not None:
            out = tuple(prev[:1] for prev in self.last)
        else:
            out = tensors  # the very first batch of one image: nothing else seen yet
        self.last = tuple(t.detach().clone() for t in tensors)
        return out


def apply_arm(model: Any, arm: str) -> None:
    """Patch `model` (and blip2's focus function) for `arm`; "seen" changes nothing."""
    if arm == "prompt-zero":
        prompt = model.prompt
        model.prompt = lambda queries: torch.zeros_like(prompt(queries))
    elif arm == "prompt-swap":
        queries, donor = model._queries, Donor()
        model._queries = lambda image: queries(donor(image)[0])
    elif arm == "focus-swap":
        focus, donor = blip2_module.focus_with_copies, Donor()

        def swapped(connector, objects, embed, input_ids, pixel_values, *rest):
            fields = [f for f in objects if f is not None]
            moved = iter(donor(pixel_values, *fields))
            pixels = next(moved)
            objects = type(objects)(*[None if f is None else next(moved) for f in objects])
            return focus(connector, objects, embed, input_ids, pixels, *rest)

        blip2_module.focus_with_copies = swapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--world", required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tasks", nargs="*", default=["vqa"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from visto.eval import evaluator_for

    results = {}
    original_focus = blip2_module.focus_with_copies
    for arm in args.arms:
        model = visto.load(args.checkpoint)
        if model.config.question_focus is None:
            raise SystemExit(f"{args.checkpoint} has no question_focus")
        blip2_module.focus_with_copies = original_focus
        apply_arm(model, arm)
        _, evaluate = evaluator_for("blip2")
        start = time.time()
        result = evaluate(model, args.world, split="test", n=args.n, batch_size=args.batch, seed=0,
                          tasks=args.tasks, blind=None)  # fmt: skip
        m = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith(("vqa.", "heldout.vqa."))}
        results[arm] = m
        print(f"{arm}: VQA {m.get('vqa.overall')} held-out {m.get('heldout.vqa.overall')} "
              f"({time.time() - start:.0f} s)", flush=True)  # fmt: skip
        print("  " + " ".join(f"{k.removeprefix('vqa.')}={v}" for k, v in m.items() if k.startswith("vqa.")), flush=True)
    blip2_module.focus_with_copies = original_focus
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
