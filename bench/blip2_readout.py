"""What a trained BLIP-2's visual prompt holds: linear read-outs of the world's truth from the
soft prompt the decoder gets (the Q-Former's query outputs after language_projection, Q x D_lm
per image), beside the same read-outs from what the Q-Former reads (its cross-attention input,
mean and max pooled). Tells the bottleneck apart: an attribute the prompt holds linearly but the
model does not answer is the decoder's to learn; one that only the Q-Former's input holds is
lost in the Q-Former (bench/README.md, "BLIP-2 in compare").

    python bench/blip2_readout.py runs/b15/base/blip2/train/checkpoint --world runs/b15/base/world

Targets: the number of objects (all images), and the colour and shape of the only object of
one-object images. Fit on the train split's images (first --n), scored on val + test; a
softmax regression (AdamW, weight decay, --steps full-batch steps) on standardised features.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

import visto


def rows(world: Path, split: str, n: int | None = None) -> list[dict]:
    out = [json.loads(line) for line in (world / f"{split}.jsonl").read_text().splitlines()]
    return out[:n] if n else out


@torch.no_grad()
def features(model, world: Path, items: list[dict], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt (N, Q * D_lm), Q-Former input pooled (N, 2 * D_in))."""
    prompts, inputs = [], []
    for i in range(0, len(items), batch):
        images = [Image.open(world / r["image"]).convert("RGB") for r in items[i : i + batch]]
        pixels, _ = model.processor.pixel_values(images)
        image = model.qformer_image(pixels)
        prompts.append(model.language_projection(model.qformer(image).queries).flatten(1))
        inputs.append(torch.cat([image.mean(1), image.amax(1)], 1))
    return torch.cat(prompts), torch.cat(inputs)


def readout(x_fit, y_fit, x_eval, y_eval, classes: int, steps: int) -> float:
    mean, std = x_fit.mean(0), x_fit.std(0).clamp(min=1e-6)
    x_fit, x_eval = (x_fit - mean) / std, (x_eval - mean) / std
    torch.manual_seed(0)
    head = torch.nn.Linear(x_fit.shape[1], classes)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(x_fit), y_fit).backward()
        opt.step()
    with torch.no_grad():
        return float((head(x_eval).argmax(1) == y_eval).float().mean())


def targets(items: list[dict], vocab: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (which items, labels)."""
    colours, shapes = list(vocab["colours"]), list(vocab["shapes"])
    objects = [r["truth"]["objects"] for r in items]
    single = torch.tensor([len(o) == 1 for o in objects])
    first = [o[0] if o else {"colour": colours[0], "shape": shapes[0]} for o in objects]
    return {
        "count": (torch.ones(len(items), dtype=torch.bool), torch.tensor([len(o) for o in objects])),
        "one-object colour": (single, torch.tensor([colours.index(o["colour"]) for o in first])),
        "one-object shape": (single, torch.tensor([shapes.index(o["shape"]) for o in first])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--world", required=True)
    parser.add_argument("--n", type=int, default=1600, help="train images to fit on")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = Path(args.world)
    meta = json.loads((world / "world.json").read_text())
    vocab = {"colours": meta["vocab"]["colours"], "shapes": meta["vocab"]["shapes"]}
    fit_items, eval_items = rows(world, "train", args.n), rows(world, "val") + rows(world, "test")
    fit_t, eval_t = targets(fit_items, vocab), targets(eval_items, vocab)
    print("| checkpoint | read from | " + " | ".join(fit_t) + " |")
    print("|---|---|" + "---:|" * len(fit_t))
    for path in args.checkpoints:
        model = visto.load(path).eval()
        fit_x, eval_x = features(model, world, fit_items), features(model, world, eval_items)
        for k, source in enumerate(("visual prompt (Q x D_lm)", "Q-Former input, pooled")):
            cells = []
            for name in fit_t:
                (fm, fy), (em, ey) = fit_t[name], eval_t[name]
                classes = int(max(fy.max(), ey.max())) + 1
                cells.append(f"{readout(fit_x[k][fm], fy[fm], eval_x[k][em], ey[em], classes, args.steps):.3f}")
            print(f"| {path} | {source} | " + " | ".join(cells) + " |", flush=True)
    n_single = int(eval_t["one-object colour"][0].sum())
    print(f"\nfit on {len(fit_items)} train images, scored on {len(eval_items)} val+test images "
          f"({n_single} with one object)")


if __name__ == "__main__":
    main()
