"""LangChain's structured-output chains against `visto serve` over real HTTP (issue 17: the
seed's `PydanticOutputParser` chain put ~600 tokens of format instructions in the prompt and got
a 400; `with_structured_output(json_schema)` ran a string on past max_tokens), through
bench/langchain_chains.py, which measures them against the quickstart model.

The model here is a tiny random LLaVA with 2,048 positions: what it says is noise, so its free
text never parses (the plain parser chain fails in the parser, not in the server), while the
chains whose answer the server decodes under the schema's grammar return a Scene every time."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from test_serve_support import data_url, make_llava_checkpoint, png_bytes, running
from visto.cli import build_parser
from visto.commands.serve import build_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

pytestmark = pytest.mark.timeout(600)


def test_parser_and_structured_output_chains_over_http(tmp_path) -> None:
    import langchain_chains as bench

    ckpt = make_llava_checkpoint(tmp_path / "tiny-llava" / "checkpoint", context=2048)
    app = build_app(build_parser().parse_args(["serve", "--model", str(ckpt)]))
    images = [(data_url(png_bytes(colour)), None) for colour in
              ((200, 40, 40), (40, 200, 40), (40, 40, 200))]  # fmt: skip
    with running(app) as url:
        result = bench.run_chains(url + "/v1", "tiny-llava", images, max_tokens=200)
        assert httpx.get(url + "/health").json()["status"] == "ok"
    for name in ("parser+schema", "structured"):  # decoded under the schema: a Scene each time
        assert (result[name]["ok"], result[name]["of"]) == (3, 3), result[name]
        for run in result[name]["runs"]:
            scene = bench.Scene.model_validate(run["scene"])
            assert all(o.shape in bench.SHAPES for o in scene.objects)
    # the free text of a random model is no Scene: the parser says so (the prompt with the
    # parser's format instructions was taken: no 400 for its length)
    plain = result["parser"]
    assert plain["ok"] == 0
    assert all(r["error"].startswith("OutputParserException") for r in plain["runs"]), plain
