"""LoRA fine-tuning on a user's own images, as a user runs it: images this script renders,
written as a VQA set by HF `datasets` (parquet: an `image` column and chat `messages`), then
one `visto train --recipe llava-lora` that scores the held-out file before and after.

    python bench/lora_finetune.py --model runs/r3/checkpoint --json bench/out/lora_finetune.json

1. `visto data synth` renders --n fresh images (seed --seed, not the checkpoint's world) at the
   model's image size; the VQA questions of its train split and of its test split become two
   parquet files written with `datasets` (what a user's own dataset looks like: visto did
   not write them).
2. `visto train --recipe llava-lora --set model.init_from=MODEL --set data.source=TRAIN
   --set finish.eval_source=HELDOUT --set max_steps=--steps --set batch_size=--batch`,
   with num_threads --threads and no export: LoRA rank 16 on every decoder linear layer, the
   projector in full. Its finish step runs `visto eval` on the held-out file for the starting
   model (RUN/eval-start/eval.json) and the trained one (RUN/eval.json), --eval-n questions.
3. Reported: vqa.overall before/after and the gain, per question type, each blind twin
   (images swapped: what looking is worth), the first and last logged training loss, steps,
   training seconds (the loop's elapsed_s), the questions the fine-tune fixed and broke (the
   same held-out questions before and after, with the exact sign test), wall time and the
   machine's load before and after (`/proc/loadavg`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def visto(*argv: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "visto.cli", *argv], check=True, env=env)


def write_vqa_parquet(world: Path, split: str, out: Path, seed: int) -> int:
    """The VQA exchanges of `split` as a parquet file written by HF `datasets` (an Image
    column and chat messages with an image slot), one row per question, rows shuffled (seeded)
    so that the first --eval-n of the held-out file span many images."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    from visto.data.formats import read_samples

    rows: dict[str, list] = {"image": [], "messages": []}
    for sample in read_samples(world, "synth", split=split, tasks=["vqa"]):
        turns = sample.turns
        for user, answer in zip(turns[::2], turns[1::2], strict=True):
            question = user.content.replace("<image>", "").strip()
            rows["image"].append(sample.images[0])
            rows["messages"].append([
                {"role": "user", "content": [{"type": "image", "text": None},
                                             {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer.content}]},
            ])  # fmt: skip
    order = list(range(len(rows["image"])))
    random.Random(seed).shuffle(order)
    data = Dataset.from_dict({k: [v[i] for i in order] for k, v in rows.items()})
    data = data.cast_column("image", ImageFeature())
    out.parent.mkdir(parents=True, exist_ok=True)
    data.to_parquet(str(out))
    return len(data)


def paired_counts(before: Path, after: Path) -> dict[str, float]:
    """The same held-out questions before and after: how many the fine-tune fixed and broke,
    and the exact two-sided sign-test p-value of that split (McNemar's test, exact)."""
    from math import comb

    def scores(path: Path) -> dict[str, float]:
        return {r["id"]: r["score"] for r in map(json.loads, path.read_text().splitlines())}

    a, b = scores(before), scores(after)
    fixed = sum(1 for k in a if k in b and b[k] > a[k])
    broke = sum(1 for k in a if k in b and b[k] < a[k])
    n, low = fixed + broke, min(fixed, broke)
    p = min(1.0, 2 * sum(comb(n, i) for i in range(low + 1)) / 2**n) if n else 1.0
    return {"questions": len(set(a) & set(b)), "fixed": fixed, "broke": broke, "sign_test_p": round(p, 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/r3/checkpoint", help="a visto or transformers LLaVA")
    p.add_argument("--out", type=Path, default=Path("bench/out/lora_finetune"))
    p.add_argument("--n", type=int, default=2000, help="images rendered (train 80%%, test 5%%)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-n", type=int, default=200, help="held-out questions scored")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()

    from visto.checkpoint import read_config

    size = read_config(args.model)["config"]["processor"]["image_size"]
    t0, load_before = time.time(), loadavg()
    world = args.out / "world"
    visto("data", "synth", "--out", str(world), "--n", str(args.n), "--seed", str(args.seed),
          "--size", str(size), "--workers", "1", threads=args.threads)  # fmt: skip
    train_rows = write_vqa_parquet(world, "train", args.out / "train.parquet", args.seed)
    heldout_rows = write_vqa_parquet(world, "test", args.out / "heldout.parquet", args.seed)
    run = args.out / "run"
    t1 = time.time()
    visto("train", "--recipe", "llava-lora", "--out", str(run), "--no-progress",
          "--set", f"model.init_from={args.model}",
          "--set", f"data.source={args.out / 'train.parquet'}", "--set", "data.image_root=null",
          "--set", f"finish.eval_source={args.out / 'heldout.parquet'}",
          "--set", "finish.eval_image_root=null", "--set", f"finish.eval_n={args.eval_n}",
          "--set", "finish.export=null", "--set", f"max_steps={args.steps}",
          "--set", f"batch_size={args.batch}", "--set", f"optim.lr={args.lr}",
          "--set", f"num_threads={args.threads}", threads=args.threads)  # fmt: skip
    wall_train = time.time() - t1
    before = json.loads((run / "eval-start" / "eval.json").read_text())
    after = json.loads((run / "eval.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows_logged = [r for r in rows if "loss" in r and r.get("split", "train") == "train"]
    keys = sorted(k for k in after if k.startswith(("vqa.", "blind.vqa.")))
    paired = paired_counts(run / "eval-start" / "predictions.jsonl", run / "predictions.jsonl")
    result = {
        "model": args.model, "rendered_images": args.n, "seed": args.seed,
        "train_questions": train_rows, "heldout_questions": heldout_rows, "eval_n": args.eval_n,
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "threads": args.threads,
        "vqa_before": before.get("vqa.overall"), "vqa_after": after.get("vqa.overall"),
        "vqa_gain": round(after.get("vqa.overall", 0) - before.get("vqa.overall", 0), 4),
        "figures": {k: {"before": before.get(k), "after": after.get(k)} for k in keys},
        "paired": paired,
        "first_loss": train_rows_logged[0]["loss"] if train_rows_logged else None,
        "last_loss": train_rows_logged[-1]["loss"] if train_rows_logged else None,
        "train_seconds": train_rows_logged[-1].get("elapsed_s") if train_rows_logged else None,
        "train_and_two_evals_wall_s": round(wall_train, 1),
        "total_wall_s": round(time.time() - t0, 1),
        "load_before": load_before, "load_after": loadavg(),
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
