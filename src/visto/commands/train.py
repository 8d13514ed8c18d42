"""`visto train`: run a recipe through the one training loop, or resume a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from visto.commands._common import add_command
from visto.errors import UserError

ORDER = 30

DESCRIPTION = """\
Train a model with a recipe: a JSON file that names the model (family and config), the data,
the optimizer (with per-module learning rates; 0 freezes a module), the schedule (warmup,
cosine) and the budget (max_steps and/or max_minutes). Shipped recipes are found by name;
`--list` shows them.

The run directory (--out, default runs/<recipe name>) receives:
  config.json        the resolved recipe (also printed at the start)
  metrics.jsonl      one JSON object per log step (loss, lr, samples/s) and per evaluation
  checkpoints/step_N periodic checkpoints; checkpoint/ the latest (final) one
  report.md          final figures and plots/*.png (loss and every metric the model returns)

Ctrl-C once: finish the step, save a checkpoint and stop; `--resume RUN` continues it with
the same loss curve. Resume a finished run with a larger budget to train it further.
`--set processor.max_length=N` changes only where training truncates a sample, keeping the
processor the model starts with (model.init_from's, a resumed run's); the saved checkpoint
carries the new length.
Under torchrun (WORLD_SIZE > 1) each rank reads its shard of the data and the model is
wrapped in DDP, or sharded with FSDP2 with `--set distributed=fsdp` (parameters, gradients and
optimizer state split over the ranks); checkpoints are gathered whole either way, so a run
resumes on any number of processes.

A recipe's `finish` section says what happens to the final checkpoint: `visto eval` on a
held-out dataset (finish.eval_source, any format; eval.json and report.md in the run, and
with finish.eval_start the starting model's figures in RUN/eval-start beside them), then
`visto export` (finish.export: "visto" merges LoRA into a visto checkpoint, "hf" writes a
transformers directory) into RUN/export.

Examples:
  visto train --list
  visto train --recipe clip-synth --set data.source=runs/world
  visto train --recipe my-recipe.json --out runs/exp1 --set optim.lr=3e-4 --set max_minutes=8
  visto train --recipe clip-synth --set optim.module_lrs.vision_model=0    (freeze the vision tower)
  visto train --recipe my-llava.json --set data.source=llava_v1_5_mix665k.json --image-root data/
  visto train --recipe llava-lora --set data.source=train.json --set data.image_root=images/ \
      --set model.init_from=runs/quickstart/checkpoint --set finish.eval_source=heldout.json
  visto train --recipe llava-tools --set processor.max_length=1024
                                  (its init_from checkpoint's processor, truncating at 1024)
  visto train --resume runs/exp1
  visto train --resume runs/exp1 --set max_steps=2000                 (train it further)
  torchrun --nproc_per_node 2 -m visto.cli train --recipe clip-synth --out runs/ddp
  torchrun --nproc_per_node 4 -m visto.cli train --recipe llava-lora --set distributed=fsdp
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "train", help="train a model with a recipe (or resume a run)", description=DESCRIPTION)
    p.add_argument("--recipe", metavar="NAME_OR_PATH", help="a shipped recipe name or a JSON file")
    p.add_argument("--out", metavar="DIR", help="the run directory (default: runs/<recipe name>)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe setting, e.g. optim.lr=3e-4 or data.tasks='[\"vqa\"]' (repeatable)",
    )
    p.add_argument(
        "--image-root", metavar="DIR",
        help="where the data's image paths point (LLaVA's --image_folder, COCO's image folder); "
        "same as --set data.image_root=DIR",
    )
    p.add_argument("--caption-key", metavar="NAME", help="same as --set data.caption_key=NAME")
    p.add_argument("--image-key", metavar="NAME", help="same as --set data.image_key=NAME")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its latest checkpoint")
    p.add_argument("--list", action="store_true", help="list the shipped recipes and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from visto.commands._train_finish import check_finish, finish_run
    from visto.train.recipe import list_recipes, load_recipe

    console = Console(soft_wrap=True)  # paths stay whole, copyable
    args.overrides = [*args.overrides, *data_flag_overrides(args)]
    if args.list:
        for name, description in list_recipes().items():
            console.print(f"[bold]{name}[/bold]  {description}", highlight=False)
        return 0
    if args.resume:
        if args.recipe:
            raise UserError("--resume continues a run with its own recipe; drop --recipe (use --set to change it)")
        if args.out and Path(args.out) != Path(args.resume):
            raise UserError("--resume writes into the run it continues; drop --out")
        from visto.train.loop import load_run_recipe, train

        recipe = load_run_recipe(args.resume, args.overrides)
        check_finish(recipe)
        result = train(recipe, args.resume, resume=True, console=console, show_progress=not args.no_progress)
    else:
        if not args.recipe:
            raise UserError("name a recipe with --recipe NAME_OR_PATH (see `visto train --list`), or --resume RUN")
        recipe = load_recipe(args.recipe, args.overrides)
        from visto.train.loop import train

        check_finish(recipe)
        out = Path(args.out) if args.out else Path("runs") / (recipe.name or "train")
        result = train(recipe, out, console=console, show_progress=not args.no_progress)
    from visto.train.distributed import init_distributed, leave_process_group

    if not result.stopped_early and init_distributed().main:
        finish_run(recipe, Path(result.run_dir), console)
    leave_process_group()  # under torchrun: a clean exit for every rank
    return 130 if result.stopped_early else 0


def data_flag_overrides(args: argparse.Namespace) -> list[str]:
    """--image-root / --caption-key / --image-key as the `--set data.*` they stand for."""
    import json

    flags = {"image_root": args.image_root, "caption_key": args.caption_key, "image_key": args.image_key}
    return [f"data.{name}={json.dumps(value)}" for name, value in flags.items() if value is not None]
