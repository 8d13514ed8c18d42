"""LiT's training step with and without the locked text tower's feature cache, side by side.

The model is the clip-lit-minilm-dense recipe's (locked pretrained MiniLM, the world's
128 px ViT); the batches are the world's captions, drawn as `visto train` draws them. Steps
alternate, cached then uncached, on the same batch, so a load change on a shared machine hits
both alike. The cached side first sees every batch once (a warm cache, as from the second
epoch on); the figure is the median step time over `--steps` batches after that, plus the
hit rate a real run gets in its first epoch (distinct captions / all captions).

    .venv/bin/python bench/lit_text_cache.py --world runs/world --steps 30 --threads 1

(`--steps` counts images: the world writes three captions per image, one sample each.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world", type=Path, default=Path("runs/world"))
    p.add_argument("--steps", type=int, default=30, help="images x 3 captions / batch = steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path("bench/out/lit_text_cache.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from visto.data.synth import iter_records, iter_samples
    from visto.models import build_model
    from visto.train.recipe import load_recipe
    from visto.utils.io import atomic_write_json

    recipe = load_recipe("clip-lit-minilm-dense", [])
    config = dict(recipe.model.config)
    config.pop("vision_init")  # the tower's weights do not change the step's cost
    models = {}
    for name, size in (("cached", 200_000), ("uncached", 0)):
        models[name] = build_model("clip", {**config, "text_cache_size": size}, seed=0)
    models["uncached"].load_state_dict(models["cached"].state_dict())
    # The processor's image transform (the recipe has none: MiniLM brings its tokenizer).
    samples = list(iter_samples(args.world, "train", tasks=["caption"], seed=0, limit=args.batch * args.steps))
    batches = [models["cached"].collate(samples[i : i + args.batch]) for i in range(0, len(samples), args.batch)]
    optimizers = {n: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4) for n, m in models.items()}

    def step(name: str, batch: dict) -> float:
        model, opt = models[name], optimizers[name]
        model.train()
        t0 = time.perf_counter()
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    with torch.no_grad():
        for batch in batches:  # warm the cache: every caption seen once
            models["cached"].encode_text_tokens(batch["input_ids"], batch["attention_mask"])
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    step("cached", batches[0]), step("uncached", batches[0])  # warm-up
    for batch in batches:
        for name in times:
            times[name].append(step(name, batch))
    captions = [c for r in iter_records(args.world, "train") for c in r["tasks"]["captions"]]
    median = {n: statistics.median(t) for n, t in times.items()}
    result = {
        "batch": args.batch, "steps": len(batches), "threads": args.threads,
        "median_step_s": median, "speedup": median["uncached"] / median["cached"],
        "samples_per_s": {n: args.batch / s for n, s in median.items()},
        "distinct_captions": len(set(captions)), "captions": len(captions),
        "load_average": os.getloadavg(),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
