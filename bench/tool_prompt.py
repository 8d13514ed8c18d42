"""How many tokens offering tools costs a model's prompt (issue 17).

    python bench/tool_prompt.py --model runs/r3cap/checkpoint --json bench/out/tool_prompt.json

With the model's own tokenizer: the tools' system-turn text alone (`tools_text([])`: the intro
and the <tools> tags), each built-in tool's line(s) on top of that, all of `--tools` together,
and a whole request as `visto serve` encodes it (the tools offered, one image, `--question`,
the generation prompt) against the processor's `max_length`: the room left there for a call,
its result and the answer in a training sample of that length.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, help="a checkpoint (or processor directory)")
    ap.add_argument("--tools", default="ocr,segment,detect")
    ap.add_argument("--question", default="What does the label say?")
    ap.add_argument("--json", metavar="FILE", help="write the figures here")
    args = ap.parse_args(argv)

    from PIL import Image

    from visto.data.processor import Processor
    from visto.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
    from visto.data.tool_calls import tools_text, with_tools
    from visto.tools import default_registry

    processor = Processor.load(args.model)
    tok = processor.tokenizer
    registry = default_registry()
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    tools = registry.openai(names)

    def tokens(text: str) -> int:
        return len(tok.encode(text))

    base = tokens(tools_text([]))
    figures: dict = {
        "model": args.model, "tokenizer_vocab": tok.vocab_size,
        "intro_and_tags": base,
        "per_tool": {n: tokens(tools_text([t])) - base for n, t in zip(names, tools, strict=True)},
        "all_tools": tokens(tools_text(tools)),
        "all_tools_chars": len(tools_text(tools)),
    }  # fmt: skip
    image = Image.new("RGB", (128, 128), (240, 240, 240))
    turns = with_tools([Turn("user", IMAGE_PLACEHOLDER + args.question)], tools)
    encoded = processor.encode(Sample("bench", [image], turns), max_length=2**31, train=False)
    max_length = processor.config.max_length
    figures.update(request_tokens=len(encoded.input_ids), max_length=max_length,
                   room=None if max_length is None else max_length - len(encoded.input_ids),
                   tool_text=tools_text(tools), load=os.getloadavg()[0])  # fmt: skip
    for key, value in figures.items():
        if key != "tool_text":
            print(f"{key}: {value}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
