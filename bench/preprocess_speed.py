"""Image preprocessing, images/s: visto's `image_transform` against transformers' CLIP image
processor on the same PIL images, and the pixel values of both.

    .venv/bin/python bench/preprocess_speed.py --threads 1 --json bench/out/preprocess.json

Both sides get decoded RGB PIL images and return float32 (3, S, S) normalised pixels: ours one
image at a time as the processor calls it (`visto.data.processor.image_transform`, "resize"
mode: a bicubic resize to S x S), theirs `CLIPImageProcessorPil` (what transformers falls back
to without torchvision; `--fast` tries the torchvision one) set to the same resize, no centre
crop, the same mean/std, on the list at once. Two image sets per size S:

    photos       4 JPEG-decoded photo-like pictures (640x480, 500x375, 800x600, 480x640): a
                 downscale, where PIL's bicubic resize (both sides) is most of the work
    model size   4 pictures already S x S (the synthetic world's images are the model's
                 size): no resize, only conversion and normalisation

Timing: process CPU time, the two sides in turns, --rounds rounds of --calls calls; the median
round. `max_abs_diff` is between the two sides' pixel values (0.0: the same numbers). "resize
only" times PIL's bicubic resize of the same images alone, the part both sides share: no
preprocessing that keeps PIL's pixels can run faster than it.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A gradient with noise and a few blocks, through JPEG (what a camera image is)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) + rng.normal(0, 30, (h, w, 3))
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
        x[y0 : y0 + 40, x0 : x0 + 60] = rng.integers(0, 256, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def their_processor(size: int, mean, std, fast: bool):
    from transformers.models.clip import image_processing_pil_clip

    kwargs = dict(size={"height": size, "width": size}, do_center_crop=False, resample=3,
                  image_mean=list(mean), image_std=list(std))  # fmt: skip
    if fast:
        from transformers import CLIPImageProcessorFast

        return CLIPImageProcessorFast(**kwargs)
    return image_processing_pil_clip.CLIPImageProcessorPil(**kwargs)


def measure(images, size: int, args) -> dict:
    from visto.data.processor import ProcessorConfig, image_transform
    from visto.nn.vision import CLIP_MEAN, CLIP_STD

    cfg = ProcessorConfig(image_size=size, resize_mode="resize", mean=CLIP_MEAN, std=CLIP_STD)
    hf = their_processor(size, CLIP_MEAN, CLIP_STD, args.fast)

    def ours():
        return torch.stack([image_transform(im, cfg) for im in images])

    def theirs():
        return hf(images, return_tensors="pt")["pixel_values"]

    def resize_only():  # PIL's bicubic resize alone, which both sides run: a ceiling for both
        return [im.resize((size, size), Image.Resampling.BICUBIC) for im in images]

    diff = float((ours() - theirs()).abs().max())
    cpu: dict[str, list[float]] = {"visto": [], "transformers": [], "resize only": []}
    for _ in range(args.rounds):
        for name, fn in (("visto", ours), ("transformers", theirs), ("resize only", resize_only)):
            start = time.process_time()
            for _ in range(args.calls):
                fn()
            cpu[name].append(time.process_time() - start)
    n = len(images) * args.calls
    rate = {name: n / statistics.median(t) for name, t in cpu.items()}
    return {"images_per_s": rate, "ratio": rate["visto"] / rate["transformers"],
            "max_abs_diff": diff, "processor": type(hf).__name__}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--fast", action="store_true", help="CLIPImageProcessorFast (torchvision)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = [os.getloadavg()[0]]
    photos = [
        photo(w, h, i) for i, (w, h) in enumerate([(640, 480), (500, 375), (800, 600), (480, 640)])
    ]
    print(f"load {load[0]:.2f}, torch threads {torch.get_num_threads()}, median of {args.rounds} "
          f"rounds x {args.calls} calls, process CPU time")  # fmt: skip
    print(f"{'set':<12} {'S':>4} {'visto img/s':>12} {'theirs img/s':>13} {'ratio':>6}  max |diff|")
    result: dict = {"sizes": {}}
    for size in args.sizes:
        sets = {"photos": photos, "model size": [im.resize((size, size)) for im in photos]}
        result["sizes"][str(size)] = {}
        for name, images in sets.items():
            r = measure(images, size, args)
            result["sizes"][str(size)][name] = r
            ips = r["images_per_s"]
            print(f"{name:<12} {size:>4} {ips['visto']:>12.0f} {ips['transformers']:>13.0f} "
                  f"{r['ratio']:>6.2f}  {r['max_abs_diff']:.1e}  ({r['processor']}; PIL resize "
                  f"alone {ips['resize only']:.0f} img/s)")  # fmt: skip
    load.append(os.getloadavg()[0])
    result["load"] = load
    if args.json:
        from visto.utils.io import atomic_write_json

        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
