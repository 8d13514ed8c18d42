"""`visto quickstart`: the whole pipeline on the synthetic world (see `visto.quickstart`).

The options that set a QuickstartConfig field take their type and default from the dataclass
(as litgpt's CLI derives its options from signatures), so the command cannot drift from the
config; `OPTIONS` gives each one its help text, in the order --help lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from types import NoneType, UnionType
from typing import Any

from visto.commands._common import add_command
from visto.quickstart import STAGES, QuickstartConfig  # no torch: `visto --help` stays instant

ORDER = 10

DEFAULTS = QuickstartConfig()

DESCRIPTION = f"""\
Train and evaluate a small vision-language model from nothing, offline, on a CPU.

The training budget is a number of optimizer steps per stage, so the same seed gives the
same model on any machine; the defaults are {DEFAULTS.vision_steps:,} + {DEFAULTS.stage1_steps:,} + \
{DEFAULTS.stage2_steps:,} steps (measured times per
stage, with the machine's load, in bench/README.md "Quickstart").
--minutes caps the training time instead: a stage it stops early prints (and records in
its done.json) how many of its steps were cut, and its model differs from the default's.

Stages (each writes a folder in RUN and is skipped on a re-run when its settings are
unchanged; --fresh redoes everything):
  1. data     render the synthetic world: RUN/world (+ RUN/world/show.png, look at it)
  2. vision   pretrain the ViT on the world's dense labels (per-patch shape, colour,
              size, object centres and boxes, characters of the texts); with
              --read-slots or --text-slots, also the OCR reader (find each line, read it
              with CTC): RUN/vision
  3. stage1   LLaVA stage 1 (recipe quickstart-stage1, mix "look+copy": a caption, two short
              questions, a grounding question and the OCR question per image), vision tower
              frozen. The connector gives the decoder
              one token per detected object, made of the decoder's own words for its
              colour, shape, size and box (visto.connectors.regions); --box-tokens
              follows each with its box's 4 location tokens, --text-slots N adds N lines
              of text the OCR reader read, as the decoder's own tokens (both measured
              worse at the default budget: bench/README.md, "Quickstart"). The question
              focus hands each answer the named object and, in <focus> slots, its box and
              the text that was read, which a pointer head copies (--pointer); it also
              runs the question's words on the detected objects (--named: filter,
              count, relate; a box the question writes, the kind of text it asks for,
              twins told apart by side) and hands on the count and whether the relation
              holds: RUN/stage1
  4. stage2   LLaVA stage 2 (recipe quickstart-stage2, mix "instruct+caption+prefixes"): every
              question of an image (VQA, counting, grounding with box tokens, OCR, JSON) in
              one sample as independent turns, none of which can see another; in a share of
              the samples a system turn or instruction lines (up to ~900 tokens) stand in
              front of a question, so a prompt with text before its question (a chat
              client's system message, format instructions) is answered as a bare one,
              measured to 1,888 tokens; a JSON answer copies
              the JSON the connector writes from its detections, and its labels write the
              boxes the frozen detector finds (--detector-json-boxes): RUN/stage2
  5. eval     test split and held-out colour-shape pairs, every figure beside a blind
              twin (the images swapped): RUN/eval.json, RUN/report.md. What the default
              reaches, per question type, over three seeds: bench/README.md, "Detector
              boxes in the JSON labels"

The final model is RUN/checkpoint (open it with visto.load).

Examples:
  visto quickstart
  visto quickstart --out runs/qs --stage2-steps 400        a longer stage 2
  visto quickstart --vision-steps 100 --stage1-steps 20 --stage2-steps 20 --n 600
                                                            a smoke run in a few minutes
  visto quickstart --minutes 10                             at most 10 training minutes
  visto quickstart --until data                             only render the world
"""

# QuickstartConfig field -> its option's help (the default is appended from the dataclass,
# unless the help says what the default means) and, where the type's name would not do, its
# metavar. The fields left out keep their defaults on the command line (a recipe-level setting
# such as the learning rates changes by editing the config, not by a flag).
OPTIONS: dict[str, tuple[str, str | None]] = {
    "vision_steps": ("steps of the vision stage", "N"),
    "box_tokens": ("follow each object token with its box's 4 location tokens (5 tokens an "
                   "object); measured worse at the default budget", None),
    "text_slots": ("lines of text the connector's OCR reader reads into the decoder's own "
                   f"tokens (default {DEFAULTS.text_slots}: no reader)", "N"),
    "focus": ("each answer's question picks the object tokens it names and hands them to the "
              "decoder where the answer starts (top-down attention; regions only); without it "
              "the decoder must find the named object itself, which it did for shape "
              "only, in one of three seeds (bench/README.md, 'Question focus')", None),
    "focus_slots": ("with --focus: <focus> slots before each answer: 4 = the named object's box "
                    "as its 4 location tokens (a grounding answer copies them), 0 = none", "N"),
    "read_slots": ("with --focus: <focus> slots after the box's 4 that hold the tokens the OCR "
                   "reader read, so an answer that reads copies them; 0 = no reader", "N"),
    "pointer": ("with --focus and its slots: answers copy the slots' tokens (the box, what was "
                "read) through a pointer head beside the LM head (M4C's dynamic pointer), not "
                "through attention, which the decoder did not learn (OCR 0.013 without it)", None),
    "named": ("with --focus: the attribute words a question names pick, count and relate the "
              "detected objects by their predicted attributes (filter, count, relate, as NS-VQA "
              "executes a question on a scene parse); without it the focus scores a question's "
              "mean embedding alone, and counting and relations stayed at their blind figures "
              "(bench/README.md, 'Named words')", None),
    "box_nms": ("regions: drop a detected object whose box overlaps a more confident one's by "
                "more than this IoU (the same object found twice); 0 = off", "IOU"),
    "count_width": ("with --focus: the width of the count histograms' bumps (how near a count "
                    "lights its neighbours' bins); 1.0 lit 1 and 3 at 0.37 of 2, and the decoder "
                    "undercounted", "W"),
    "object_order": ("regions: the order of the object tokens: left_to_right (by the box's left "
                     "edge, the order the JSON answer lists objects in) or raster (by the "
                     "centre's patch)", "ORDER"),
    "copy_answers": ("with --named and --pointer: answers about the named object may copy its "
                     "detected size, colour and shape words and its count through the pointer, "
                     "as a box is copied (a colour word the decoder never wrote for that shape "
                     "comes from the detector); bench/README.md, 'Copied answers'", None),
    "copy_verdicts": ("with --copy-answers: the pointer may also copy the executed yes/no of an "
                      "existence or relation question (what --named computed: whether the relation "
                      "holds, else whether the named object is there), as one more run after the "
                      "answer runs; visto compare's recipes have it (bench/README.md, 'compare: "
                      "yes/no verdicts through the pointer')", None),
    "question_pointer": ("with --pointer: its slot scores also read the answer's question (its words "
                         "pooled by the focus, through a zero-initialised map), so which run an answer "
                         "copies (a colour word, a shape word, the box) is one linear read of the "
                         "question's words; visto compare's recipes have it", None),
    "copy_json": ("with --pointer: a JSON answer may copy, token by token, the JSON the connector "
                  "writes from its detected objects and what it read (connectors/script.py)", None),
    "detector_json_boxes": ("with --copy-json: stage 2's JSON answers write each object's box as "
                            "the frozen detector finds it (where it matches the truth), so the "
                            "model learns to copy the box numbers its connector writes rather "
                            "than to write its own (bench/README.md, 'Detector boxes in the "
                            "JSON labels')", None),
    "reader_steps": ("steps of the OCR reader (with --text-slots or --read-slots), trained in the vision stage "
                     "on the world's text boxes", "N"),
    "stage1_steps": ("steps of LLaVA stage 1", "N"),
    "stage2_steps": ("steps of LLaVA stage 2", "N"),
    "minutes": ("optional cap on the three training stages together (split "
                f"{DEFAULTS.vision_share:.0%} vision, {DEFAULTS.stage1_share:.0%} stage 1, "
                f"{DEFAULTS.stage2_share:.0%} stage 2); a stage it stops early says how many "
                "steps it cut (default: no cap, the step budgets alone)", None),
    "n": ("images in the world", None),
    "size": ("image side in pixels", None),
    "seed": ("random seed", None),
    "workers": ("processes for rendering", None),
    "threads": (f"torch threads (default {DEFAULTS.threads}: 1 on a busy machine, else all "
                "cores)", None),
    "eval_images": ("test and held-out images asked every question", None),
    "stage1_mix": ("training mix of stage 1 (a name in visto.data.synth.mixes.MIXES; a wrong "
                   "one lists them)", "MIX"),
    "stage1_batch": ("samples per step of stage1", "N"),
    "stage2_batch": ("samples per step of stage2", "N"),
    "vision_stem": ("how the ViT embeds patches: 'patch' (one linear projection, as CLIP's) "
                    "or 'conv' (3x3 stride-2 convs: learns shapes faster from scratch; "
                    "bench/dense_stem.py). Either way the quickstart's model exports to "
                    "transformers with custom code only (its connector has no transformers "
                    "class: visto export --help)", "{patch,conv}"),
    "vision_batch": ("images per step of the vision stage. A step at 16 costs about a quarter "
                     "of one at 64: on a 20,000-image world 4,000 steps at 16 gave val patch "
                     "shape 0.965 against 0.862 for 1,000 at 64 (bench/clip_figures.py "
                     "--dense-batch)", "N"),
}  # fmt: skip


def add_config_option(p: argparse.ArgumentParser, field: dataclasses.Field, help: str,
                      metavar: str | None, hint: Any) -> None:  # fmt: skip
    """`--field-name` with the field's type and default; a bool field is a switch (`--name`
    when it is off by default, `--no-name` too when it is on)."""
    flag, default = "--" + field.name.replace("_", "-"), field.default
    help = help.replace("%", "%%")  # argparse formats help with %
    if hint is bool:
        if default:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=True,
                           help=f"{help} (default on)")  # fmt: skip
        else:
            p.add_argument(flag, action="store_true", help=help)
        return
    if "(default" not in help:
        help = f"{help} (default {default})"
    if typing.get_origin(hint) in (typing.Union, UnionType):  # `float | None`: the value's type
        (hint,) = (t for t in typing.get_args(hint) if t is not NoneType)
    p.add_argument(flag, type=hint, default=default, metavar=metavar, help=help)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "quickstart", "the whole pipeline on the synthetic world", DESCRIPTION)
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"),
                   help="run directory (default runs/quickstart)")  # fmt: skip
    fields = {f.name: f for f in dataclasses.fields(QuickstartConfig)}
    hints = typing.get_type_hints(QuickstartConfig)
    for name, (help, metavar) in OPTIONS.items():
        add_config_option(p, fields[name], help, metavar, hints[name])
    p.add_argument("--until", choices=STAGES, default=STAGES[-1],
                   help="stop after this stage (default: run them all)")  # fmt: skip
    p.add_argument("--fresh", action="store_true", help="redo every stage, even unchanged ones")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> QuickstartConfig:
    """The QuickstartConfig the options set (every other field at its default)."""
    return QuickstartConfig(**{name: getattr(args, name) for name in OPTIONS})


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from visto.errors import UserError
    from visto.quickstart import HEADLINE, run_quickstart

    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.threads < 0:
        raise UserError(f"--threads must be 0 (automatic) or more, got {args.threads}")
    cfg = config_from_args(args)
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
