"""Image preprocessing, images/s: visto's `image_transform` against transformers' CLIP image
processor on the same PIL images, and the pixel values of both.

    .venv/bin/python bench/preprocess_speed.py --threads 1 --json bench/out/preprocess.json

Both sides get decoded RGB PIL images and return float32 (3, S, S) normalised pixels: ours one
image at a time as the processor calls it (`visto.data.processor.image_transform`, "resize"
mode: a bicubic resize to S x S; a downscale by 2x or more through torch's antialiased bicubic,
`processor.resized_pixels`; "visto PIL" the same with PIL's resize always), theirs `CLIPImageProcessorPil` (what transformers falls back
to without torchvision; `--fast` tries the torchvision one) set to the same resize, no centre
crop, the same mean/std, on the list at once. Two image sets per size S:

    photos       4 JPEG-decoded photo-like pictures (640x480, 500x375, 800x600, 480x640): a
                 downscale, where PIL's bicubic resize (both sides) is most of the work
    model size   4 pictures already S x S (the synthetic world's images are the model's
                 size): no resize, only conversion and normalisation

Timing: process CPU time, the sides in turns (rotated each round), --rounds rounds of --calls calls; the median
round. `max_abs_diff` is between visto's and transformers' pixel values (0.0: the same
numbers; `max_abs_diff_pil`: "visto PIL"'s), `levels_max`/`levels_mean` the same in 0-255
levels. "resize only" times PIL's bicubic resize of the same images alone, the part both sides
share before the fast path: no preprocessing that keeps PIL's pixels can run faster than it.

`--candidates` also times, on the photos, the resizes a faster downscale could use (resize
alone, images/s), with their pixels' distance from PIL's bicubic in levels: PIL's bicubic
with `reducing_gap` 2 and 3 (a box reduce by an integer factor first), torch's antialiased
bicubic on uint8 (the fast path), and, from the JPEG bytes, decoding with `Image.draft`
(the decoder's DCT downscale by 1/2..1/8) then PIL's bicubic against a full decode then PIL's
bicubic (decode timed on both sides).
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


def photo_jpeg(w: int, h: int, seed: int) -> bytes:
    """A gradient with noise and a few blocks, as JPEG bytes (what a camera image is)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) + rng.normal(0, 30, (h, w, 3))
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
        x[y0 : y0 + 40, x0 : x0 + 60] = rng.integers(0, 256, 3)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def photo(w: int, h: int, seed: int) -> Image.Image:
    return Image.open(io.BytesIO(photo_jpeg(w, h, seed))).convert("RGB")


def levels(a: torch.Tensor, b: torch.Tensor, std) -> torch.Tensor:
    """|a - b| of normalised pixels (..., 3, H, W) in 0-255 levels."""
    return (a - b).abs() * torch.tensor(std).view(3, 1, 1) * 255


def their_processor(size: int, mean, std, fast: bool):
    from transformers.models.clip import image_processing_pil_clip

    kwargs = dict(size={"height": size, "width": size}, do_center_crop=False, resample=3,
                  image_mean=list(mean), image_std=list(std))  # fmt: skip
    if fast:
        from transformers import CLIPImageProcessorFast

        return CLIPImageProcessorFast(**kwargs)
    return image_processing_pil_clip.CLIPImageProcessorPil(**kwargs)


def measure(images, size: int, args) -> dict:
    import math

    from visto.data import processor
    from visto.data.processor import ProcessorConfig, image_transform
    from visto.nn.vision import CLIP_MEAN, CLIP_STD

    cfg = ProcessorConfig(image_size=size, resize_mode="resize", mean=CLIP_MEAN, std=CLIP_STD)
    hf = their_processor(size, CLIP_MEAN, CLIP_STD, args.fast)
    fast_from = processor.FAST_DOWNSCALE_FROM

    def ours():
        return torch.stack([image_transform(im, cfg) for im in images])

    def ours_pil():  # PIL's bicubic for every resize
        processor.FAST_DOWNSCALE_FROM = math.inf
        try:
            return torch.stack([image_transform(im, cfg) for im in images])
        finally:
            processor.FAST_DOWNSCALE_FROM = fast_from

    def theirs():
        return hf(images, return_tensors="pt")["pixel_values"]

    def resize_only():  # PIL's bicubic resize alone, which both sides run: a ceiling for both
        return [im.resize((size, size), Image.Resampling.BICUBIC) for im in images]

    reference = theirs()
    diff = levels(ours(), reference, CLIP_STD)
    sides = {"visto": ours, "visto PIL": ours_pil, "transformers": theirs,
             "resize only": resize_only}  # fmt: skip
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for k in range(args.rounds):  # the sides in turns, each round starting one further on
        for name, fn in [*sides.items()][k % len(sides) :] + [*sides.items()][: k % len(sides)]:
            start = time.process_time()
            for _ in range(args.calls):
                fn()
            cpu[name].append(time.process_time() - start)
    n = len(images) * args.calls
    rate = {name: n / statistics.median(t) for name, t in cpu.items()}
    return {"images_per_s": rate, "ratio": rate["visto"] / rate["transformers"],
            "ratio_pil": rate["visto PIL"] / rate["transformers"],
            "max_abs_diff": float((ours() - reference).abs().max()),
            "max_abs_diff_pil": float((ours_pil() - reference).abs().max()),
            "levels_max": float(diff.max()), "levels_mean": float(diff.mean()),
            "processor": type(hf).__name__}  # fmt: skip


