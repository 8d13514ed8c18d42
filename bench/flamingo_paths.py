"""Which path of a Flamingo with `question_focus` answers: the same checkpoint through `visto
eval`'s generative evaluator (the engine, greedy), with one path's image replaced while the
other keeps the question's own image (bench/README.md, "Flamingo in compare").

    python bench/flamingo_paths.py runs/f17/focus/flamingo/checkpoint --world runs/f17/focus/world \\
        --modes seeing,xattn_swap,xattn_zero,focus_swap --n 200

Modes (the seam is `Flamingo.embed_with_copies`: the decoder's input embeddings with the focus,
the pointer's slots, and the visual tokens the gated blocks read):
  seeing       as trained (compare's figure, without its blind twin)
  xattn_swap   the resampler latents the gated cross-attention reads are another image's (each
               image's deranged partner among the evaluated images); the focus reads its own
  xattn_zero   the gated cross-attention reads zero latents (zero keys and values: its
               attention adds nothing; the gated FFW still runs); the focus reads its own
  focus_swap   the focus (its <focus> slots, <|assistant|> token and pointer copies) reads the
               partner image; the gated cross-attention reads the question's own
Prints one JSON line per mode: vqa overall, per type, and held-out (heldout.vqa.*).

A Fuyu checkpoint with `question_focus` takes its own modes (`install_fuyu`; the seam is
`Fuyu.embed_with_copies`: the decoder's input embeddings, Fuyu's patch embeddings at the
`<image>` ids and the focus's additions elsewhere, and the pointer's slots):
  patches_swap  the patch embeddings at the `<image>` ids are the partner image's; the focus
                reads its own
  patches_zero  the patch embeddings are zero vectors (the decoder reads nothing at the
                `<image>` ids but their positions); the focus reads its own
  focus_swap    the focus (its <focus> slots, <|assistant|> token and pointer copies) reads the
                partner image; the patches are the question's own

    python bench/flamingo_paths.py runs/u17/focus/fuyu/checkpoint --world runs/u17/focus/world \\
        --modes seeing,patches_swap,patches_zero,focus_swap --n 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import torch


def image_key(pixels: torch.Tensor) -> str:
    return hashlib.blake2b(pixels.detach().cpu().numpy().tobytes(), digest_size=12).hexdigest()


class Partner:
    """Each evaluated image's partner: the next distinct image seen (a derangement over the
    images as they arrive; the first image's partner is fixed when the second arrives)."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.pixels: dict[str, torch.Tensor] = {}

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = []
        for image in pixel_values:
            key = image_key(image)
            if key not in self.pixels:
                self.order.append(key)
                self.pixels[key] = image.detach().clone()
            out.append(key)
        n = len(self.order)
        if n < 2:
            raise SystemExit("flamingo_paths: swapping needs at least two distinct images")
        index = {k: i for i, k in enumerate(self.order)}
        return torch.stack([self.pixels[self.order[(index[k] + 1) % n]] for k in out]).to(pixel_values)


def install(model, mode: str) -> None:
    """Replace `model.embed_with_copies` by the mode's mix of two calls of the original."""
    if mode == "seeing":
        return
    original = model.embed_with_copies
    partner = Partner()

    def mixed(input_ids, pixel_values, image_sample_index, segment_ids=None):
        own = original(input_ids, pixel_values, image_sample_index, segment_ids)
        if pixel_values.shape[0] == 0:
            return own
        if mode == "xattn_zero":
            return own[0], own[1], torch.zeros_like(own[2])
        other = original(input_ids, partner(pixel_values), image_sample_index, segment_ids)
        if mode == "xattn_swap":
            return own[0], own[1], other[2]
        if mode == "focus_swap":
            return other[0], other[1], own[2]
        raise SystemExit(f"unknown mode {mode!r}")

    model.embed_with_copies = mixed


def install_fuyu(model, mode: str) -> None:
    """Replace a Fuyu's `model.embed_with_copies` by the mode's mix of two calls of the
    original (the patch embeddings sit at the `<image>` ids, the focus adds elsewhere, so the
    two mix position by position)."""
    from visto.data.special_tokens import IMAGE_TOKEN_ID

    if mode == "seeing":
        return
    if mode not in ("patches_swap", "patches_zero", "focus_swap"):
        raise SystemExit(f"unknown Fuyu mode {mode!r}")
    original = model.embed_with_copies
    partner = Partner()

    def mixed(input_ids, pixel_values, image_sample_index=None, image_token_counts=None, image_grids=None,
              segment_ids=None):  # fmt: skip
        own = original(input_ids, pixel_values, image_sample_index, image_token_counts, image_grids, segment_ids)
        if pixel_values.shape[0] == 0:
            return own
        is_image = (input_ids == IMAGE_TOKEN_ID)[..., None]
        if mode == "patches_zero":
            return own[0].masked_fill(is_image, 0.0), own[1]
        if image_grids.unique(dim=0).shape[0] != 1:
            raise SystemExit("flamingo_paths: swapping Fuyu's images needs one patch grid for all")
        n = image_grids.shape[0]
        others = partner(pixel_values.reshape(n, -1)).view_as(pixel_values)
        other = original(input_ids, others, image_sample_index, image_token_counts, image_grids, segment_ids)
        if mode == "patches_swap":
            return torch.where(is_image, other[0], own[0]), own[1]
        return torch.where(is_image, own[0], other[0]), other[1]  # focus_swap

    model.embed_with_copies = mixed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--world", required=True)
    p.add_argument("--modes", default="seeing,xattn_swap,xattn_zero,focus_swap")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import visto
    from visto.eval import evaluator_for

    for mode in args.modes.split(","):
        model = visto.load(args.checkpoint)
        if getattr(model, "question_focus", None) is None:
            raise SystemExit(f"{args.checkpoint} is not a Flamingo (or Fuyu) with question_focus")
        (install_fuyu if model.family == "fuyu" else install)(model, mode)
        _, evaluate = evaluator_for(model.family)
        t0 = time.time()
        # the test split's first n images and the held-out split's (heldout.*), as compare's eval
        result = evaluate(model, args.world, split="test", n=args.n, batch_size=args.batch, seed=0,
                          tasks=["vqa"], blind=None)  # fmt: skip
        row: dict = {"mode": mode, "seconds": round(time.time() - t0, 1)}
        row.update({k: round(v, 4) for k, v in result.metrics.items() if k.startswith(("vqa", "heldout.vqa"))})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
