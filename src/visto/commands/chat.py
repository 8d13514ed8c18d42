"""`visto chat`: ask a generative checkpoint about images, from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from visto.commands._common import add_command, load_for_inference
from visto.errors import UserError

ORDER = 50

TASK_CHOICES = ("caption", "vqa", "count", "ocr", "ground", "detect", "extract", "classify")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
MIN_DRAWN_SIDE = 256  # small images are drawn enlarged, so boxes and labels stay readable

DESCRIPTION = """\
Ask a generative checkpoint (e.g. LLaVA) about one or more images and print its answer.

  visto chat --model CKPT IMAGE [IMAGE ...] "QUESTION"

--task asks in the words a task uses (visto.tasks) and reads the answer with its parser:
  caption   "Describe this image."            (no question needed)
  vqa       your question as it is             (the default)
  count     what to count: "circles"  -> "How many circles are there?"
  ocr       "Read all the text in the image."  (no question needed)
  ground    the object to find: "red circle" -> one box
  detect    every object with its box (JSON)   (no question needed)
  extract   the image as JSON; a question that is a JSON object is the schema
  classify  the main object's colour and shape (no question needed)
Detect and extract answers are decoded under the world's JSON grammar when xgrammar is
installed (always valid JSON; --no-constrain turns it off).

--tools lets the model call expert models (built-in: ocr, PP-OCRv4; segment and detect, a
clipseg checkpoint: runs/clipseg-synth/checkpoint or segment=CKPT; or module:attribute of
your own visto.tools.Tool): visto runs each call on the last IMAGE, hands the result back to the
model and lets it answer (a mask or boxes come back as PNGs in --json's tool_runs). --tool-choice required (or a tool's name) makes the first answer a
call, decoded under the tool's JSON schema; the model may call again, up to 3 rounds, and the
answer after them cannot call (no <tool markup can begin in it: its grammar); with
--tool-choice none the answer is text and no call runs. A call cut by --max-tokens is left out
and not run: the calls that closed before it run and the answer ends there (finish_reason
"length"), and visto says to raise --max-tokens.

Boxes are printed as 0..999 ints (x1, y1, x2, y2) and as pixels of the first image, and
drawn on a copy of it: IMAGE_STEM-boxes.png in the current directory, or --out PATH
(in --interactive mode turn k > 1 writes PATH_STEM-k.png).

Examples:
  visto chat --model runs/quickstart/checkpoint scene.png "How many circles are there?"
  visto chat --model runs/quickstart/checkpoint scene.png "red circle" --task ground
  visto chat --model ckpt scene.png --task detect --out boxed.png --json
  visto chat --model ckpt a.png b.png "Which image has more squares?"
  visto chat --model ckpt scene.png --task caption --temperature 0.8 --top-p 0.9 --seed 3
  visto chat --model ckpt scene.png "What colour is the star?" --stream
  visto chat --model ckpt scene.png --interactive          (then type; /reset, /quit)
  printf 'How many stars?\\nAnd circles?\\n' | visto chat --model ckpt scene.png --interactive
  visto chat --model ckpt q.png "circles" --task count --demo d1.png circles 2 --demo d2.png circles 0
  visto chat --model ckpt scene.png "How many stars?" --int8     (int8 on the CPU)
  visto chat --model ckpt label.png "What does the label say?" --tools ocr --tool-choice ocr
  visto chat --model ckpt scene.png "Cut out the red star." --tools ocr,segment,detect --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "chat", "ask a generative checkpoint about images", DESCRIPTION)
    p.add_argument("--model", required=True, metavar="CKPT", help="generative checkpoint directory")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE",
        help="one or more image files, then the QUESTION (optional with --interactive and "
        "with tasks that need none)",
    )
    p.add_argument("--task", choices=TASK_CHOICES, help="ask with this task's prompt and parser")
    p.add_argument(
        "--demo",
        nargs=3,
        action="append",
        metavar=("IMAGE", "QUESTION", "ANSWER"),
        help="a few-shot demonstration shown before the question (repeatable)",
    )
    gen = p.add_argument_group("decoding")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    gen.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default 128)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed; turn k uses SEED+k-1")
    gen.add_argument(
        "--no-constrain", action="store_true", help="decode detect/extract JSON without grammar"
    )
    out = p.add_argument_group("output")
    out.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    out.add_argument("--json", action="store_true", help="print one JSON object per answer")
    out.add_argument("--out", metavar="PNG", help="where the image with the boxes drawn goes")
    out.add_argument(
        "--interactive",
        action="store_true",
        help="multi-turn: read questions from stdin, one per line (works with piped input)",
    )
    tools = p.add_argument_group("tools")
    tools.add_argument("--tools", metavar="NAMES",
                       help="tools the model may call, comma-separated: built-in names (ocr, segment, detect; "
                       "segment=CKPT names a clipseg checkpoint) "
                       "and module:attribute of your visto.tools.Tool")  # fmt: skip
    tools.add_argument("--tool-choice", default="auto", metavar="CHOICE",
                       help="auto (default: the model decides), required (it calls a tool "
                       "first), none, or a tool's name (it calls that one first)")  # fmt: skip
    tools.add_argument("--quote-results", choices=("auto", "always", "never"), default="auto",
                       help="the answer after a tool result that holds text is made of that "
                       "result's words (visto.tools.quote): auto (default) does so for --task ocr, "
                       "where the answer is the text; always; never. A model trained to call "
                       "tools copies its own reader otherwise: bench/README.md, 'A generative "
                       "model calling the OCR tool'")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if present, else cpu)")
    p.add_argument("--int8", action="store_true",
                   help="run the Linear layers in int8 (CPU only: a quarter of their memory, "
                   "faster decoding; answers may differ slightly from fp32)")
    p.set_defaults(run=run)