def candidates(jpegs: list[bytes], size: int, args) -> dict:
    """Resize alone, images/s, and distance from PIL's bicubic in levels (max, mean)."""
    import torch.nn.functional as F

    bicubic = Image.Resampling.BICUBIC
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]

    def pil(gap=None):
        return lambda: [
            np.asarray(im.resize((size, size), bicubic, reducing_gap=gap)) for im in images
        ]

    def torch_aa():
        out = []
        for im in images:
            x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None]
            y = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
            out.append(y[0].permute(1, 2, 0).numpy())
        return out

    def decoded(draft: bool):
        def run():
            out = []
            for b in jpegs:
                im = Image.open(io.BytesIO(b))
                if draft:
                    im.draft("RGB", (size, size))
                out.append(np.asarray(im.convert("RGB").resize((size, size), bicubic)))
            return out

        return run

    ways = {"PIL bicubic": pil(), "reducing_gap 2": pil(2.0), "reducing_gap 3": pil(3.0),
            "torch antialiased bicubic": torch_aa, "JPEG decode + bicubic": decoded(False),
            "JPEG draft decode + bicubic": decoded(True)}  # fmt: skip
    exact = pil()()
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            start = time.process_time()
            for _ in range(args.calls):
                fn()
            cpu[name].append(time.process_time() - start)
    result = {}
    for name, fn in ways.items():
        pairs = zip(fn(), exact, strict=True)
        d = np.stack([np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in pairs])
        result[name] = {"images_per_s": len(images) * args.calls / statistics.median(cpu[name]),
                        "levels_max": int(d.max()), "levels_mean": float(d.mean())}  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--fast", action="store_true", help="CLIPImageProcessorFast (torchvision)")
    parser.add_argument("--candidates", action="store_true", help="time other downscales too")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = [os.getloadavg()[0]]
    jpegs = [photo_jpeg(w, h, i)
             for i, (w, h) in enumerate([(640, 480), (500, 375), (800, 600), (480, 640)])]  # fmt: skip
    photos = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
    print(f"load {load[0]:.2f}, torch threads {torch.get_num_threads()}, median of {args.rounds} "
          f"rounds x {args.calls} calls, process CPU time")  # fmt: skip
    print(f"{'set':<12} {'S':>4} {'visto img/s':>12} {'theirs img/s':>13} {'ratio':>6} "
          f"{'visto PIL':>10} {'ratio':>6}  levels max / mean")  # fmt: skip
    result: dict = {"sizes": {}}
    for size in args.sizes:
        sets = {"photos": photos, "model size": [im.resize((size, size)) for im in photos]}
        result["sizes"][str(size)] = {}
        for name, images in sets.items():
            r = measure(images, size, args)
            result["sizes"][str(size)][name] = r
            ips = r["images_per_s"]
            print(f"{name:<12} {size:>4} {ips['visto']:>12.0f} {ips['transformers']:>13.0f} "
                  f"{r['ratio']:>6.2f} {ips['visto PIL']:>10.0f} {r['ratio_pil']:>6.2f}  "
                  f"{r['levels_max']:.2f} / {r['levels_mean']:.4f}  ({r['processor']}; PIL "
                  f"resize alone {ips['resize only']:.0f} img/s; visto PIL max |diff| "
                  f"{r['max_abs_diff_pil']:.1e})")  # fmt: skip
        if args.candidates:
            found = result["sizes"][str(size)]["candidates"] = candidates(jpegs, size, args)
            for way, c in found.items():
                print(f"    {way:<28} {c['images_per_s']:>7.0f} img/s  levels from PIL's "
                      f"bicubic max {c['levels_max']} mean {c['levels_mean']:.4f}")  # fmt: skip
    load.append(os.getloadavg()[0])
    result["load"] = load
    if args.json:
        from visto.utils.io import atomic_write_json

        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
