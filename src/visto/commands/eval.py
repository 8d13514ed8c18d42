"""`visto eval`: evaluate a checkpoint on a synthetic world; write eval.json and report.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from visto.commands._common import add_command
from visto.errors import UserError

ORDER = 40

DESCRIPTION = """\
Evaluate a checkpoint on a synthetic world and write, into the run directory:
  eval.json    the figures as one flat JSON object, name -> number (for scripts and CI)
  report.md    the same figures as a table, bar plots seen vs held-out, the training curve

What is measured depends on the model family:
  two-tower (clip)   zero-shot classification of shape, colour and "colour shape" with a
                     prompt-template ensemble; image->text and text->image recall@1/5/10;
                     k-means clustering of image embeddings (purity, NMI). Every figure is
                     also given on the held-out split (unseen colour-shape pairs) as
                     heldout.<name>.

Examples:
  visto eval --model runs/clip/checkpoint --data runs/world
  visto eval --model runs/clip/checkpoint --data runs/world --n 500 --paraphrase
  visto eval --model runs/clip/checkpoint --data runs/world --templates single
  visto eval --model ckpt --data runs/world --templates "a drawing of a {}." --out runs/ev

--out defaults to the run directory holding the checkpoint (runs/NAME for
runs/NAME/checkpoint, where metrics.jsonl lies), else runs/eval-<checkpoint name>.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "eval", "evaluate a checkpoint: eval.json + report.md", DESCRIPTION)
    p.add_argument("--model", required=True, metavar="CKPT", help="checkpoint directory")
    p.add_argument("--data", required=True, metavar="DIR", help="synthetic world directory")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--out", metavar="RUN_DIR", help="where eval.json and report.md go")
    p.add_argument(
        "--n",
        type=int,
        help="images per split (two-tower: the retrieval gallery, default 1000)",
    )
    two = p.add_argument_group("two-tower (clip) options")
    two.add_argument(
        "--templates",
        action="append",
        metavar="SET_OR_TEMPLATE",
        help="prompt templates for zero-shot: a set name (single, ensemble, paraphrase) or a "
        "template with {} for the class name; repeat to combine (default: ensemble)",
    )
    two.add_argument(
        "--paraphrase",
        action="store_true",
        help="also score zero-shot with paraphrased prompts no training caption uses "
        "(paraphrase.zeroshot.*) and say in the report what changed",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images/texts per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed for k-means (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if present, else cpu)")
    p.set_defaults(run=run)


def resolve_templates(values: list[str] | None) -> tuple[str, ...]:
    from visto.eval.twotower import DEFAULT_TEMPLATES, TEMPLATE_SETS

    out: list[str] = []
    for value in values or [DEFAULT_TEMPLATES]:
        if value in TEMPLATE_SETS:
            out.extend(TEMPLATE_SETS[value])
        elif value.count("{}") == 1:
            out.append(value)
        else:
            raise UserError(
                f"--templates {value!r} is neither a template set ({', '.join(TEMPLATE_SETS)}) "
                "nor a template with exactly one {} for the class name, e.g. 'a photo of a {}.'"
            )
    return tuple(dict.fromkeys(out))


def kind_options(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """The settings only one kind of evaluation takes, from the command line."""
    if kind == "two_tower":
        return {"templates": resolve_templates(args.templates), "paraphrase": args.paraphrase}
    return {}


def find_run_dir(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint sits in: the nearest of it and its two parents that
    holds metrics.jsonl (runs/NAME/checkpoint, runs/NAME/checkpoints/step-100)."""
    for d in (checkpoint, *list(checkpoint.resolve().parents)[:2]):
        if (d / "metrics.jsonl").is_file():
            return d
    return None


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    import visto
    from visto.checkpoint import read_config
    from visto.device import pick_device
    from visto.eval import evaluator_for
    from visto.eval.report import read_metrics_jsonl, write_report
    from visto.utils.io import atomic_write_json, atomic_write_text

    console = Console()
    if args.n is not None and args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    checkpoint = Path(args.model)
    family = read_config(checkpoint)["family"]
    kind, evaluate = evaluator_for(family)  # fails before the weights load when there is none
    options = kind_options(kind, args)
    run_dir = find_run_dir(checkpoint)
    out = Path(args.out) if args.out else (run_dir or Path("runs") / f"eval-{checkpoint.name}")

    model = visto.load(checkpoint, device=pick_device(args.device))
    common: dict[str, Any] = {"split": args.split, "batch_size": args.batch_size, "seed": args.seed}
    if args.n is not None:
        common["n"] = args.n
    result = evaluate(
        model, args.data, **common, **options, log=lambda msg: console.print(f"[dim]{msg}[/dim]")
    )
    curve = read_metrics_jsonl(run_dir / "metrics.jsonl") if run_dir else None
    notes = [f"checkpoint: `{checkpoint}` ({family})", f"data: `{args.data}`", *result.notes]
    atomic_write_json(out / "eval.json", result.metrics)
    predictions = getattr(result, "predictions", None)  # generative kinds: one row per question
    if predictions:
        atomic_write_text(
            out / "predictions.jsonl",
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in predictions),
        )
    report = write_report(out, f"Evaluation: {checkpoint.name}", result.metrics, notes, curve)

    table = Table(title=f"visto eval: {checkpoint}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.metrics.items():
        table.add_row(name, f"{value:.3f}")
    console.print(table)
    for note in result.notes:
        console.print(f"- {note}")
    console.print(f"wrote {out / 'eval.json'} and {report}")
    return 0
