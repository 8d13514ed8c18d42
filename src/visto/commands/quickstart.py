"""`visto quickstart`: the whole pipeline on the synthetic world (see `visto.quickstart`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from visto.commands._common import add_command

ORDER = 10

DESCRIPTION = """\
Train and evaluate a small vision-language model from nothing, offline, on a CPU.

The training budget is a number of optimizer steps per stage, so the same seed gives the
same model on any machine; the defaults are 4,000 + 800 + 200 steps (measured times per
stage, with the machine's load, in bench/README.md "Quickstart").
--minutes caps the training time instead: a stage it stops early prints (and records in
its done.json) how many of its steps were cut, and its model differs from the default's.

Stages (each writes a folder in RUN and is skipped on a re-run when its settings are
unchanged; --fresh redoes everything):
  1. data     render the synthetic world: RUN/world (+ RUN/world/show.png, look at it)
  2. vision   pretrain the ViT on the world's dense labels (per-patch shape, colour,
              size, object centres and boxes, characters of the texts); with
              --text-slots, also the OCR reader (find each line, read it with CTC): RUN/vision
  3. stage1   LLaVA stage 1 (recipe quickstart-stage1, mix "look": a caption and two short
              questions per image), vision tower frozen. The connector gives the decoder
              one token per detected object, made of the decoder's own words for its
              colour, shape, size and box (visto.connectors.regions); --box-tokens
              follows each with its box's 4 location tokens, --text-slots N adds N lines
              of text the OCR reader read, as the decoder's own tokens (both measured
              worse at the default budget: bench/README.md, "Quickstart"): RUN/stage1
  4. stage2   LLaVA stage 2 (recipe quickstart-stage2, mix "instruct+caption"): every question of
              an image (VQA, counting, grounding with box tokens, OCR, JSON) in one sample
              as independent turns, none of which can see another: RUN/stage2
  5. eval     test split and held-out colour-shape pairs: RUN/eval.json, RUN/report.md

The final model is RUN/checkpoint (open it with visto.load).

Examples:
  visto quickstart
  visto quickstart --out runs/qs --stage2-steps 400        a longer stage 2
  visto quickstart --vision-steps 100 --stage1-steps 20 --stage2-steps 20 --n 600
                                                            a smoke run in a few minutes
  visto quickstart --minutes 10                             at most 10 training minutes
  visto quickstart --until data                             only render the world
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "quickstart", "the whole pipeline on the synthetic world", DESCRIPTION)
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"),
                   help="run directory (default runs/quickstart)")  # fmt: skip
    p.add_argument("--vision-steps", type=int, default=None, metavar="N",
                   help="steps of the vision stage (default 4000)")  # fmt: skip
    p.add_argument("--box-tokens", action="store_true",
                   help="follow each object token with its box's 4 location tokens (5 tokens an "
                        "object); measured worse at the default budget")  # fmt: skip
    p.add_argument("--text-slots", type=int, default=None, metavar="N",
                   help="lines of text the connector's OCR reader reads into the decoder's own "
                        "tokens (default 0: no reader)")  # fmt: skip
    p.add_argument("--reader-steps", type=int, default=None, metavar="N",
                   help="steps of the OCR reader (with --text-slots), trained in the vision stage "
                        "on the world's text boxes (default 1000)")  # fmt: skip
    p.add_argument("--stage1-steps", type=int, default=None, metavar="N",
                   help="steps of LLaVA stage 1 (default 800)")  # fmt: skip
    p.add_argument("--stage2-steps", type=int, default=None, metavar="N",
                   help="steps of LLaVA stage 2 (default 200)")  # fmt: skip
    p.add_argument("--minutes", type=float, default=None,
                   help="optional cap on the three training stages together (split 25%% vision, "
                        "8%% stage 1, 55%% stage 2); a stage it stops early says how many steps "
                        "it cut (default: no cap, the step budgets alone)")  # fmt: skip
    p.add_argument("--n", type=int, default=5000, help="images in the world (default 5000)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=2, help="processes for rendering (default 2)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default 0: 1 on a busy machine, else all cores)")  # fmt: skip
    p.add_argument("--eval-images", type=int, default=None,
                   help="test and held-out images asked every question (default 200)")  # fmt: skip
    p.add_argument("--stage1-mix", default=None, metavar="MIX",
                   help="training mix of stage 1 (visto.data.synth.mixes: captions, look, instruct, "
                        "instruct+caption; default look)")  # fmt: skip
    for stage in ("stage1", "stage2"):
        p.add_argument(f"--{stage}-batch", type=int, default=None, metavar="N",
                       help=f"samples per step of {stage} (default 16)")
    p.add_argument("--vision-stem", default=None, metavar="{patch,conv}",
                   help="how the ViT embeds patches: 'patch' (one linear projection, exports to "
                        "transformers/vLLM) or 'conv' (3x3 stride-2 convs: learns shapes faster "
                        "from scratch, no transformers export; default conv, bench/dense_stem.py)")  # fmt: skip
    p.add_argument("--vision-batch", type=int, default=None, metavar="N",
                   help="images per step of the vision stage (default 16). A step at 16 costs "
                        "about a quarter of one at 64: on a 20,000-image world 4,000 steps at 16 "
                        "gave val patch shape 0.965 against 0.862 for 1,000 at 64 "
                        "(bench/clip_figures.py --dense-batch)")  # fmt: skip
    p.add_argument("--until", choices=["data", "vision", "stage1", "stage2", "eval"],
                   default="eval", help="stop after this stage (default: run them all)")  # fmt: skip
    p.add_argument("--fresh", action="store_true", help="redo every stage, even unchanged ones")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from visto.errors import UserError
    from visto.quickstart import HEADLINE, QuickstartConfig, run_quickstart

    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.threads < 0:
        raise UserError(f"--threads must be 0 (automatic) or more, got {args.threads}")
    steps = {name: value for name in ("vision_steps", "reader_steps", "stage1_steps", "stage2_steps")
             if (value := getattr(args, name)) is not None}  # fmt: skip
    cfg = QuickstartConfig(
        minutes=args.minutes, n=args.n, size=args.size, seed=args.seed, workers=args.workers,
        threads=args.threads, **steps,
        **{name: value for name in ("eval_images", "stage1_mix", "stage1_batch", "stage2_batch")
           if (value := getattr(args, name)) is not None},
        **({"vision_stem": args.vision_stem} if args.vision_stem else {}),
        **({"vision_batch": args.vision_batch} if args.vision_batch is not None else {}),
        **({"box_tokens": True} if args.box_tokens else {}),
        **({"text_slots": args.text_slots} if args.text_slots is not None else {}),
    )  # fmt: skip
    console = Console()
    result = run_quickstart(cfg, args.out, fresh=args.fresh, console=console, until=args.until)
    m = result.metrics
    if args.until != "eval":
        console.print(f"stopped after {args.until}: {result.checkpoint}")
        return 0
    console.print()
    console.print("[bold]figures[/] (test | held-out colour-shape pairs):")
    for key, label, _target in HEADLINE:
        if key in m:
            held = m.get("heldout." + key)
            console.print(f"  {label:<20} {m[key]:.3f} | " + ("-" if held is None else f"{held:.3f}"))
    total = sum(result.seconds.values())
    console.print(f"time: {total / 60:.1f} min (" + ", ".join(
        f"{s} {v:.0f} s" for s, v in result.seconds.items()) + ")")  # fmt: skip
    console.print(f"report:     {result.report}")
    console.print(f"checkpoint: {result.checkpoint}")
    console.print(f"figures:    {result.run_dir / 'eval.json'}")
    return 0
