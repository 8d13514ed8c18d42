"""`visto eval`: evaluate a checkpoint on a synthetic world or any dataset; write eval.json
and report.md."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from visto.commands._common import add_command, load_for_inference
from visto.errors import UserError

# The blind twin's modes (visto.eval.generative.BLIND_MODES; kept here so --help loads no torch).
BLIND_MODES = ("swap", "blank")

ORDER = 40

DESCRIPTION = """\
Evaluate a checkpoint on a synthetic world, or on a dataset in any format, and write, into
the run directory:
  eval.json          the figures as one flat JSON object, name -> number (for scripts and CI)
  report.md          the same figures as a table, bar plots seen vs held-out, the training curve
  predictions.jsonl  generative families: every question asked, the answer, its score
  examples.png       generative families: a page of test images with question, answer,
                     reference, and predicted (dashed red) vs reference (black) boxes

What is measured depends on the model family:
  two-tower (clip)   zero-shot classification of shape, colour and "colour shape" with a
                     prompt-template ensemble; image->text and text->image recall@1/5/10;
                     k-means clustering of image embeddings (purity, NMI). Every figure is
                     also given on the held-out split (unseen colour-shape pairs) as
                     heldout.<name>.
  dense (clipseg)    text-prompted segmentation, every prompt of each image ("the red star",
                     "all circles", "all red shapes", "the text"): segment.miou.<kind>, and
                     open-vocabulary detection, every colour-shape query on every image:
                     detect.ap50 (seen pairs; heldout.detect.ap50: the 7 held-out pairs).
  generative (llava) every task of the world, asked in its own words and scored: VQA per
                     question type (vqa.<type>), counting, POPE probes, grounding acc@0.5,
                     box -> description, OCR exact/CER, JSON validity and fields, detection
                     P/R/F1 from the JSON, classification, captions (BLEU-4, CIDEr-D); greedy
                     decoding. json.valid / json.field_acc are the model's own answers; the
                     same questions under the world's grammar (xgrammar) give
                     json.constrained.valid / json.constrained.field_acc.
                     Seen and held-out (heldout.<name>) on the first --n images (default 200).
                     Blind twin (on by default): every question asked again with each image
                     swapped for another image of the same split (never its own; --blind
                     blank: a grey image) gives blind.<name>, and gain.<name> = figure -
                     blind figure: what the model gains from looking. A figure the blind
                     model reaches too says nothing about vision. --no-blind skips it (about
                     half the time).

