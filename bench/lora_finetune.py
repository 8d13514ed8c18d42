"""LoRA fine-tuning on a user's own images, as a user runs it: images this script renders,
written as a VQA set by HF `datasets` (parquet: an `image` column and chat `messages`), then
one `visto train --recipe llava-lora` that scores the held-out file before and after.

    python bench/lora_finetune.py --model runs/w0/checkpoint --n 4000 --steps 500 \
        --replay 0.5 --eval-n 600 --json bench/out/lora_new.json
    python bench/lora_finetune.py --questions world --model runs/r3/checkpoint   # the old run
    # levers, one at a time against one baseline: the start's evaluations shared (--start)
    python bench/lora_finetune.py --model runs/final/checkpoint --data runs/l19/data --n 4000 \
        --steps 100 --replay 0.5 --eval-n 300 --old-n 600 --start runs/l19/start --no-blind \
        --out runs/l19/rank4 --set lora.rank=4 --set lora.alpha=8

--questions new (the default): something the model was never taught, derived from each
image's ground truth (`new_questions`): three families, each answered in a word or two.
    where        "In which part of the image is the red circle?" -> "top left": the 3x3 cell
                 of a named object (the world's captions say "a red circle in the top left",
                 its VQA never asks; a new question form and answer format of a known fact)
    superlative  "What colour is the largest shape?" / "What shape is the smallest object?"
                 (a new fact type: a comparison of sizes over the image, asked only where one
                 object is at least 1.5x the area of every other)
    cell         "What colour is the object in the top left?" (a new fact type: an object
                 named by where it is, only where it is alone in its cell)
Objects asked about are at least 80% visible, and their centres at least 5% of the image
from the cell lines, so that every answer is clear from the picture.
--questions world: the world's own VQA questions (what the quickstart trained on).
--replay F: F of the training samples are old data, so that the model keeps what it knew
(trained on the new questions alone, it does not); 0 = none (data.replay null).
    --replay-from init_from (the default): the recipe's data.replay, a share of what the
        checkpoint was trained on as its card records it (the quickstart's: its world in the
        stage-2 mix, every task of an image in one sample), drawn by `visto train`
    --replay-from questions (--questions new only): the world's own VQA questions of the
        training images, written into the training parquet beside the new ones (F of the rows)

1. `visto data synth` renders --n fresh images (seed --seed, not the checkpoint's world) at the
   model's image size (--size) into --data (default OUT); DATA/data.json records the settings, and a rerun with the same
   ones reuses the files; the questions of its train split and of its test split become parquet
   files written with `datasets` (what a user's own dataset looks like: visto did not write
   them), rows shuffled (seeded) so that the first --eval-n held-out rows span many images.
   With --questions new, the world's VQA of the test split is written too
   (heldout-vqa.parquet): what the model knew before.
2. `visto train --recipe llava-lora --set model.init_from=MODEL --set data.source=TRAIN
   --set finish.eval_source=HELDOUT --set max_steps=--steps --set batch_size=--batch
   --set data.replay.share=--replay` (or data.replay=null), then each --set KEY=VALUE (a lever:
   lora.rank, lora.trainable, optim.module_lrs..., data.replay={...}), with num_threads
   --threads, seed --train-seed, optim.lr --lr (default: the recipe's) and no export: the
   recipe's LoRA (rank 16 on every decoder linear layer, the connector at a tenth of the lr:
   optim.module_lrs {"multi_modal_projector": 1e-4}; --freeze-projector sets
   lora.trainable=[], as --set 'lora.trainable=[]' does; --set 'optim.module_lrs={}' trains
   it at the full lr).
   Its finish step runs `visto eval` on the held-out file for the starting model
   (RUN/eval-start) and the trained one (RUN), --eval-n rows. With --questions new,
   `visto eval --data heldout-vqa.parquet` then scores both models on --old-n old questions
   (RUN/old-start, RUN/old).
   With --start DIR the starting model is scored once into DIR/new and DIR/old and shared by
   every run naming DIR (DIR/start.json records the settings; others are refused), the recipe
   only trains, and the bench scores the trained model itself (RUN/new, RUN/old), without
   blind twins under --no-blind. With --reuse a run cut short (a timeout's SIGINT: the run
   saves its checkpoint) goes on from there.
3. Reported: vqa.overall before/after and the gain, per family (new) or answer type, each
   blind twin (images swapped: what looking is worth), the questions the fine-tune fixed and
   broke (the same held-out questions before and after, exact sign test), for the blind twin
   too; the first and last logged training loss, steps, training seconds (the loop's
   elapsed_s), wall time and the machine's load before and after (`/proc/loadavg`); and a
   `summary`: one line per new family and per old type (counting, relations, ...), before ->
   after (fixed / broke, questions).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from visto.data.synth.tasks import centre, position_phrase, unique_descriptions

QUESTION_SETS = ("new", "world")
FAMILIES = ("where", "superlative", "cell")
MIN_VISIBLE = 0.8  # an object asked about shows at least this much of itself
CELL_MARGIN = 0.05  # its centre at least this far (a fraction of the side) from a cell line
AREA_RATIO = 1.5  # "largest" / "smallest": by at least this factor over every other object

QA = tuple[str, str, str]  # (question, answer, family)


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def visto(*argv: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "visto.cli", *argv]
    process = subprocess.Popen(command, env=env)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.wait()  # it had the same Ctrl-C: a training run saves its checkpoint first
        raise
    if code:
        raise subprocess.CalledProcessError(code, command)


def clear_cell(box: list[int], size: int) -> bool:
    """Whether the box's centre lies clear of the lines of the 3x3 grid (position_phrase's)."""
    lines = (size / 3, 2 * size / 3)
    return all(abs(c - line) >= CELL_MARGIN * size for c in centre(box) for line in lines)


def cell_words(box: list[int], size: int) -> str:
    """position_phrase without its preposition: "top left", "top", "left", "centre"."""
    phrase = position_phrase(box, size)
    return phrase.removeprefix("in the ").removeprefix("on the ").removeprefix("at the ")


def where_questions(truth: dict, rng: random.Random) -> list[QA]:
    """At most two named objects' cells."""
    objs, size = truth["objects"], truth["width"]
    out = []
    order = list(range(len(objs)))
    rng.shuffle(order)
    for i in order:
        names = unique_descriptions(objs, i, size)
        if not names or objs[i]["visible"] < MIN_VISIBLE or not clear_cell(objs[i]["box"], size):
            continue
        q = rng.choice(["In which part of the image is the {r}?",
                        "Which part of the picture is the {r} in?",
                        "Where in the image is the {r}: top, bottom, left, right or centre?"])  # fmt: skip
        out.append((q.format(r=names[0]), cell_words(objs[i]["box"], size), "where"))
        if len(out) == 2:
            break
    return out


