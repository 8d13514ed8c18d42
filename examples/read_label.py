"""Read a label and return JSON: visto's OCR expert reads the text, the model fills a schema.

    visto serve --model runs/quickstart/checkpoint --tools ocr &
    python examples/read_label.py photo.png
    python examples/read_label.py --render "Oat Milk" "EUR 2.49" "Best before 2026"

One request to the OpenAI-compatible server does the whole chain: tool_choice makes the
model's first answer a call of the server's `ocr` tool, which visto runs on the image (PP-OCRv4,
offline); the result goes back to the model as a tool message, and its answer is decoded under
the label's JSON schema (response_format), so it parses and fits the schema whenever it ends
within max_tokens. Prints {"label": <the model's fields>, "ocr": <what the OCR read>}.

The OCR text is exact (the expert); how much of it the model copies into the fields is the
model's own quality. Needs only the `openai` package on the client side.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from pathlib import Path

LABEL_SCHEMA = {
    "type": "object",
    "properties": {
        "product": {"type": "string", "maxLength": 24},
        "price": {"type": "string", "maxLength": 12},
        "best_before": {"type": "string", "maxLength": 16},
    },
    "required": ["product", "price", "best_before"],
    "additionalProperties": False,
}
QUESTION = "Read the label and fill in its product, price and best-before date."


def render_label(lines: list[str]) -> bytes:
    """A printed label (PNG) with `lines` on it, on a colour-gradient background."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = 480, 70 + 50 * len(lines)
    ramp = Image.linear_gradient("L").resize((width, height))
    image = Image.merge("RGB", (ramp.point(lambda v: 90 + v // 2), ramp.point(lambda v: 150 + v // 4),
                                Image.new("L", (width, height), 170)))  # fmt: skip
    draw = ImageDraw.Draw(image)
    draw.rectangle(
        (20, 20, width - 20, height - 20), fill=(250, 248, 240), outline=(40, 40, 40), width=3
    )
    for i, line in enumerate(lines):
        draw.text((40, 35 + 50 * i), line, fill=(20, 20, 30), font=ImageFont.load_default(size=32))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def read_label(client, model: str, png: bytes, max_tokens: int = 200) -> dict:
    """{"label": fields, "ocr": text} for one label image, in one chat request."""
    image_url = "data:image/png;base64," + base64.b64encode(png).decode()
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": QUESTION},
        ]}],  # fmt: skip
        tool_choice={"type": "function", "function": {"name": "ocr"}},
        response_format={"type": "json_schema",
                         "json_schema": {"name": "label", "schema": LABEL_SCHEMA, "strict": True}},
        max_tokens=max_tokens,
        temperature=0,
    )  # fmt: skip
    choice = reply.choices[0]
    runs = choice.model_extra["tool_runs"]  # visto's report of the tools it ran
    if choice.finish_reason == "length":
        sys.exit(
            f"the answer did not end within --max-tokens {max_tokens}: {choice.message.content!r}"
        )
    ocr = [run["result"].get("text", run["result"]) for run in runs if run["name"] == "ocr"]
    return {"label": json.loads(choice.message.content), "ocr": ocr[0] if ocr else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", nargs="?", type=Path, help="a photo of a label (PNG, JPEG, ...)")
    parser.add_argument(
        "--render", nargs="+", metavar="LINE", help="render a label with these lines"
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="the chat model's id (default: the server's first)")
    parser.add_argument("--max-tokens", type=int, default=200, help="per answer (default 200)")
    args = parser.parse_args(argv)
    if (args.image is None) == (args.render is None):
        parser.error("give an IMAGE or --render LINE [LINE ...]")

    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=300)
    model = args.model or next(
        m.id for m in client.models.list() if m.model_extra.get("kind") == "chat"
    )
    png = render_label(args.render) if args.render else args.image.read_bytes()
    try:
        result = read_label(client, model, png, args.max_tokens)
    except BadRequestError as e:  # e.g. a server started without --tools ocr
        sys.exit(f"the server refused the request: {e.body['message']}\n(the OCR tool runs on "
                 "the server: visto serve --model CKPT --tools ocr)")  # fmt: skip
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
