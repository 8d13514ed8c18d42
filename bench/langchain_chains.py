"""LangChain's structured-output chains against `visto serve`, over real HTTP (issue 17's
figure: "PydanticOutputParser chain and with_structured_output(json_schema) on a world schema
succeed against the quickstart model 3 of 3 times each").

    python bench/langchain_chains.py --model runs/q0/checkpoint --world runs/q0/world \
        --images 3 --json bench/out/langchain_chains.json

The server is `visto serve --model MODEL` in this process (uvicorn on a free port); the client is
langchain-openai's ChatOpenAI pointed at it, greedy. Each of the first --images test images of
--world goes through three chains, each asking for a world `Scene` (pydantic: objects with
shape, colour and size from the world's vocabularies; the texts):

- `parser`: the seed's chain, `ChatOpenAI | PydanticOutputParser(Scene)`: the parser's format
  instructions (~600 characters of schema and prose) in the system turn, the model's free text
  parsed. Nothing constrains the answer.
- `parser+schema`: the same chain, the model bound to `response_format` json_schema of the
  parser's schema (strict), so the server decodes under its grammar.
- `structured`: `ChatOpenAI.with_structured_output(Scene, method="json_schema", strict=True)`.

Per chain: ok (the chain returned a Scene: valid, schema-conformant JSON), the error class
otherwise; and the model's quality on the fields (not the figure the issue asks): objects
right as a multiset of (shape, colour, size) against the image's truth, texts equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from visto.data.synth.vocab import COLOURS, SHAPES, SIZES  # noqa: E402

Shape = Literal[SHAPES]  # type: ignore[valid-type]
Colour = Literal[tuple(COLOURS)]  # type: ignore[valid-type]
Size = Literal[tuple(SIZES)]  # type: ignore[valid-type]


class WorldObject(BaseModel):
    shape: Shape
    colour: Colour
    size: Size


class Scene(BaseModel):
    """The shapes in the image and the text written in it."""

    objects: list[WorldObject]
    text: list[str]


QUESTION = "List every object with its shape, colour and size, and the text, as JSON."
CHAINS = ("parser", "parser+schema", "structured")


def build_chains(base_url: str, model: str, max_tokens: int) -> dict[str, Any]:
    """The three chains (module doc), each a callable of (image data URL) -> Scene."""
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_core.output_parsers import PydanticOutputParser
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=model, base_url=base_url, api_key="unused", temperature=0,
                     max_tokens=max_tokens, max_retries=0, timeout=300)  # fmt: skip
    parser = PydanticOutputParser(pydantic_object=Scene)
    system = SystemMessage(content="Answer the user query.\n" + parser.get_format_instructions())

    def messages(image: str) -> list[Any]:
        return [system, HumanMessage(content=[
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": QUESTION}])]  # fmt: skip

    schema = {"type": "json_schema", "json_schema": {
        "name": "Scene", "schema": Scene.model_json_schema(), "strict": True}}  # fmt: skip
    plain = llm | parser
    bound = llm.bind(response_format=schema) | parser
    structured = llm.with_structured_output(Scene, method="json_schema", strict=True)
    return {
        "parser": lambda image: plain.invoke(messages(image)),
        "parser+schema": lambda image: bound.invoke(messages(image)),
        "structured": lambda image: structured.invoke(
            [HumanMessage(content=[{"type": "image_url", "image_url": {"url": image}},
                                   {"type": "text", "text": QUESTION}])]),  # fmt: skip
    }


def fields_right(scene: Scene, truth: dict | None) -> dict[str, bool] | None:
    if truth is None:
        return None
    said = Counter((o.shape, o.colour, o.size) for o in scene.objects)
    true = Counter((o["shape"], o["colour"], o["size"]) for o in truth["objects"])
    return {"objects": said == true, "text": scene.text == [t["text"] for t in truth["texts"]]}


def run_chains(base_url: str, model: str, images: list[tuple[str, dict | None]],
               max_tokens: int = 400, chains: tuple[str, ...] = CHAINS) -> dict[str, Any]:  # fmt: skip
    """Every chain on every (image data URL, world truth or None): per chain, its runs and ok."""
    built = build_chains(base_url, model, max_tokens)
    out: dict[str, Any] = {}
    for name in chains:
        runs = []
        for image, truth in images:
            start = time.perf_counter()
            try:
                scene = built[name](image)
                run = {"ok": isinstance(scene, Scene), "scene": scene.model_dump(),
                       "right": fields_right(scene, truth)}  # fmt: skip
            except Exception as e:  # the chain's own failure (parser, HTTP): reported
                run = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            run["seconds"] = round(time.perf_counter() - start, 2)
            runs.append(run)
        out[name] = {"ok": sum(r["ok"] for r in runs), "of": len(runs), "runs": runs}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import base64
    import os

    from test_serve_support import running
    from visto.cli import build_parser
    from visto.commands.serve import build_app

    records = [json.loads(line) for line in (args.world / "test.jsonl").open()][: args.images]
    images = [("data:image/png;base64," + base64.b64encode(
        (args.world / r["image"]).read_bytes()).decode(), r["truth"]) for r in records]  # fmt: skip
    app = build_app(build_parser().parse_args(["serve", "--model", str(args.model)]))
    load = os.getloadavg()[0]
    with running(app, timeout=120) as url:
        import httpx

        card = httpx.get(url + "/v1/models").json()["data"][0]
        result = run_chains(url + "/v1", card["id"], images, args.max_tokens)
    result = {"model": str(args.model), "context_length": card["context_length"],
              "load_before": load, "load_after": os.getloadavg()[0], "chains": result}  # fmt: skip
    for name, r in result["chains"].items():
        right = [x["right"] for x in r["runs"] if x.get("right")]
        print(f"{name:14s} ok {r['ok']}/{r['of']}  objects right "
              f"{sum(x['objects'] for x in right)}/{len(r['runs'])}  text right "
              f"{sum(x['text'] for x in right)}/{len(r['runs'])}  "
              f"errors {[x['error'][:80] for x in r['runs'] if 'error' in x]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
