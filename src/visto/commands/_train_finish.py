"""What `visto train` does with a run's final checkpoint (a recipe's `finish` section): score
it on a held-out dataset with `visto eval` (and the model training started from, to measure
what training changed), then export it with `visto export`. Each step runs the command
itself, so its files, figures and errors are the ones that command gives."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import ModuleType
from typing import Any

from visto.errors import UserError

START_DIR = "eval-start"  # RUN/eval-start: the starting model's figures
EXPORT_DIR = "export"  # RUN/export: the exported checkpoint


def check_finish(recipe: Any) -> None:
    """Before training: the held-out files the finish step reads exist (fail fast)."""
    finish = recipe.finish
    for name in ("eval_source", "eval_image_root"):
        path = getattr(finish, name)
        if path is not None and not Path(path).exists():
            raise UserError(f"finish.{name} {path} does not exist; fix the path or set it to null")


def run_command(module: ModuleType, argv: list[str]) -> int:
    """A visto sub-command (`module`: one of visto.commands) run with `argv`, as the CLI does."""
    parser = argparse.ArgumentParser(prog="visto")
    module.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.run(args)


def eval_argv(checkpoint: str | Path, finish: Any, out: Path) -> list[str]:
    argv = ["eval", "--model", str(checkpoint), "--data", str(finish.eval_source),
            "--out", str(out), "--n", str(finish.eval_n)]  # fmt: skip
    if finish.eval_image_root is not None:
        argv += ["--image-root", str(finish.eval_image_root)]
    return argv


def finish_run(recipe: Any, run_dir: Path, console: Any) -> None:
    """Evaluate and export RUN/checkpoint as `recipe.finish` says."""
    import json

    from visto.commands import eval as eval_command
    from visto.commands import export as export_command

    finish, checkpoint = recipe.finish, run_dir / "checkpoint"
    if finish.eval_source is not None:
        if finish.eval_start:
            console.print(f"evaluating the starting model {recipe.model.init_from}")
            run_command(
                eval_command, eval_argv(recipe.model.init_from, finish, run_dir / START_DIR)
            )
        console.print(f"evaluating {checkpoint} on {finish.eval_source}")
        run_command(eval_command, eval_argv(checkpoint, finish, run_dir))
        if finish.eval_start:
            start = json.loads((run_dir / START_DIR / "eval.json").read_text())
            trained = json.loads((run_dir / "eval.json").read_text())
            console.print(change_table(start, trained))
    if finish.export is not None:
        argv = ["export", str(checkpoint), "--out", str(run_dir / EXPORT_DIR),
                "--format", finish.export, "--overwrite"]  # fmt: skip
        run_command(export_command, argv)


def change_table(start: dict[str, float], trained: dict[str, float]) -> Any:
    """Each figure of the starting model beside the trained one's, and the gain over its
    blind twin (the blind figures themselves are in the two reports)."""
    from rich.table import Table

    table = Table(title="held-out figures: start -> trained")
    for column in ("metric", "start", "trained", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name in sorted(set(start) & set(trained)):
        if name.startswith("blind."):
            continue
        change = trained[name] - start[name]
        table.add_row(name, f"{start[name]:.3f}", f"{trained[name]:.3f}", f"{change:+.3f}")
    return table