# ----------------------------------------------------------------------------- inputs


def split_inputs(inputs: list[str]) -> tuple[list[str], str | None]:
    """(image paths, question or None): the last input is the question unless it is a file."""
    if Path(inputs[-1]).is_file():
        return inputs, None
    *images, question = inputs
    if not images:
        if _looks_like_image_path(question):
            raise UserError(f"image file not found: {question}")
        raise UserError(
            "give at least one IMAGE before the question, e.g. "
            "visto chat --model CKPT scene.png 'How many circles are there?'"
        )
    return images, question


def _looks_like_image_path(text: str) -> bool:
    return Path(text).suffix.lower() in IMAGE_SUFFIXES or "/" in text and " " not in text


def read_image(path: str) -> Any:
    from visto.data.images import BadImage, open_image

    if not Path(path).exists():
        raise BadImage(f"image file not found: {path}")
    if not Path(path).is_file():
        raise BadImage(f"{path} is not a file; give an image file (PNG, JPEG, WEBP, ...)")
    return open_image(path)


def boxed_path(args: argparse.Namespace, image_path: str, turn: int) -> Path:
    """Where turn `turn`'s image with boxes goes (see --out in the description)."""
    base = Path(args.out) if args.out else Path.cwd() / f"{Path(image_path).stem}-boxes.png"
    if base.suffix.lower() != ".png":
        base = base.with_suffix(base.suffix + ".png") if base.suffix else base.with_suffix(".png")
    return base if turn == 1 else base.with_name(f"{base.stem}-{turn}{base.suffix}")