def superlative_questions(truth: dict, rng: random.Random) -> list[QA]:
    """The largest and the smallest object's colour or shape, where it is clearly so."""
    objs = truth["objects"]
    if len(objs) < 2:
        return []
    out = []
    for word, sign in ((rng.choice(["largest", "biggest"]), 1), ("smallest", -1)):
        ranked = sorted(range(len(objs)), key=lambda k: sign * objs[k]["area"], reverse=True)
        first, second = (objs[ranked[0]]["area"], objs[ranked[1]]["area"])[::sign]
        if first < AREA_RATIO * second or objs[ranked[0]]["visible"] < MIN_VISIBLE:
            continue
        o = objs[ranked[0]]
        if rng.random() < 0.5:
            q = rng.choice(
                ["What colour is the {w} shape?", "Which colour does the {w} object have?"]
            )
            out.append((q.format(w=word), o["colour"], "superlative"))
        else:
            q = rng.choice(["What shape is the {w} object?", "Which shape is the {w} one?"])
            out.append((q.format(w=word), o["shape"], "superlative"))
    return out


def cell_questions(truth: dict, rng: random.Random) -> list[QA]:
    """One object named by its cell alone (alone in it, in an image of two or more)."""
    objs, size = truth["objects"], truth["width"]
    if len(objs) < 2:
        return []
    cells = [position_phrase(o["box"], size) for o in objs]
    alone = [i for i, o in enumerate(objs) if cells.count(cells[i]) == 1
             and o["visible"] >= MIN_VISIBLE and clear_cell(o["box"], size)]  # fmt: skip
    if not alone:
        return []
    o = objs[i := rng.choice(alone)]
    if rng.random() < 0.5:
        return [(f"What colour is the object {cells[i]}?", o["colour"], "cell")]
    return [(f"What shape is the object {cells[i]}?", o["shape"], "cell")]


