"""`visto compare`: every family on the same world and budget, one report (see `visto.compare`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from visto.commands._common import add_command

ORDER = 45

DESCRIPTION = """\
Train every architecture family on the same synthetic world for the same compute
budget, evaluate each through `visto eval`, and report them side by side.

Held equal: the data (the mix "instruct+caption": every VQA, grounding, box ->
description, OCR and JSON question of an image and a caption, as independent turns of
one sample), the image size and tokenizer, batch 16, the compute, and the vision tower
(the quickstart's dense-pretrained ViT, trained once and frozen in every family that has
one), and in front of every decoder the same question focus (the tower's detector and OCR
reader, frozen; the question's named words pick the objects each answer is about, written
into <focus> slots before the answer and copied by a pointer head; CogVLM's has box slots
only, no read slots or pointer): the families differ in
how the image itself reaches the decoder (LLaVA's object tokens in the sequence, BLIP-2's
Q-Former, Flamingo's resampler and gated cross-attention, Fuyu's raw patches, CogVLM's
visual expert). Within these budgets most of what the families answer comes through that
shared focus; bench/README.md measures each family's own path apart. The compute is a step
budget per family: the steps that family takes in 8 minutes on the reference machine (2
idle cores; its recipe compare-<family> holds the number), so the same seed gives the same
models on any machine. A family that takes nothing from the shared tower (a recipe of
your own: Fuyu without its question_focus reads raw patches only) is credited the tower's
pretraining time as steps at its own pace (--no-credit: not). --steps sets one count for
every family; --minutes caps each family's training time, and a family it stops early says
how many steps it cut.

Writes into OUT (default runs/compare):
  world/ vision/                       the world and the shared vision tower
  <family>/train/                      the training run (recipe compare-<family>)
  <family>/eval.json, predictions.jsonl   the `visto eval` figures and answers
  compare.json                         every figure, the winner of every task
  report.md, plots/accuracy.png        tables per task (test, held-out), parameters,
                                       visual tokens, samples/s, time to first token,
                                       decode tokens/s, and VQA accuracy against
                                       training steps and minutes, every family a line
A family already done with the same settings is reused: re-running adds what is missing.

Examples:
  visto compare
  visto compare --families llava,fuyu --steps 40 --n 800 --eval-images 20
  visto compare --data runs/world --minutes 4 --out runs/compare-4min
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "compare", "train every family at one budget and compare them", DESCRIPTION)
    p.add_argument("--families", default="llava,blip2,flamingo,fuyu,cogvlm",
                   help="comma-separated families (default: llava,blip2,flamingo,fuyu,cogvlm)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per family (default: its recipe's, the steps of the "
                        "same minutes for every family; pace: bench/README.md)")  # fmt: skip
    p.add_argument("--minutes", type=float, default=None,
                   help="optional cap on each family's training minutes (default: none)")  # fmt: skip
    p.add_argument("--data", metavar="DIR", help="an existing 128-px synthetic world (default: render one)")
    p.add_argument("--n", type=int, default=5000, help="images of the rendered world (default 5000, the quickstart's)")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="output directory")
    p.add_argument("--eval-images", type=int, default=200,
                   help="test and held-out images evaluated per family (default 200)")  # fmt: skip
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="world tasks to evaluate (default: all of visto eval's)")  # fmt: skip
    p.add_argument("--vision-steps", type=int, default=4000,
                   help="dense pretraining steps of the shared ViT at batch 16, once (default "
                        "4000, the quickstart's: copy a quickstart's world/ and vision/ into --out "
                        "to reuse them; minutes: bench/README.md)")  # fmt: skip
    p.add_argument("--reader-steps", type=int, default=1000,
                   help="training steps of the shared OCR reader, once, beside the ViT; the "
                        "families whose recipes read text (compare's LLaVA) read with it "
                        "(default 1000)")  # fmt: skip
    p.add_argument("--no-credit", action="store_true",
                   help="do not give tower-less families the tower's pretraining time as steps")  # fmt: skip
    p.add_argument("--probe-images", type=int, default=8,
                   help="test images whose VQA questions draw the accuracy-vs-time curve (default 8)")  # fmt: skip
    p.add_argument("--probe-points", type=int, default=5, help="checkpoints on that curve (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: 1 on a busy machine)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from visto.compare import CompareConfig, run_compare

    cfg = CompareConfig(
        families=[f.strip() for f in args.families.split(",") if f.strip()], steps=args.steps,
        minutes=args.minutes, data=args.data, n=args.n, seed=args.seed, vision_steps=args.vision_steps,
        reader_steps=args.reader_steps,
        credit_vision_time=not args.no_credit, eval_images=args.eval_images, tasks=args.tasks,
        probe_images=args.probe_images, probe_points=args.probe_points, threads=args.threads,
    )  # fmt: skip
    console = Console()
    result = run_compare(cfg, args.out, console=console)
    console.print(f"report: {result.report}")
    return 0
