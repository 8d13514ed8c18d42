"""The two-tower figures of the synthetic world, end to end: world -> train -> eval, per recipe.

    .venv/bin/python bench/clip_figures.py                          # clip-synth and clip-lit-minilm
    .venv/bin/python bench/clip_figures.py --recipes clip-synth --minutes 3
    .venv/bin/python bench/clip_figures.py --skip-train             # re-evaluate the last runs
    .venv/bin/python bench/clip_figures.py --recipes clip-synth-dense clip-lit-minilm \
        --dense-minutes 4 --minutes 6     # a dense-pretrained image tower first, for every recipe
    .venv/bin/python bench/clip_figures.py --recipes clip-lit-minilm-dense \
        --vision-init runs/clip-figures/dense/vision/checkpoint --minutes 6   # reuse that tower

For each recipe it runs exactly what a user runs:

    visto data synth --out WORLD --n 20000            (once; 1,000 test images for the gallery)
    visto train --recipe R --out RUNS/R --set data.source=WORLD
    visto eval --model RUNS/R/checkpoint --data WORLD --paraphrase

and prints one table (zero-shot shape/colour, text->image R@1/R@5, seen and held-out, and the
paraphrased-prompt figures) with the targets of issue 4, plus a JSON file under bench/out/.

Two figures the eval does not give are added here, because they say what a retrieval figure
can reach at all: text->image R@1/R@5 per caption style (the world writes three captions per
image, and "Two shapes: a circle and a star." fits many images of a 1,000-image gallery), and
the *oracle* recall of each style: a model that ranks the images whose caption is the very
same string first, in random order among them, gets 1/k at R@1 for a caption k images share.

The machine's load average is recorded beside every timing: on a shared 2-core machine other
processes change the number of training steps a 10-minute budget buys.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VISTO = [sys.executable, "-m", "visto.cli"]

# The figures issue 4 asks for (fractions); held-out goal: within 5 points of seen.
TARGETS = {
    "zeroshot.shape": 0.95,
    "zeroshot.colour": 0.95,
    "retrieval.t2i.r1": 0.60,
    "retrieval.t2i.r5": 0.90,
}
CAPTION_STYLES = ("objects", "counts", "positions")  # the order of truth tasks["captions"]
TABLE_ROWS = (
    "zeroshot.shape",
    "zeroshot.colour",
    "zeroshot.class",
    "zeroshot.shape_via_pair",
    "zeroshot.colour_via_pair",
    "retrieval.t2i.r1",
    "retrieval.t2i.r5",
    "retrieval.i2t.r1",
    *(f"retrieval.t2i.{s}.r{k}" for s in CAPTION_STYLES for k in (1, 5)),
    "oracle.t2i.r1",
    "oracle.t2i.r5",
    "paraphrase.zeroshot.shape",
    "paraphrase.zeroshot.colour",
    "cluster.nmi",
)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(cmd: list[str], log: Path) -> float:
    """Run a command with its output in `log`; return its wall-clock seconds."""
    shown = ["visto", *cmd[len(VISTO) :]] if cmd[: len(VISTO)] == VISTO else cmd
    print("$", " ".join(shown), flush=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    if done.returncode:
        raise SystemExit(f"command failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def oracle_recall(captions: list[str], k: int) -> float:
    """Expected text->image recall@k of a model that ranks first exactly the images whose
    caption is the query string, in random order: min(1, k / m) for a string m images share."""
    shared = Counter(captions)
    return sum(min(1.0, k / shared[c]) for c in captions) / len(captions)


def caption_style_metrics(checkpoint: Path, world: Path, n: int) -> dict[str, float]:
    """Text->image recall per caption style, and each style's oracle, seen and held-out."""
    import visto
    from visto.eval.twotower import RetrievalSet, embed_in_batches, load_split, retrieval_metrics

    model = visto.load(checkpoint)
    model.eval()
    out: dict[str, float] = {}
    for split, prefix in (("test", ""), ("heldout", "heldout.")):
        data = load_split(world, split, n)
        if not data.images:
            continue
        image_emb = embed_in_batches(model.embed_images, data.images, 64)
        per_image = len(data.captions.captions) // len(data.images)
        assert per_image == len(CAPTION_STYLES), "the world writes three captions per image"
        for k, style in enumerate(CAPTION_STYLES):
            captions = data.captions.captions[k::per_image]
            gallery = RetrievalSet(captions, list(range(len(captions))), len(data.images))
            text_emb = embed_in_batches(model.embed_texts, captions, 64)
            got = retrieval_metrics(image_emb, text_emb, gallery)
            for K in (1, 5):
                out[f"{prefix}retrieval.t2i.{style}.r{K}"] = got[f"retrieval.t2i.r{K}"]
                out[f"{prefix}oracle.t2i.{style}.r{K}"] = oracle_recall(captions, K)
        for K in (1, 5):
            out[f"{prefix}oracle.t2i.r{K}"] = sum(
                out[f"{prefix}oracle.t2i.{s}.r{K}"] for s in CAPTION_STYLES
            ) / len(CAPTION_STYLES)
    return out