NEW_FAMILIES: dict[str, Callable[[dict, random.Random], list[QA]]] = {
    "where": where_questions, "superlative": superlative_questions, "cell": cell_questions,
}  # fmt: skip


def new_questions(truth: dict, rng: random.Random) -> list[QA]:
    return [qa for family in FAMILIES for qa in NEW_FAMILIES[family](truth, rng)]


def world_questions(world: Path, split: str) -> list[tuple[str, Path, list[QA]]]:
    """(image id, image file, the world's VQA questions) of each image of `split`."""
    out = []
    for line in (world / f"{split}.jsonl").read_text().splitlines():
        record = json.loads(line)
        qas = [(qa["q"], qa["a"], qa["type"]) for qa in record["tasks"]["vqa"]]
        out.append((record["id"], world / record["image"], qas))
    return out


def invented_questions(world: Path, split: str, seed: int) -> list[tuple[str, Path, list[QA]]]:
    """(image id, image file, `new_questions`) of each image of `split`, each image's
    questions drawn from a stream of its own (seed, id)."""
    out = []
    for line in (world / f"{split}.jsonl").read_text().splitlines():
        record = json.loads(line)
        rng = random.Random(f"lora-new/{seed}/{record['id']}")
        out.append((record["id"], world / record["image"], new_questions(record["truth"], rng)))
    return out


def with_replay(
    new: list[tuple[str, Path, list[QA]]],
    old: list[tuple[str, Path, list[QA]]],
    fraction: float,
    seed: int,
) -> list[tuple[str, Path, list[QA]]]:
    """`new`'s questions and, drawn (seeded) from `old` (the world's own questions of the
    same images), as many more as make `fraction` of the rows the old questions."""
    if fraction <= 0:
        return new
    pool = [(image_id, qa) for image_id, _, qas in old for qa in qas]
    n_new = sum(len(qas) for _, _, qas in new)
    drawn = random.Random(f"lora-replay/{seed}").sample(
        pool, round(n_new * fraction / (1 - fraction))
    )
    extra: dict[str, list[QA]] = {}
    for image_id, qa in drawn:
        extra.setdefault(image_id, []).append(qa)
    return [(image_id, image, qas + extra.get(image_id, [])) for image_id, image, qas in new]


