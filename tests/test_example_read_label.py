"""examples/read_label.py as a user runs it: a separate Python process with the openai SDK
against `visto serve --tools ocr`; the OCR reads the rendered label exactly and the model's
answer is JSON that fits the label's schema (a tiny random model: the fields are noise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_serve_support import make_llava_checkpoint, running
from visto.cli import build_parser
from visto.commands.serve import build_app

pytestmark = pytest.mark.timeout(600)
EXAMPLE = Path(__file__).parents[1] / "examples" / "read_label.py"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    ckpt = make_llava_checkpoint(tmp_path_factory.mktemp("label") / "tiny-llava" / "checkpoint",
                                 context=2048)  # fmt: skip
    app = build_app(build_parser().parse_args(["serve", "--model", str(ckpt), "--tools", "ocr"]))
    with running(app) as base:
        yield base


def run_example(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def fits_schema(label: dict) -> None:
    assert set(label) == {"product", "price", "best_before"}
    assert len(label["product"]) <= 24 and len(label["price"]) <= 12
    assert len(label["best_before"]) <= 16


@pytest.mark.parametrize("lines", [
    ["Oat Milk", "EUR 2.49", "Best before 2026"],
    ["Organic Oat Milk", "Price 2.49 EUR", "Best before 03/2026"],
])  # fmt: skip
def test_read_label_renders_reads_and_returns_json(url, lines) -> None:
    done = run_example("--render", *lines, "--base-url", url + "/v1")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ocr"] == "\n".join(lines)
    fits_schema(result["label"])


def test_read_label_reads_an_image_file(url, tmp_path) -> None:
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        from read_label import render_label
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    image = tmp_path / "label.png"
    image.write_bytes(render_label(["Oat Milk", "EUR 2.49"]))
    done = run_example(str(image), "--base-url", url + "/v1", "--model", "tiny-llava")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ocr"] == "Oat Milk\nEUR 2.49"

    done = run_example("--base-url", url + "/v1")
    assert done.returncode == 2 and "give an IMAGE or --render" in done.stderr


def test_read_label_says_what_to_do_against_a_server_without_tools(tmp_path) -> None:
    ckpt = make_llava_checkpoint(tmp_path / "tiny-llava" / "checkpoint", context=2048)
    with running(build_app(build_parser().parse_args(["serve", "--model", str(ckpt)]))) as base:
        done = run_example("--render", "Oat Milk", "--base-url", base + "/v1")
    assert done.returncode == 1
    assert "tool_choice needs tools" in done.stderr and "--tools ocr" in done.stderr
