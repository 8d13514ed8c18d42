"""Training data loading off the critical path: `visto train`'s samples/s (metrics.jsonl) with
the batches read ahead by a worker (recipe data.prefetch, default 2) or not (0), on an
in-memory world against the same samples read from disk in a real format (parquet).

    .venv/bin/python bench/data_loading.py --json bench/out/data_loading.json
    .venv/bin/python bench/data_loading.py --world runs/r3/world --images 2000 --rounds 3

The recipe is clip-synth (CLIP, conv-stem ViT 128 px, batch 32: a short step, so data work is
a large share of it) on the world's caption samples of the first --images training images:
  memory    the samples decoded once into a list (PIL images), given to train() as its source:
            each batch still runs the processor (resize, normalise, tokenize)
  parquet   the same samples written by visto.data.formats (PNG bytes) and read back by the
            recipe (data.source = the parquet folder): every batch also reads and decodes
Each of the four (source x prefetch 0/2) trains --steps steps per round, in turns, for
--rounds rounds; a run's figure is the median samples/s of its metrics.jsonl rows after the
first (warm-up). Figures are medians over rounds, ratios medians of per-round ratios.
Before those runs, the critical path itself: in a loop of clip-synth steps on the parquet
batches, the time spent waiting for the next batch (read inline, or ahead by the worker)
beside the step's, alternating the two for --rounds rounds of --steps steps.
The machine's load is printed before and after.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def load() -> str:
    return open("/proc/loadavg").read().split(" ")[0] if os.path.exists("/proc/loadavg") else "?"


def run_once(world_parquet: Path | None, samples: list | None, prefetch: int, steps: int,
             threads: int, out: Path) -> float:  # fmt: skip
    """One training run; the median samples/s of its rows after the first."""
    from rich.console import Console

    from visto.train.loop import train
    from visto.train.recipe import load_recipe

    overrides = [f"max_steps={steps}", "log_every=1", "eval_every=null", "checkpoint_every=null",
                 f"num_threads={threads}", f"data.prefetch={prefetch}",
                 "schedule.warmup_steps=1"]  # fmt: skip
    source = None
    if samples is not None:
        held = {"train": samples, "val": samples[:32]}
        source = lambda role: iter(held[role])  # noqa: E731
    else:
        overrides += [f"data.source={json.dumps(str(world_parquet))}", "data.format=\"parquet\"",
                      "data.val_split=null", "data.tasks=null", "data.val_source=null"]  # fmt: skip
    recipe = load_recipe("clip-synth", overrides)
    train(recipe, out, source=source, console=Console(quiet=True), show_progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if r.get("split") == "train"][1:]
    return statistics.median(rates)


def critical_path(parquet: Path, steps: int, rounds: int) -> dict[str, Any]:
    """The wait for the next batch inside the loop, and the step, with the parquet batches
    read inline (BatchStream) or ahead (PrefetchedBatches), alternating; medians in ms."""
    import torch

    from visto.data.formats import read_samples
    from visto.pretrained import build_model
    from visto.train.data import BatchStream, PrefetchedBatches, build_processor
    from visto.train.loop import train_step
    from visto.train.optim import build_optimizer
    from visto.train.recipe import load_recipe

    recipe = load_recipe("clip-synth", ["data.prefetch=0"])
    source = lambda role: read_samples(parquet, "parquet")  # noqa: E731
    torch.manual_seed(0)
    model = build_model("clip", recipe.model.config)
    model.processor = build_processor(recipe.processor, source)
    model.train()
    optimizer = build_optimizer(model, recipe)
    waits: dict[str, list[float]] = {"inline": [], "prefetch": []}
    step_ms: list[float] = []
    for _ in range(rounds):
        for mode in waits:
            stream = BatchStream(source, "train", model.collate, recipe.batch_size, seed=0,
                                 shuffle_buffer=recipe.data.shuffle_buffer)  # fmt: skip
            batches = PrefetchedBatches(stream, 2) if mode == "prefetch" else stream
            next(batches)  # the worker's start and the shuffle buffer's fill are not steps
            for _ in range(steps):
                t = time.perf_counter()
                batch = next(batches)
                waits[mode].append(1e3 * (time.perf_counter() - t))
                t = time.perf_counter()
                train_step(model, optimizer, [batch], recipe.optim.grad_clip, torch.device("cpu"))
                step_ms.append(1e3 * (time.perf_counter() - t))
            batches.close()
    med = statistics.median
    return {"data_wait_ms": {m: round(med(v), 1) for m, v in waits.items()},
            "step_ms": round(med(step_ms), 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=Path, help="a 128-px world (default: render 400 images)")
    p.add_argument("--images", type=int, default=400, help="training images whose captions are read")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training step")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    from visto.data.formats import read_samples, write_samples

    load_before = load()
    tmp = Path(tempfile.mkdtemp())
    world = args.world
    if world is None:
        from visto.data.synth import WorldConfig
        from visto.data.synth.generate import generate_world

        world = tmp / "world"
        generate_world(WorldConfig(n=args.images * 100 // 85 + 1, seed=0, size=128,
                                   splits={"train": 0.85, "val": 0.05, "test": 0.05, "heldout": 0.05}),
                       world, workers=1)  # fmt: skip
    records = read_samples(world, "synth", split="train", tasks=["caption"])
    images = set()

    def first_images(sample: Any) -> bool:
        images.add(sample.id.split("-")[0])
        return len(images) <= args.images

    samples = list(itertools.takewhile(first_images, records))
    write_samples(samples, tmp / "parquet", "parquet")
    size = sum(f.stat().st_size for f in (tmp / "parquet").rglob("*") if f.is_file())
    print(f"{len(samples)} caption samples of {min(len(images), args.images)} images; parquet "
          f"{size / 1e6:.1f} MB; load {load_before}", flush=True)  # fmt: skip

    path = critical_path(tmp / "parquet", args.steps, args.rounds)
    print(f"critical path (parquet, batch 32): waiting for the next batch {path['data_wait_ms']} ms "
          f"against a {path['step_ms']} ms step", flush=True)  # fmt: skip
    names = {("memory", 0): None, ("memory", 2): None, ("parquet", 0): None, ("parquet", 2): None}
    rates: dict[tuple[str, int], list[float]] = {k: [] for k in names}
    for r in range(args.rounds):
        for kind, prefetch in names:
            t = time.perf_counter()
            out = tmp / f"run-{kind}-{prefetch}-{r}"
            rate = run_once(tmp / "parquet" if kind == "parquet" else None,
                            samples if kind == "memory" else None, prefetch, args.steps,
                            args.threads, out)  # fmt: skip
            rates[(kind, prefetch)].append(rate)
            print(f"round {r + 1} {kind:7s} prefetch {prefetch}: {rate:.1f} samples/s "
                  f"({time.perf_counter() - t:.0f} s, load {load()})", flush=True)  # fmt: skip
    med = statistics.median

    def ratio(a: tuple[str, int], b: tuple[str, int]) -> float:
        return round(med(x / y for x, y in zip(rates[a], rates[b], strict=True)), 3)

    result = {
        "samples_per_s": {f"{k}.prefetch{p}": round(med(v), 2) for (k, p), v in rates.items()},
        "parquet_vs_memory": {"prefetch0": ratio(("parquet", 0), ("memory", 0)),
                              "prefetch2": ratio(("parquet", 2), ("memory", 2))},
        "prefetch_vs_none": {"memory": ratio(("memory", 2), ("memory", 0)),
                             "parquet": ratio(("parquet", 2), ("parquet", 0))},
        "critical_path_parquet": path,
        "samples": len(samples), "steps": args.steps, "rounds": args.rounds,
        "threads": args.threads, "load_before": load_before, "load_after": load(),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