def write_parquet(images: list[tuple[str, Path, list[QA]]], out: Path, seed: int) -> dict[str, int]:
    """One row per question, written by HF `datasets` as a user's file is: an `id`
    ("<image>-<family>-<k>"), an Image column and chat messages with an image slot; rows
    shuffled (seeded). Returns the rows per family."""
    from datasets import Dataset
    from datasets import Image as ImageFeature
    from PIL import Image

    rows: dict[str, list] = {"id": [], "image": [], "messages": []}
    counts: dict[str, int] = {}
    images_read: dict[str, Image.Image] = {}
    for image_id, image, qas in images:
        for k, (question, answer, family) in enumerate(qas):
            rows["id"].append(f"{image_id}-{family}-{k}")
            if image_id not in images_read:
                images_read[image_id] = Image.open(image).convert("RGB")
            rows["image"].append(images_read[image_id])
            rows["messages"].append([
                {"role": "user", "content": [{"type": "image", "text": None},
                                             {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ])  # fmt: skip
            counts[family] = counts.get(family, 0) + 1
    order = list(range(len(rows["id"])))
    random.Random(seed).shuffle(order)
    data = Dataset.from_dict({k: [v[i] for i in order] for k, v in rows.items()})
    data = data.cast_column("image", ImageFeature())
    out.parent.mkdir(parents=True, exist_ok=True)
    data.to_parquet(str(out))  # PIL images: their bytes go into the file (a path would not)
    return counts


def exact_sign_test(fixed: int, broke: int) -> float:
    """Two-sided exact sign test (McNemar's, exact) of `fixed` against `broke`."""
    from math import comb

    n, low = fixed + broke, min(fixed, broke)
    return min(1.0, 2 * sum(comb(n, i) for i in range(low + 1)) / 2**n) if n else 1.0


def family_of(prediction_id: str) -> str:
    """ "<image>-<family>-<k>-vqa-0" (the eval's item id of one of our rows) -> family."""
    return prediction_id.split("-")[1]


def paired_figures(before: Path, after: Path) -> dict[str, dict]:
    """The same held-out questions before and after, per family and over all: accuracy, its
    blind twin, and how many the fine-tune fixed and broke, with the exact sign test, for
    the model and for its blind twin (a gain the blind twin shares did not come from looking;
    only where both evaluations asked it: `visto eval --no-blind` skips it)."""

    def records(path: Path) -> dict[str, dict]:
        return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}

    a, b = records(before), records(after)
    shared = [k for k in a if k in b and a[k]["score"] is not None]
    groups: dict[str, list[str]] = {"all": shared}
    for k in shared:
        groups.setdefault(family_of(k), []).append(k)
    out = {}
    for name, keys in groups.items():
        figures: dict[str, float | int] = {"questions": len(keys)}
        blind = all("blind_score" in a[k] and "blind_score" in b[k] for k in keys)
        for prefix, field in (("", "score"), ("blind_", "blind_score"))[: 2 if blind else 1]:
            fixed = sum(1 for k in keys if b[k][field] > a[k][field])
            broke = sum(1 for k in keys if b[k][field] < a[k][field])
            figures |= {
                f"{prefix}before": round(sum(a[k][field] for k in keys) / len(keys), 4),
                f"{prefix}after": round(sum(b[k][field] for k in keys) / len(keys), 4),
                f"{prefix}fixed": fixed, f"{prefix}broke": broke,
                f"{prefix}sign_test_p": round(exact_sign_test(fixed, broke), 6),
            }  # fmt: skip
        out[name] = figures
    return out


def eval_old(model: str | Path, data: Path, out: Path, n: int, threads: int, reuse: bool) -> None:
    """`visto eval` of `model` on the world's VQA held-out file (what it knew before); with
    `reuse`, an evaluation already in `out` is kept."""
    if reuse and (out / "eval.json").exists():
        return
    visto("eval", "--model", str(model), "--data", str(data), "--out", str(out), "--n", str(n),
          threads=threads)  # fmt: skip


DATA_FILES = ("train.parquet", "heldout.parquet", "heldout-vqa.parquet")


def build_data(args: argparse.Namespace, size: int) -> dict:
    """Render DATA/world and write the parquet files (step 1); the rows written per family.
    DATA/data.json records the settings they were made with: the same settings reuse them."""
    in_file = args.replay if args.replay_from == "questions" else 0.0  # replay the parquet holds
    settings = {k: getattr(args, k) for k in ("questions", "n", "seed")} | {"size": size,
                                                                          "replay": in_file}  # fmt: skip
    record, world = args.data / "data.json", args.data / "world"
    if record.exists() and json.loads(record.read_text())["settings"] == settings:
        return json.loads(record.read_text())["rows"]
    train_file, heldout_file, old_file = (args.data / f for f in DATA_FILES)
    visto("data", "synth", "--out", str(world), "--n", str(args.n), "--seed", str(args.seed),
          "--size", str(size), "--workers", "1", threads=args.threads)  # fmt: skip
    if args.questions == "new":
        train = with_replay(invented_questions(world, "train", args.seed),
                            world_questions(world, "train"), in_file, args.seed)  # fmt: skip
        heldout = invented_questions(world, "test", args.seed)
    else:
        train, heldout = world_questions(world, "train"), world_questions(world, "test")
    rows = {"train": write_parquet(train, train_file, args.seed),
            "heldout": write_parquet(heldout, heldout_file, args.seed)}  # fmt: skip
    if args.questions == "new":
        rows["heldout_vqa"] = write_parquet(world_questions(world, "test"), old_file, args.seed)
    record.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    return rows


def replay_settings(args: argparse.Namespace) -> list[str]:
    """The recipe's data.replay for --replay/--replay-from (the parquet holds the questions'
    replay itself): a share of what --model was trained on, or none."""
    if args.replay and args.replay_from == "init_from":
        return ["--set", f"data.replay={json.dumps({'share': args.replay, 'source': 'init_from'})}"]
    return ["--set", "data.replay=null"]


def replayed(run: Path) -> list[dict] | None:
    """The old data the run mixed in (its resolved recipe's data.sources marked replay), with
    each source's share of the samples drawn; None when it replayed none through the recipe."""
    data = json.loads((run / "config.json").read_text())["data"]
    sources = data.get("sources") or []
    total = sum(s["weight"] for s in sources)
    old = [{"source": s["source"], "mix": s["mix"], "tasks": s["tasks"],
            "share": round(s["weight"] / total, 4)} for s in sources if s.get("replay")]  # fmt: skip
    return old or None


def train(args: argparse.Namespace, run: Path, train_file: Path, heldout_file: Path) -> None:
    """Step 2: `visto train --recipe llava-lora`, which scores the held-out file before and
    after (with --start the bench scores them itself: the recipe only trains)."""
    if args.start:
        finish = ["--set", "finish.eval_source=null", "--set", "finish.eval_start=false"]
    else:
        finish = ["--set", f"finish.eval_source={heldout_file}",
                  "--set", f"finish.eval_n={args.eval_n}"]  # fmt: skip
    visto("train", "--recipe", "llava-lora", "--out", str(run), "--no-progress",
          "--set", f"model.init_from={args.model}",
          "--set", f"data.source={train_file}", "--set", "data.image_root=null",
          *finish, "--set", "finish.eval_image_root=null",
          "--set", "finish.export=null", "--set", f"max_steps={args.steps}",
          "--set", f"batch_size={args.batch}",
          *(["--set", f"optim.lr={args.lr}"] if args.lr is not None else []),
          "--set", f"num_threads={args.threads}", "--set", f"seed={args.train_seed}",
          *(["--set", "lora.trainable=[]"] if args.freeze_projector else []),
          *replay_settings(args), "--set", f"checkpoint_every={args.checkpoint_every}",
          *(x for setting in args.set for x in ("--set", setting)),
          threads=args.threads)  # fmt: skip


def trained_steps(run: Path) -> tuple[int, int]:
    """(the last step RUN/metrics.jsonl logged, the run's max_steps): a run cut short (Ctrl-C,
    a timeout's SIGINT) saves a checkpoint but has not reached its budget."""
    recipe = json.loads((run / "config.json").read_text())
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return 0, recipe["max_steps"]
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()]
    return max(steps, default=0), recipe["max_steps"]


def evaluate(model: str | Path, data: Path, out: Path, n: int, args: argparse.Namespace) -> None:
    """`visto eval` of `model` on the first `n` rows of `data` into `out`; one already there is
    kept with --reuse (and always under --start, whose settings are checked once)."""
    if (args.reuse or out.parent == args.start) and (out / "eval.json").exists():
        return
    visto("eval", "--model", str(model), "--data", str(data), "--out", str(out), "--n", str(n),
          *(["--no-blind"] if args.no_blind else []), threads=args.threads)  # fmt: skip


def check_start(args: argparse.Namespace) -> None:
    """--start DIR holds the starting model's evaluations for these settings only:
    DIR/start.json records them, and other settings are refused (name another DIR)."""
    settings = {"model": str(args.model), "data": str(args.data), "questions": args.questions,
                "eval_n": args.eval_n, "old_n": args.old_n, "blind": not args.no_blind}  # fmt: skip
    record = args.start / "start.json"
    if record.exists():
        held = json.loads(record.read_text())
        if held != settings:
            changed = sorted(k for k in settings if held.get(k) != settings[k])
            raise SystemExit(f"--start {args.start} holds the evaluations of other settings "
                             f"({', '.join(changed)}: {[held.get(k) for k in changed]}); "
                             "name another directory")  # fmt: skip
        return
    args.start.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings, indent=2) + "\n")