On a dataset (--data FILE or folder: LLaVA JSON, COCO captions, WebDataset shards,
parquet), what the data carries decides what is scored, on its first --n samples:
  two-tower          image <-> caption retrieval recall@1/5/10 over the caption records.
  generative         every exchange with an image, asked after the turns before it: a
                     short reference answer (<= 3 words) as VQA (vqa.overall,
                     vqa.yesno/number/other), one box as grounding (ground.acc50; 0..999 or
                     LLaVA's 0..1 boxes), several boxes as boxes.precision/recall/f1, a
                     longer answer as longform.bleu4/cider; caption records as
                     caption.bleu4/cider against all their captions; a sample that carries
                     the world's truth (a world exported with `visto data export`) as the
                     world scores it. The blind twin swaps images within the dataset.

Examples:
  visto eval --model runs/clip/checkpoint --data runs/world
  visto eval --model runs/clip/checkpoint --data runs/world --n 500 --paraphrase
  visto eval --model runs/clip/checkpoint --data runs/world --templates single
  visto eval --model ckpt --data runs/world --templates "a drawing of a {}." --out runs/ev
  visto eval --model runs/quickstart/checkpoint --data runs/quickstart/world --n 20
  visto eval --model runs/llava/checkpoint --data runs/world --tasks vqa ground --examples 16
  visto eval --model runs/llava/checkpoint --data runs/world --blind blank
  visto eval --model runs/llava/checkpoint --data runs/world --n 20 --no-blind
  visto eval --model runs/llava/checkpoint --data runs/world --int8 --out runs/ev-int8
  visto eval --model runs/llava/checkpoint --data heldout.json --image-root images/
  visto eval --model runs/clip/checkpoint --data captions_val2017.json --image-root val2017/
  visto eval --model DIR --data shards/ --caption-key alt_text --n 500

--out defaults to the run directory holding the checkpoint (runs/NAME for
runs/NAME/checkpoint, where metrics.jsonl lies), else runs/eval-<checkpoint name>.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "eval", "evaluate a checkpoint: eval.json + report.md", DESCRIPTION)
    p.add_argument("--model", required=True, metavar="CKPT", help="checkpoint directory")
    p.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="a synthetic world directory, or a dataset file or folder in any format",
    )
    p.add_argument("--split", help="the world's split to evaluate (default: test)")
    p.add_argument("--out", metavar="RUN_DIR", help="where eval.json and report.md go")
    p.add_argument(
        "--n",
        type=int,
        help="images per split, or samples of a dataset (two-tower: the retrieval gallery, "
        "default 1000; generative: every question of each, default 200)",
    )
    data = p.add_argument_group("dataset options (--data in a real format)")
    data.add_argument(
        "--format",
        dest="fmt",
        choices=("llava", "coco", "webdataset", "parquet"),
        help="the dataset's format (default: detected from the path)",
    )
    data.add_argument("--image-root", help="where LLaVA JSON / COCO image paths point")
    data.add_argument(
        "--caption-key", help="the caption's field, column or .EXT (default: txt, caption, text)"
    )
    data.add_argument(
        "--image-key", help="the image's field, column or .EXT (default: image(s), png/jpg)"
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
    gen = p.add_argument_group("generative (llava) options")
    gen.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="tasks to ask (world default: caption vqa ground refdesc ocr json classify; "
        "a dataset's: caption vqa ground boxes longform)",
    )
    gen.add_argument(
        "--max-tokens", type=int, default=24, help="new tokens per short answer (default 24)"
    )
    gen.add_argument(
        "--json-max-tokens", type=int, default=400, help="new tokens per JSON answer (default 400)"
    )
    gen.add_argument(
        "--no-constrain",
        action="store_true",
        help="skip the second, grammar-constrained pass over the JSON questions "
        "(json.constrained.*); json.valid is always the model's own decoding",
    )
    gen.add_argument(
        "--blind",
        choices=BLIND_MODES,
        default="swap",
        help="what the blind twin sees instead of each image: another image of the split "
        "(swap, default) or a grey image (blank)",
    )
    gen.add_argument(
        "--no-blind",
        action="store_true",
        help="skip the blind twin (no blind.* and gain.* figures)",
    )
    gen.add_argument(
        "--examples",
        type=int,
        default=12,
        metavar="N",
        help="images on the page of example predictions (default 12; 0 = none)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="images/texts per forward pass (two-tower, default 64) or questions per "
        "generation batch (generative, default 16)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for k-means (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if present, else cpu)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="run the Linear layers in int8, as chat/serve --int8 do (CPU only): the accuracy "
        "int8 costs is the difference to an eval without it",
    )
    p.set_defaults(run=run)


def resolve_templates(values: list[str] | None) -> tuple[str, ...]:
    from visto.tasks.classify import DEFAULT_TEMPLATES, TEMPLATE_SETS

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


def kind_options(kind: str, args: argparse.Namespace, on_world: bool = True) -> dict[str, Any]:
    """The settings only one kind of evaluation takes, from the command line."""
    if kind == "two_tower" and not on_world:
        if args.templates or args.paraphrase:
            raise UserError(
                "--templates and --paraphrase set zero-shot classification, which needs the "
                "world's class labels; on a dataset a two-tower model is scored by retrieval"
            )
        return {}
    if kind == "two_tower":
        return {"templates": resolve_templates(args.templates), "paraphrase": args.paraphrase}
    if kind == "generative":
        for name in ("max_tokens", "json_max_tokens"):
            if getattr(args, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} must be at least 1, got {getattr(args, name)}")
        return {
            "tasks": resolve_tasks(args.tasks, on_world),
            "constrain_json": not args.no_constrain,
            "blind": None if args.no_blind else args.blind,
            "max_new_tokens": args.max_tokens,
            "json_max_new_tokens": args.json_max_tokens,
        }
    return {}