def training_summary(run_dir: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    last = train[-1] if train else {}
    return {
        "steps": last.get("step", 0),
        "train_minutes": round(last.get("elapsed_s", 0.0) / 60, 2),
        "samples_per_s": round(
            sum(r["samples_per_s"] for r in train) / max(len(train), 1), 1
        ),
        "final_loss": round(last.get("loss", float("nan")), 4),
    }


def print_table(results: dict[str, dict]) -> None:
    names = list(results)
    width = max(len(r) for r in TABLE_ROWS) + 10
    print("\n" + "metric".ljust(width) + "".join(n.rjust(26) for n in names) + "   target")
    for row in TABLE_ROWS:
        for prefix in ("", "heldout."):
            key = prefix + row
            cells = [results[n]["metrics"].get(key) for n in names]
            if all(c is None for c in cells):
                continue
            target = TARGETS.get(row)
            line = key.ljust(width) + "".join(
                ("-" if c is None else f"{c:.3f}").rjust(26) for c in cells
            )
            print(line + (f"   >= {target:.2f}" if target and not prefix else ""))
    for field in ("steps", "train_minutes", "samples_per_s", "final_loss"):
        print(field.ljust(width) + "".join(str(results[n]["train"][field]).rjust(26) for n in names))
    for n in names:
        r = results[n]
        print(f"{n}: load average {r['load_before']} before, {r['load_after']} after training")
        if r.get("paraphrase_note"):
            print(f"  {r['paraphrase_note']}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=Path, default=Path("runs/world"))
    parser.add_argument("--world-n", type=int, default=20_000, help="images in a new world")
    parser.add_argument("--recipes", nargs="+", default=["clip-synth", "clip-lit-minilm"])
    parser.add_argument("--runs", type=Path, default=Path("runs/clip-figures"))
    parser.add_argument("--minutes", type=float, help="override the recipes' max_minutes")
    parser.add_argument(
        "--threads",
        type=int,
        help="override the recipes' num_threads (they use 1: on a busy 2-core machine two "
        "threads wait on each other; on an idle one, 2 is faster)",
    )
    parser.add_argument(
        "--dense-minutes",
        type=float,
        help="first pretrain an image tower on the world's dense labels for this long "
        "(`visto quickstart --until vision`, into RUNS/dense) and start every recipe's image "
        "tower from it (model.config.vision_init)",
    )
    parser.add_argument(
        "--dense-n",
        type=int,
        help="images in the dense phase's world (quickstart --n; default: --world-n). The "
        "quickstart's default 5,000 overfits 4 minutes of dense pretraining: val patch shape 0.878 against 0.957 on "
        "train; with 20,000 it is 0.927 against 0.932",
    )
    parser.add_argument(
        "--dense-batch",
        type=int,
        default=16,
        help="images per step of the dense phase (quickstart --vision-batch). Its 4 minutes "
        "are short of steps, not of data: seed 1's val patch shape is 0.862 at 64 (1,076 "
        "steps), 0.956 at 32 (2,191), 0.965 at 16 (3,911)",
    )
    parser.add_argument(
        "--vision-init",
        type=Path,
        help="start every recipe's image tower from this existing checkpoint (e.g. the RUNS/dense/"
        "vision/checkpoint of an earlier --dense-minutes run) instead of pretraining one",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="seed of the training run (and of the dense phase's world and tower) instead of the "
        "recipe's: repeat a figure with other seeds to report its median",
    )
    parser.add_argument("--n", type=int, default=1000, help="images per split in the eval")
    parser.add_argument("--skip-train", action="store_true", help="evaluate existing runs")
    parser.add_argument("--json", type=Path, default=Path("bench/out/clip_figures.json"))
    args = parser.parse_args()

    args.runs.mkdir(parents=True, exist_ok=True)
    if not (args.world / "world.json").is_file():
        log = args.runs / "world.log"
        seconds = run([*VISTO, "data", "synth", "--out", str(args.world), "--n", str(args.world_n)], log)
        print(f"world: {seconds:.0f} s")

    results: dict[str, dict] = {}
    vision_init, dense = args.vision_init, None
    if vision_init is not None and args.dense_minutes:
        parser.error("--vision-init and --dense-minutes both name the image tower: give one")
    if vision_init is not None:
        done_path = vision_init.parent / "done.json"  # a quickstart vision stage's record
        done = json.loads(done_path.read_text()) if done_path.is_file() else {}
        dense = {"reused": str(vision_init), "vision_seconds": done.get("seconds"),
                 "steps": done.get("steps"), "val": done.get("val")}  # fmt: skip
        print(f"reusing the image tower {vision_init} ({done.get('seconds', '?')} s of dense pretraining)")
    if args.dense_minutes:
        from visto.quickstart import QuickstartConfig

        dense_dir = args.runs / "dense"
        minutes = args.dense_minutes / QuickstartConfig.vision_share  # the stage's share of the budget
        cmd = [*VISTO, "quickstart", "--out", str(dense_dir), "--until", "vision", "--fresh",
               "--minutes", str(minutes), "--n", str(args.dense_n or args.world_n),
               "--vision-batch", str(args.dense_batch)]  # fmt: skip
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.seed is not None:
            cmd += ["--seed", str(args.seed)]
        dense_load = load_average()
        seconds = run(cmd, args.runs / "dense.log")
        vision_init = dense_dir / "vision" / "checkpoint"
        done = json.loads((dense_dir / "vision" / "done.json").read_text())
        dense = {"command": " ".join(cmd[2:]), "wall_s": round(seconds, 1), "load_before": dense_load,
                            "vision_seconds": done["seconds"], "steps": done["steps"], "val": done["val"]}  # fmt: skip
        print(f"dense pretraining: {done['seconds']:.0f} s, {done['steps']} steps, val {done['val']}")
    for recipe in args.recipes:
        name = Path(recipe).stem  # a shipped recipe's name, or a JSON file's stem
        run_dir = args.runs / name
        log = args.runs / f"{name}.log"
        entry: dict = {"recipe": recipe, "run_dir": str(run_dir)}
        if not args.skip_train:
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            cmd = [*VISTO, "train", "--recipe", recipe, "--out", str(run_dir), "--no-progress",
                   "--set", f"data.source={args.world}"]  # fmt: skip
            if args.minutes:
                cmd += ["--set", f"max_minutes={args.minutes}"]
            if args.threads:
                cmd += ["--set", f"num_threads={args.threads}"]
            if args.seed is not None:
                cmd += ["--set", f"seed={args.seed}"]
            if vision_init is not None:
                cmd += ["--set", f"model.config.vision_init={json.dumps(str(vision_init))}"]
                entry["vision_init"] = str(vision_init)
            entry["load_before"] = load_average()
            entry["train_wall_s"] = round(run(cmd, log), 1)
            entry["load_after"] = load_average()
        else:
            entry["load_before"] = entry["load_after"] = "(not trained in this run)"
        eval_start = load_average()
        run([*VISTO, "eval", "--model", str(run_dir / "checkpoint"), "--data", str(args.world),
             "--n", str(args.n), "--paraphrase", "--out", str(run_dir)], log)  # fmt: skip
        metrics = json.loads((run_dir / "eval.json").read_text())
        metrics.update(caption_style_metrics(run_dir / "checkpoint", args.world, args.n))
        entry["eval_load"] = eval_start
        entry["metrics"] = metrics
        entry["train"] = training_summary(run_dir)
        report = (run_dir / "report.md").read_text() if (run_dir / "report.md").exists() else ""
        entry["paraphrase_note"] = next(
            (line.strip("- ").strip() for line in report.splitlines() if "paraphrased" in line), ""
        )
        results[name] = entry

    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    from visto.utils.io import atomic_write_json

    atomic_write_json(args.json, {"cpu_count": os.cpu_count(), "dense": dense, "results": results})
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