OLD_TYPES_SHOWN = ("all", "count", "relation", "exist", "colour", "shape", "attribute", "read")


def summary(result: dict) -> dict[str, str]:
    """One line per figure the issue's goal names: 'before -> after (fixed/broke)'."""

    def line(f: dict) -> str:
        change = f"{f['before']:.3f} -> {f['after']:.3f}"
        return f"{change} ({f['fixed']}/{f['broke']}, n {f['questions']})"

    out = {f"new.{k}": line(v) for k, v in result["paired"].items()}
    old = result.get("old_vqa", {}).get("paired", {})
    out |= {f"old.{k}": line(old[k]) for k in OLD_TYPES_SHOWN if k in old}
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="runs/r3/checkpoint", help="a visto or transformers LLaVA")
    p.add_argument("--questions", choices=QUESTION_SETS, default="new",
                   help="new: questions the model never saw (module doc); world: the world's VQA")  # fmt: skip
    p.add_argument("--replay", type=float, default=0.0,
                   help="this fraction of the training samples are old data (what the model "
                        "knew), the rest new; 0: none")  # fmt: skip
    p.add_argument("--replay-from", choices=("init_from", "questions"), default="init_from",
                   help="init_from: the recipe's data.replay (what --model was trained on, as its "
                        "card records it); questions: the world's own questions of the training "
                        "images written into the training parquet (--questions new)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("bench/out/lora_finetune"))
    p.add_argument("--data", type=Path,
                   help="where the world and parquet files are built, or reused when built with "
                        "the same settings (default --out): several runs share one set")  # fmt: skip
    p.add_argument("--n", type=int, default=2000, help="images rendered (train 80%%, test 5%%)")
    p.add_argument("--size", type=int, help="image side rendered (default: the model's)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, help="optim.lr (default: the recipe's)")
    p.add_argument("--freeze-projector", action="store_true",
                   help="lora.trainable=[]: adapters only (the recipe's default trains the "
                        "projector at a tenth of the lr)")  # fmt: skip
    p.add_argument("--train-seed", type=int, default=0, help="the recipe's seed (order, init)")
    p.add_argument("--eval-n", type=int, default=200, help="held-out questions scored")
    p.add_argument("--old-n", type=int,
                   help="old questions scored (--questions new; default --eval-n): counting and "
                        "relations are 28%% and 10%% of them")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more recipe setting for `visto train` (after the bench's own, so it "
                        "wins), e.g. lora.rank=8 or optim.module_lrs.multi_modal_projector=0; "
                        "repeatable: the levers one run measures")  # fmt: skip
    p.add_argument("--start", type=Path,
                   help="a directory for the starting model's evaluations (new, old), computed "
                        "once and shared by every run that names it with the same model, data "
                        "and --eval-n/--old-n/--no-blind; the runs' own are then scored by the "
                        "bench (RUN/new, RUN/old) and the recipe only trains")  # fmt: skip
    p.add_argument("--no-blind", action="store_true",
                   help="with --start: no blind twins (half the evaluation time)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--checkpoint-every", type=int, default=50,
                   help="steps between the run's checkpoints (what --reuse resumes from)")
    p.add_argument("--reuse", action="store_true",
                   help="keep OUT/run's training and evaluations where they are done (a run cut "
                        "short goes on from its last finished step; wall times then cover only "
                        "what ran)")  # fmt: skip
    args = p.parse_args()
    if not 0 <= args.replay < 1:
        p.error(f"--replay is a fraction of the training rows in [0, 1), got {args.replay}")
    if args.replay and args.replay_from == "questions" and args.questions == "world":
        p.error("--replay-from questions mixes the world's questions into --questions new; "
                "world has only those")

    if args.no_blind and not args.start:
        p.error("--no-blind goes with --start (the recipe's own evaluation asks blind twins)")
    args.old_n = args.old_n or args.eval_n

    from visto.checkpoint import read_config

    size = args.size or read_config(args.model)["config"]["processor"]["image_size"]
    t0, load_before = time.time(), loadavg()
    args.data = args.data or args.out
    train_file, heldout_file, old_file = (args.data / f for f in DATA_FILES)
    rows = build_data(args, size)
    t_data = time.time() - t0

    run = args.out / "run"
    t1 = time.time()
    if args.start:
        check_start(args)
        start_new, after_new = args.start / "new", run / "new"
        start_old, after_old = args.start / "old", run / "old"
        evaluate(args.model, heldout_file, start_new, args.eval_n, args)
        if args.reuse and (run / "config.json").exists():
            done, budget = trained_steps(run)
            if done < budget:  # cut short: the run goes on with its own recipe
                for stale in (after_new, after_old):  # scores of the checkpoint cut short
                    (stale / "eval.json").unlink(missing_ok=True)
                visto("train", "--resume", str(run), "--no-progress", threads=args.threads)
        else:
            train(args, run, train_file, heldout_file)
        evaluate(run / "checkpoint", heldout_file, after_new, args.eval_n, args)
    else:
        start_new, after_new = run / "eval-start", run
        start_old, after_old = run / "old-start", run / "old"
        if args.reuse and (run / "eval.json").exists():
            print(f"--reuse: {run} is trained and scored; not run again", flush=True)
        elif args.reuse and (run / "config.json").exists():
            # Cut short (Ctrl-C saves a checkpoint): the run goes on with its own recipe.
            visto("train", "--resume", str(run), "--no-progress", threads=args.threads)
        else:
            train(args, run, train_file, heldout_file)
    wall_train = time.time() - t1
    before = json.loads((start_new / "eval.json").read_text())
    after = json.loads((after_new / "eval.json").read_text())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "loss" in r and r.get("split", "train") == "train"]
    keys = sorted(k for k in after if k.startswith(("vqa.", "blind.vqa.")))
    recipe = json.loads((run / "config.json").read_text())
    result = {
        "model": args.model, "questions": args.questions, "replay": args.replay,
        "replay_from": args.replay_from if args.replay else None, "replayed": replayed(run),
        "rendered_images": args.n, "seed": args.seed, "rows": rows, "eval_n": args.eval_n,
        "old_n": args.old_n, "steps": args.steps, "batch": args.batch,
        "lr": recipe["optim"]["lr"], "lora": recipe["lora"],
        "module_lrs": recipe["optim"]["module_lrs"], "settings": args.set,
        "train_seed": args.train_seed, "freeze_projector": args.freeze_projector,
        "threads": args.threads,
        "vqa_before": before.get("vqa.overall"), "vqa_after": after.get("vqa.overall"),
        "vqa_gain": round(after.get("vqa.overall", 0) - before.get("vqa.overall", 0), 4),
        "figures": {k: {"before": before.get(k), "after": after.get(k)} for k in keys},
        "paired": paired_figures(start_new / "predictions.jsonl", after_new / "predictions.jsonl"),
        "first_loss": logged[0]["loss"] if logged else None,
        "last_loss": logged[-1]["loss"] if logged else None,
        "last_step": logged[-1]["step"] if logged else None,
        "train_seconds": logged[-1].get("elapsed_s") if logged else None,
        "data_wall_s": round(t_data, 1),
        "train_and_evals_wall_s": round(wall_train, 1),
    }  # fmt: skip
    if args.questions == "new":
        t2 = time.time()
        if args.start:
            evaluate(args.model, old_file, start_old, args.old_n, args)
            evaluate(run / "checkpoint", old_file, after_old, args.old_n, args)
        else:
            eval_old(args.model, old_file, start_old, args.old_n, args.threads, args.reuse)
            eval_old(run / "checkpoint", old_file, after_old, args.old_n, args.threads, args.reuse)
        result["old_vqa"] = {
            "paired": paired_figures(start_old / "predictions.jsonl", after_old / "predictions.jsonl"),
            "wall_s": round(time.time() - t2, 1),
        }  # fmt: skip
    result["summary"] = summary(result)
    result |= {"total_wall_s": round(time.time() - t0, 1), "load_before": load_before,
               "load_after": loadavg()}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