DEFAULT_BATCH = {"two_tower": 64, "generative": 16}
DEFAULT_DATASET_N = {"two_tower": 1000, "generative": 200}  # samples read from a dataset


def resolve_tasks(values: list[str] | None, on_world: bool = True) -> list[str] | None:
    """The task kinds to ask (None: all there are), checked before any work: the world's,
    or on a dataset what its exchanges are scored as (and the world's scored tasks, for a
    world exported to a file)."""
    if values is None:
        return None
    if on_world:
        from visto.data.synth import TASK_KINDS as known
    else:
        from visto.eval.dataset import EXCHANGE_TASKS
        from visto.eval.generative import SCORED_TASKS

        known = tuple(dict.fromkeys(EXCHANGE_TASKS + SCORED_TASKS))
    unknown = [t for t in values if t not in known]
    if unknown:
        raise UserError(f"unknown task(s) {unknown} for --tasks; choose from {', '.join(known)}")
    return list(dict.fromkeys(values))


# argparse dest -> flag, of the settings that only read a dataset file.
DATASET_FLAGS = {"fmt": "--format", "image_root": "--image-root", "caption_key": "--caption-key",
                 "image_key": "--image-key"}  # fmt: skip


def data_format(args: argparse.Namespace) -> str:
    """The format of --data ("synth": a world); refuses flags that only fit the other kind."""
    from visto.data.formats import infer_format

    fmt = args.fmt or infer_format(args.data)
    given = [flag for dest, flag in DATASET_FLAGS.items() if getattr(args, dest) is not None]
    if fmt == "synth" and given:
        raise UserError(
            f"{', '.join(given)} read a dataset file; {args.data} is a synthetic world, "
            "whose names are fixed"
        )
    if fmt != "synth" and args.split is not None:
        raise UserError(
            f"--split picks a split of a synthetic world; {args.data} is {fmt} data, which "
            "has none: give the file or folder of the split you want"
        )
    return fmt


def finite_metrics(metrics: dict[str, float]) -> tuple[dict[str, float], list[str]]:
    """(the metrics that are numbers, the names without a figure): eval.json holds numbers
    only, since NaN is not JSON; the report notes the names left out. A never-yes POPE's
    precision and F1 are 0, as in `visto quickstart` and `visto compare`; every figure with
    a blind twin gets its gain.<name>."""
    from visto.eval.generative import with_gains, zero_undefined_pope

    metrics = with_gains(zero_undefined_pope(metrics))
    kept = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
    return kept, [k for k in metrics if k not in kept]


