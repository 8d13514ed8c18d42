"""Which path answers in a BLIP-2 with `question_focus`: the Q-Former's soft prompt at `<image>`,
or the region connector's focus (the `<focus>` slots, the `<|assistant|>` token, the pointer).
The same checkpoint through `visto eval`'s generative path (greedy, the engine), once per arm:

    seen         as trained (the eval.json figure, without its blind twin)
    prompt-zero  the soft prompt at `<image>` all zeros; the focus sees the image
    prompt-swap  the Q-Former reads another image (the batch's distinct images deranged, or an
                 earlier batch's when a batch holds one picture); the focus sees the right one
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
    """Another image's tensors for each row of a batch. A prompt batch holds one image per row,
    the same picture in the rows of its questions, so rows are grouped by their pixels: each
    distinct image takes the next distinct image's tensors (a derangement of the batch's
    images); a batch of one picture takes an earlier batch's differing one. `swapped` and
    `rows` count the rows that got another image and all rows."""

    POOL = 4

    def __init__(self) -> None:
        self.pool: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = []  # (pixels, tensors) of earlier images
        self.swapped = self.rows = 0

    def __call__(self, pixels: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = pixels.shape[0]
        key = pixels.reshape(n, -1)
        _, group = torch.unique(key, dim=0, return_inverse=True)
        m = int(group.max()) + 1
        first = torch.full((m,), n, dtype=torch.long).scatter_reduce(0, group, torch.arange(n), "amin")
        self.rows += n
        if m > 1:
            rows = first[(group + 1) % m]
            out = tuple(t[rows] for t in tensors)
            self.swapped += n
        else:
            other = next((ts for p, ts in reversed(self.pool) if not torch.equal(p, key[0])), None)
            if other is None:
                out = tensors  # nothing else seen yet: this batch keeps its own image
            else:
                out = tuple(t[:1].expand_as(mine).clone() for t, mine in zip(other, tensors, strict=True))
                self.swapped += n
        for i in first.tolist():  # remember this batch's images for a later one-picture batch
            self.pool.append((key[i].clone(), tuple(t[i : i + 1].detach().clone() for t in tensors)))
        self.pool = self.pool[-self.POOL :]
        return out


def apply_arm(model: Any, arm: str) -> Donor | None:
    """Patch `model` (and blip2's focus function) for `arm`; "seen" changes nothing. Returns the
    arm's donor (its counts), if it swaps."""
    if arm == "prompt-zero":
        prompt = model.prompt
        model.prompt = lambda queries: torch.zeros_like(prompt(queries))
        return None
    donor = Donor()
    if arm == "prompt-swap":
        # the Q-Former's input of another image; the rows' pixels (grouping) from embed_with_copies
        queries, embed_with_copies, seen = model._queries, model.embed_with_copies, {}

        def embed(input_ids, pixel_values, *rest):
            seen["pixels"] = pixel_values
            return embed_with_copies(input_ids, pixel_values, *rest)

        model.embed_with_copies = embed
        model._queries = lambda image: queries(donor(seen["pixels"], image)[0])
        return donor
    if arm == "focus-swap":
        focus = blip2_module.focus_with_copies

        def swapped(connector, objects, embed, input_ids, pixel_values, *rest):
            fields = [f for f in objects if f is not None]
            moved = iter(donor(pixel_values, pixel_values, *fields))
            pixels = next(moved)
            objects = type(objects)(*[None if f is None else next(moved) for f in objects])
            return focus(connector, objects, embed, input_ids, pixels, *rest)

        blip2_module.focus_with_copies = swapped
        return donor
    return None


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
        donor = apply_arm(model, arm)
        _, evaluate = evaluator_for("blip2")
        start = time.time()
        result = evaluate(model, args.world, split="test", n=args.n, batch_size=args.batch, seed=0,
                          tasks=args.tasks, blind=None)  # fmt: skip
        m = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith(("vqa.", "heldout.vqa."))}
        if donor is not None:
            m["swapped_rows"], m["rows"] = donor.swapped, donor.rows
        results[arm] = m
        swapped = "" if donor is None else f", {donor.swapped} of {donor.rows} prompt rows shown another image"
        print(f"{arm}: VQA {m.get('vqa.overall')} held-out {m.get('heldout.vqa.overall')} "
              f"({time.time() - start:.0f} s{swapped})", flush=True)  # fmt: skip
        print("  " + " ".join(f"{k.removeprefix('vqa.')}={v}" for k, v in m.items() if k.startswith("vqa.")), flush=True)
    blip2_module.focus_with_copies = original_focus
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
