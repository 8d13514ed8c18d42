"""Does the processor's fast downscale (torch's antialiased bicubic, `processor.resized_pixels`)
change what a trained model sees or answers? Synthetic-world scenes rendered at --scale times
the world's size (--noise: with a camera's noise and JPEG), downscaled to it both ways (PIL's bicubic, the fast path), written as worlds
that `visto eval` reads (their images already the model's size: the processor does not resize).

    .venv/bin/python bench/photo_resample_check.py --world runs/q0/world \\
        --model runs/q0/checkpoint --n 100 --noise 8 --out /tmp/resample_check
    visto eval --model runs/q0/checkpoint --data /tmp/resample_check/pil --n 100 --out RUN_A ...
    visto eval --model runs/q0/checkpoint --data /tmp/resample_check/fast --n 100 --out RUN_B ...
    .venv/bin/python bench/photo_resample_check.py --compare RUN_A RUN_B

Writes OUT/{native,pil,fast}: native the world's own images (rendered at its size), pil and
fast the --scale x renders downscaled. Prints the pixel differences (0-255 levels) between
them and the vision tower's output on pil vs fast pixels. --compare: two eval run directories'
answers to the same questions, how many equal, and each run's scores.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def scaled_scene(scene: dict, k: int) -> dict:
    """`scene` with every length times k (polygons, text boxes and sizes, stripe periods)."""
    from visto.data.synth.vocab import load_font

    objects = [{**o, "points": [(x * k, y * k) for x, y in o["points"]]} for o in scene["objects"]]
    texts = []
    for t in scene["texts"]:
        left, top, _, _ = load_font(t["font"], t["px"] * k).getbbox(t["text"])
        texts.append(
            {**t, "px": t["px"] * k, "box": [v * k for v in t["box"]], "offset": [left, top]}
        )
    background = dict(scene["background"])
    if "period" in background:
        background["period"] *= k
    return {"background": background, "objects": objects, "texts": texts}


def levels(a: np.ndarray, b: np.ndarray) -> tuple[int, float, float]:
    """max and mean |a - b| in 0-255 levels, and the fraction of values that differ."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float(d.mean()), float((d > 0).mean())


def build(args) -> None:
    from visto.config import from_dict
    from visto.data.processor import resized_pixels
    from visto.data.synth.config import WorldConfig
    from visto.data.synth.render import render_scene
    from visto.data.synth.scene import sample_scene

    world = Path(args.world)
    meta = json.loads((world / "world.json").read_text())
    cfg = from_dict(WorldConfig, meta["config"], where="world.json")
    records = []
    out = Path(args.out)
    worlds = {name: out / name for name in ("native", "pil", "fast")}
    for d in worlds.values():
        shutil.rmtree(d, ignore_errors=True)
        (d / "images").mkdir(parents=True)
        shutil.copy(world / "world.json", d / "world.json")
    for split in ("test", "heldout"):  # what `visto eval` reads
        chosen = [json.loads(line) for line in (world / f"{split}.jsonl").open()][: args.n]
        for d in worlds.values():
            (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
        records += chosen
    s, big = cfg.size, cfg.size * args.scale
    diffs: dict[str, list[tuple[int, float, float]]] = {"fast vs pil": [], "pil vs native": [],
                                                 "fast vs native": []}  # fmt: skip
    pixels: dict[str, list[np.ndarray]] = {"pil": [], "fast": []}
    for r in records:
        scene = sample_scene(cfg, int(r["id"]), r["split"])
        native = np.asarray(Image.open(world / r["image"]).convert("RGB"))
        assert np.array_equal(np.asarray(render_scene(scene, s)[0]), native), r["id"]
        image = render_scene(scaled_scene(scene, args.scale), big)[0]
        if args.noise:  # a camera's: sensor noise, then JPEG
            rng = np.random.default_rng(int(r["id"]))
            noisy = np.asarray(image) + rng.normal(0, args.noise, (big, big, 3))
            buffer = io.BytesIO()
            Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8)).save(
                buffer, "JPEG", quality=90
            )
            image = Image.open(buffer).convert("RGB")
        made = {"native": native,
                "pil": np.asarray(image.resize((s, s), Image.Resampling.BICUBIC)),
                "fast": resized_pixels(image, s, s).transpose(1, 2, 0)}  # fmt: skip
        for name, array in made.items():
            Image.fromarray(np.ascontiguousarray(array)).save(worlds[name] / r["image"])
        pixels["pil"].append(made["pil"])
        pixels["fast"].append(made["fast"])
        for pair in diffs:
            a, b = pair.split(" vs ")
            diffs[pair].append(levels(made[a], made[b]))
    print(
        f"{len(records)} images (test, heldout), rendered at {big} px (noise {args.noise}"
        f"{', JPEG q90' if args.noise else ''}), downscaled to {s}"
    )
    for pair, values in diffs.items():
        print(f"  {pair:<15} max {max(v[0] for v in values)} levels, mean "
              f"{np.mean([v[1] for v in values]):.5f} levels, values differing "
              f"{np.mean([v[2] for v in values]):.5f}, images differing "
              f"{sum(v[0] > 0 for v in values)}")  # fmt: skip
    if args.model:
        tokens_check(args.model, pixels)