def draw_reply_boxes(image: Any, boxes: list[Any], labels: list[str | None]) -> Any:
    """A copy of `image` with the boxes drawn, enlarged so the short side is >= 256 px."""
    from PIL import Image

    from visto.tasks.draw import draw_boxes

    scale = max(1, -(-MIN_DRAWN_SIDE // min(image.size)))
    big = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    return draw_boxes(big, [b.norm for b in boxes], labels, normalized=True)


# ----------------------------------------------------------------------------- output


def show_reply(args: argparse.Namespace, reply: Any, streamed: bool, extra: dict) -> None:
    """Print one answer: as JSON, or as text with its boxes and parsed value."""
    if args.json:
        print(json.dumps({**extra, **reply.to_json()}, ensure_ascii=False), flush=True)
        if extra.get("tool_call_cut"):  # stdout stays one JSON object; the why goes to stderr
            print(cut_note(args, True), file=sys.stderr)
        return
    if not streamed:
        print(reply.text, flush=True)
    if reply.task == "count":
        print(f"count: {reply.parsed if reply.parsed is not None else 'no number in the answer'}")
    if reply.task == "extract":
        print(f"valid JSON: {'yes' if reply.parsed.valid else 'no'}")
    if reply.task in ("ground", "detect") and not reply.boxes:
        print("no box in the answer")
    size = extra.get("image_size")
    for k, box in enumerate(reply.boxes, 1):
        label = f" {box.label}" if box.label else ""
        pixels = f", pixels {box.pixels} of {size[0]}x{size[1]}" if box.pixels is not None else ""
        print(f"box {k}{label}: {box.norm} (0..999){pixels}")
    if extra.get("boxed_image"):
        print(f"boxes drawn on: {extra['boxed_image']}")
    if reply.finish_reason == "length" or extra.get("tool_call_cut"):
        print(cut_note(args, extra.get("tool_call_cut", False)), file=sys.stderr)


def cut_note(args: argparse.Namespace, tool_call: bool) -> str:
    if tool_call:  # the call's text is left out (serve.tools.without_cut_call): say why
        return (f"(a tool call was cut at --max-tokens {args.max_tokens}; it was left out and "
                "not run: raise --max-tokens)")  # fmt: skip
    return f"(the answer was cut at --max-tokens {args.max_tokens})"


def one_turn(
    args: argparse.Namespace, chat: Any, question: str, turn: int, images: list, paths: list[str]
) -> None:
    from visto.infer import SamplingParams
    from visto.utils.io import atomic_write_bytes

    params = SamplingParams(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed + turn - 1,
    )
    streamed = args.stream and not args.json
    extra: dict[str, Any] = {"question": question, "images": paths}
    if args.tool_loop is not None:
        reply, extra["tool_runs"] = args.tool_loop.answer(chat, question, args, params, images)
        extra["tool_call_cut"] = args.tool_loop.cut_call
    elif streamed:
        stream = chat.ask(question, task=args.task, params=params, stream=True)
        for piece in stream:
            print(piece, end="", flush=True)
        print(flush=True)
        reply = stream.reply
    else:
        reply = chat.ask(question, task=args.task, params=params)
    if images:
        extra["image_size"] = list(images[0].size)
    if reply.boxes and images:
        from visto.data.sample import image_to_png_bytes

        labels = [b.label or (question.strip() if args.task == "ground" else None)
                  for b in reply.boxes]  # fmt: skip
        path = boxed_path(args, paths[0], turn)
        atomic_write_bytes(
            path, image_to_png_bytes(draw_reply_boxes(images[0], reply.boxes, labels))
        )
        extra["boxed_image"] = str(path)
    show_reply(args, reply, streamed, extra)


def interactive(args: argparse.Namespace, chat: Any, first: str | None, images: list,
                paths: list[str]) -> None:  # fmt: skip
    """Questions from stdin, one per line, answered in one conversation; /reset, /quit."""
    tty = sys.stdin.isatty()
    if tty and not args.json:
        print("one question per line; /reset starts over, /quit (or Ctrl-D) ends", file=sys.stderr)
    turn = 0
    pending = [first] if first else []
    while True:
        if pending:
            line = pending.pop()
        else:
            if tty:
                print("you> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                break
        line = line.strip()
        if not line and args.task not in ("caption", "ocr", "detect", "extract", "classify"):
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            chat.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        turn += 1
        try:
            one_turn(args, chat, line, turn, images, paths)
        except UserError as e:  # e.g. a conversation grown past the context: say so, go on
            print(f"visto: error: {e} (type /reset to start over)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from visto.tasks.runner import TASKS_WITHOUT_QUESTION, Chat, task_question

    if args.stream and args.json:
        raise UserError("--stream and --json do not mix: --json prints each whole answer")
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    paths, question = split_inputs(args.inputs)
    needs_question = args.task not in TASKS_WITHOUT_QUESTION
    if question is None and needs_question and not args.interactive:
        raise UserError(
            "ask a question after the image(s), e.g. "
            f"visto chat --model {args.model} {paths[0]} 'How many circles are there?' "
            "(or use --interactive, or a --task that needs none: caption, ocr, detect, extract)"
        )
    images = [read_image(p) for p in paths]
    demos = []
    for image_path, demo_question, demo_answer in args.demo or []:
        # Demonstrations are asked in the same words as the question (the task's prompt).
        demos.append((read_image(image_path), task_question(args.task, demo_question), demo_answer))
    if demos and len(images) != 1:
        raise UserError(f"--demo asks about one IMAGE after the demonstrations; got {len(images)}")

    args.tool_loop = registry = None
    if args.tool_choice != "auto" and not args.tools:
        raise UserError("--tool-choice needs --tools NAMES (e.g. --tools ocr)")
    if args.tools:
        from visto.commands._chat_tools import ToolLoop, start_tools

        # their processes start now and load their experts while the model loads
        registry = start_tools(args.tools, args.tool_choice, args.task)
    try:
        model = load_for_inference(args.model, args.device, args.int8)
        if registry is not None:
            from visto.tools.quote import quotes

            quote = quotes(args.quote_results, args.task)
            args.tool_loop = ToolLoop.build(model, registry, args.tool_choice, quote=quote)
        tools = registry.openai() if registry is not None else ()
        chat = Chat(model, images, demos=demos, constrain_json=not args.no_constrain, tools=tools)
        if args.interactive:
            interactive(args, chat, question, images, paths)
        else:
            one_turn(args, chat, question or "", 1, images, paths)
    finally:  # on Ctrl-C and errors too
        if registry is not None:
            registry.stop()
    return 0
