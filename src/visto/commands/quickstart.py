"""`visto quickstart`: the whole pipeline on the synthetic world, one step after another.

Each step is a function `(args, run_dir) -> None` in `STEPS`, run in order; a step reuses
what an earlier run left in `run_dir` when its settings have not changed, so running the
quickstart twice is quick the second time.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from visto.commands._common import add_command

ORDER = 10

DESCRIPTION = """\
Run the whole visto pipeline on the built-in synthetic world, offline, on a CPU.

Steps:
  1. data   render the synthetic world into RUN/world (reused when it exists with the same
            settings) and draw a contact sheet of it: RUN/world/show.png

Model training, evaluation and serving steps join this command as they land.

Examples:
  visto quickstart
  visto quickstart --out runs/qs --n 2000 --size 64
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "quickstart", "the whole pipeline on the synthetic world", DESCRIPTION)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/quickstart"),
        help="run directory (default runs/quickstart)",
    )
    p.add_argument("--n", type=int, default=5000, help="images in the world (default 5000)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=2, help="processes for rendering (default 2)")
    p.add_argument(
        "--fresh", action="store_true", help="regenerate the world even if it is up to date"
    )
    p.set_defaults(run=run)


def world_is_current(world_dir: Path, cfg) -> bool:
    """The world at `world_dir` was made by this version with exactly these settings."""
    import json

    from visto.config import to_dict
    from visto.data.synth.config import WORLD_VERSION

    try:
        meta = json.loads((world_dir / "world.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return meta.get("version") == WORLD_VERSION and meta.get("config") == to_dict(cfg)


def step_data(args: argparse.Namespace, run_dir: Path) -> None:
    from rich.console import Console

    from visto.commands.data import synth_with_progress
    from visto.data.synth import WorldConfig
    from visto.data.synth.show import show_world

    console = Console()
    cfg = WorldConfig(n=args.n, seed=args.seed, size=args.size).validate()
    world_dir = run_dir / "world"
    if not args.fresh and world_is_current(world_dir, cfg):
        console.print(f"[bold]data[/]: reusing {world_dir} (same settings)")
    else:
        console.print(
            f"[bold]data[/]: rendering {cfg.n} images of {cfg.size}x{cfg.size} px into {world_dir}"
        )
        synth_with_progress(cfg, world_dir, args.workers)
    sheet = show_world(world_dir, world_dir / "show.png", split="train", n=12)
    console.print(f"[bold]data[/]: splits in {world_dir}: train/val/test/heldout .jsonl")
    console.print(f"[bold]data[/]: look at the data first: {sheet}")


STEPS: list[tuple[str, Callable[[argparse.Namespace, Path], None]]] = [("data", step_data)]


def run(args: argparse.Namespace) -> int:
    from visto.errors import UserError

    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    run_dir = args.out
    run_dir.mkdir(parents=True, exist_ok=True)
    for _name, step in STEPS:
        step(args, run_dir)
    world = run_dir / "world"
    print()
    print("Done so far: the synthetic world and its contact sheet. What you can do with it now:")
    print(
        f"  visto data show {world} --split heldout      images with never-trained colour-shape pairs"
    )
    print(f"  visto data export {world} --split train --format llava --out {run_dir / 'llava'}")
    print("Coming next in this quickstart: train a small VLM on this world, evaluate it")
    print(
        f"(counting, VQA, grounding, OCR, held-out pairs) and serve it; results land in {run_dir}."
    )
    return 0