def tokens_check(model_dir: str, pixels: dict[str, list[np.ndarray]]) -> None:
    """The checkpoint's visual tokens (tower and projector, `image_features`) of the pil and fast
    pixels: how far they move, against how far they move between two different images."""
    from visto.checkpoint import load
    from visto.data.images import normalise_pixels

    model = load(model_dir).eval()
    cfg = model.processor.config
    with torch.inference_mode():
        feats = {}
        for name, arrays in pixels.items():
            x = normalise_pixels(np.stack(arrays).transpose(0, 3, 1, 2), cfg.mean, cfg.std)
            feats[name] = model.image_features(x).flatten(1)  # (N, tokens * width)
    a, b = feats["pil"], feats["fast"]
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    rel = (a - b).norm(dim=1) / a.norm(dim=1)
    other = (a - a.roll(1, 0)).norm(dim=1) / a.norm(dim=1)  # each image against another one
    print(f"  visual tokens pil vs fast: cosine min "
          f"{float(cos.min()):.6f}, relative L2 median {float(rel.median()):.2e} max "
          f"{float(rel.max()):.2e}; another image: relative L2 median {float(other.median()):.2f}")  # fmt: skip


def compare(run_a: str, run_b: str) -> None:
    def answers(run: str) -> dict[str, dict]:
        return {r["id"]: r for r in map(json.loads, (Path(run) / "predictions.jsonl").open())}

    a, b = answers(run_a), answers(run_b)
    shared = sorted(set(a) & set(b))
    same = sum(a[i]["prediction"] == b[i]["prediction"] for i in shared)
    print(f"{len(shared)} questions in both, {same} answered the same "
          f"({same / max(1, len(shared)):.4f}); differing:")  # fmt: skip
    for i in shared:
        if a[i]["prediction"] != b[i]["prediction"]:
            print(f"  {i}: {a[i]['prediction']!r} ({a[i].get('score')}) vs "
                  f"{b[i]['prediction']!r} ({b[i].get('score')})")  # fmt: skip
    figures = [json.loads((Path(run) / "eval.json").read_text()) for run in (run_a, run_b)]
    for key in sorted(figures[0]):
        if key in figures[1] and not key.startswith(("blind", "gain")):
            print(f"  {key:<40} {figures[0][key]:.4f} {figures[1][key]:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="runs/q0/world")
    parser.add_argument("--model", default=None, help="a checkpoint whose visual tokens to compare")
    parser.add_argument("--n", type=int, default=100, help="images per split (test, heldout)")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="Gaussian noise (std, levels) on the large render, then JPEG q90",
    )
    parser.add_argument("--out", default="/tmp/resample_check")
    parser.add_argument("--compare", nargs=2, metavar="RUN", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.compare:
        compare(*args.compare)
    else:
        build(args)


if __name__ == "__main__":
    main()