def figures_table(title: str, metrics: dict[str, float]) -> Any:
    """The console's table: one row per figure, its blind twin and gain beside it."""
    from rich.table import Table

    from visto.eval.report import twin_rows

    rows = twin_rows(metrics)
    with_blind = any(blind is not None for _, _, blind, _ in rows)
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    if with_blind:
        table.add_column("blind", justify="right")
        table.add_column("gain", justify="right")
    for name, value, blind, gain in rows:
        cells = [f"{value:.3f}"] + ([_cell(blind), _cell(gain)] if with_blind else [])
        table.add_row(name, *cells)
    return table


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def find_run_dir(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint sits in: the nearest of it and its two parents that
    holds metrics.jsonl (runs/NAME/checkpoint, runs/NAME/checkpoints/step-100)."""
    for d in (checkpoint, *list(checkpoint.resolve().parents)[:2]):
        if (d / "metrics.jsonl").is_file():
            return d
    return None


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from visto.checkpoint import is_int8_checkpoint, read_config
    from visto.eval import dataset_evaluator_for, evaluator_for
    from visto.eval.report import read_metrics_jsonl, write_report
    from visto.utils.io import atomic_write_json, atomic_write_text

    console = Console(soft_wrap=True)  # paths stay whole, copyable
    if args.n is not None and args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.examples < 0:
        raise UserError(f"--examples must be 0 or more, got {args.examples}")
    checkpoint = Path(args.model)
    family = read_config(checkpoint)["family"]
    fmt = data_format(args)
    on_world = fmt == "synth"
    # Both fail before the weights load when the family has no evaluation.
    kind, evaluate = evaluator_for(family) if on_world else dataset_evaluator_for(family)
    options = kind_options(kind, args, on_world)
    samples = None  # a dataset's samples, read before the weights load: bad data fails fast
    if not on_world:
        from visto.eval.dataset import read_dataset

        samples, summary = read_dataset(
            args.data, fmt=fmt, image_root=args.image_root, caption_key=args.caption_key,
            image_key=args.image_key, n=args.n or DEFAULT_DATASET_N[kind],
        )  # fmt: skip
    run_dir = find_run_dir(checkpoint)
    out = Path(args.out) if args.out else (run_dir or Path("runs") / f"eval-{checkpoint.name}")

    model = load_for_inference(checkpoint, args.device, args.int8)
    batch_size = args.batch_size or DEFAULT_BATCH.get(kind, 16)
    common: dict[str, Any] = {"batch_size": batch_size, "seed": args.seed}

    def log(msg: str) -> None:
        console.print(f"[dim]{msg}[/dim]")

    if samples is None:
        common["split"] = args.split or "test"
        if args.n is not None:
            common["n"] = args.n
        result = evaluate(model, args.data, **common, **options, log=log)
        data_line = f"data: `{args.data}`"
    else:
        result = evaluate(model, samples, **common, **options, log=log)
        data_line = f"data: `{args.data}` ({fmt}: {summary}; the first {len(samples)} evaluated)"
    curve = read_metrics_jsonl(run_dir / "metrics.jsonl") if run_dir else None
    metrics, no_figure = finite_metrics(result.metrics)
    notes = [f"checkpoint: `{checkpoint}` ({family})", data_line, *result.notes]
    if args.int8 or is_int8_checkpoint(checkpoint):
        from visto.nn.quantize import int8_summary

        notes.append(int8_summary(model))
    if no_figure and not any(n.startswith("no figure") for n in notes):
        notes.append(f"no figure (nothing to divide by) for: {', '.join(no_figure)}")
    atomic_write_json(out / "eval.json", metrics)
    predictions = getattr(result, "predictions", None)  # generative kinds: one row per question
    examples = None
    if predictions:
        atomic_write_text(
            out / "predictions.jsonl",
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in predictions),
        )
        if args.examples:
            from visto.eval.dataset import images_by_key
            from visto.eval.examples import render_examples

            images = images_by_key(samples) if samples is not None else None
            examples = render_examples(predictions, args.data, out / "examples.png",
                                       n=args.examples, seed=args.seed, images=images)  # fmt: skip
    report = write_report(out, f"Evaluation: {checkpoint.name}", metrics, notes, curve)
    if examples is not None:
        # The page of examples goes after the figures, as its own section of the report.
        atomic_write_text(
            report,
            report.read_text()
            + "\n## Example predictions\n\nReference boxes solid black, predicted boxes "
            "dashed red; predictions.jsonl has every question.\n\n![example predictions]"
            f"({examples.name})\n",
        )

    console.print(figures_table(f"visto eval: {checkpoint}", metrics))
    for note in notes[2:]:
        console.print(f"- {note}")
    written = ["eval.json", *(["predictions.jsonl"] if predictions else []), "report.md"]
    written += [examples.name] if examples is not None else []
    console.print(f"wrote {', '.join(written)} to {out}")
    return 0
