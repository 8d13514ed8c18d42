"""The tool loop end to end: a tiny random LLaVA forced to call (tool_choice named / required)
asks the OCR expert about a rendered label; visto runs it, feeds the result back as a tool turn
and the model answers. Through `visto serve --tools ocr` (openai SDK and raw SSE) and through
`visto chat --tools ocr` (the CLI), with a user's own tool module too."""

from __future__ import annotations

import io
import json
import sys

import openai
import pytest

from test_serve_support import data_url, make_llava_checkpoint, running
from test_tools import photo_label
from visto.cli import build_parser, main
from visto.commands.serve import build_app
from visto.tools.loop import MAX_TOOL_ROUNDS

pytestmark = pytest.mark.timeout(600)

LABEL = [("SALE 50% OFF", 36), ("Best before 2026", 26)]
LABEL_TEXT = "SALE 50% OFF\nBest before 2026"
FORCE_OCR = {"type": "function", "function": {"name": "ocr"}}
COLOUR = {"type": "function", "function": {"name": "pick_colour", "parameters": {
    "type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
    "required": ["colour"]}}}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 2,048 positions: the tools' definitions and an OCR result are long in a tiny tokenizer
    path = tmp_path_factory.mktemp("loop") / "tiny-llava" / "checkpoint"
    return make_llava_checkpoint(path, context=2048)


@pytest.fixture(scope="module")
def label_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("label") / "label.png"
    photo_label(LABEL)[0].save(path)
    return path


@pytest.fixture(scope="module")
def client(checkpoint):
    app = build_app(
        build_parser().parse_args(["serve", "--model", str(checkpoint), "--tools", "ocr"])
    )
    with running(app) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask_label(label_png) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(label_png.read_bytes())}},
        {"type": "text", "text": "What does the label say?"},
    ]}]  # fmt: skip


def check_runs(runs: list[dict]) -> None:
    assert 1 <= len(runs) and runs[0]["name"] == "ocr" and runs[0]["ok"]
    assert runs[0]["result"]["text"] == LABEL_TEXT
    for run in runs:  # later rounds may call again (auto); every call is valid and ran
        assert run["ok"] and run["name"] == "ocr" and run["result"]["text"] == LABEL_TEXT


def test_the_server_runs_its_ocr_tool_and_the_model_answers(client, label_png) -> None:
    reply = client.chat.completions.create(
        model="tiny-llava", messages=ask_label(label_png), tool_choice=FORCE_OCR, max_tokens=120
    )
    choice = reply.choices[0]
    runs = choice.model_extra["tool_runs"]
    check_runs(runs)
    assert len(runs) <= MAX_TOOL_ROUNDS  # the loop ends: the last round may not call
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    # every round was generated and counted: the later prompts hold the OCR result
    plain = client.chat.completions.create(
        model="tiny-llava", messages=ask_label(label_png), tool_choice="none", max_tokens=1
    )
    assert reply.usage.prompt_tokens > 2 * plain.usage.prompt_tokens


def test_the_loop_streams_its_rounds(client, label_png) -> None:
    chunks = list(client.chat.completions.create(
        model="tiny-llava", messages=ask_label(label_png), tool_choice="required", max_tokens=120,
        stream=True, stream_options={"include_usage": True},
    ))  # fmt: skip
    runs = [run for c in chunks if c.choices and "tool_runs" in (c.choices[0].model_extra or {})
            for run in c.choices[0].model_extra["tool_runs"]]  # fmt: skip
    check_runs(runs)
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals in (["stop"], ["length"])
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert chunks[-1].usage.prompt_tokens > 0


def test_an_image_the_ocr_expert_cannot_read_gives_the_model_an_error(client) -> None:
    """The real expert on a 3000 x 2 strip (it used to run out to a RapidOCR error with no
    message): the run fails at once with why, the model answers after it, the server goes on."""
    import time

    import httpx

    from test_serve_support import png_bytes

    strip = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(size=(3000, 2)))}},
        {"type": "text", "text": "What does it say?"},
    ]}]  # fmt: skip
    started = time.monotonic()
    reply = client.chat.completions.create(model="tiny-llava", messages=strip,
                                           tool_choice=FORCE_OCR, max_tokens=120)  # fmt: skip
    assert time.monotonic() - started < 30
    choice = reply.choices[0]
    run = choice.model_extra["tool_runs"][0]
    assert (run["name"], run["ok"]) == ("ocr", False)
    assert "3000 x 2 pixels, too thin to read text in" in run["result"]["error"]
    assert choice.finish_reason in ("stop", "length")  # the model answered after the error
    assert httpx.get(str(client.base_url.join("/health"))).json()["status"] == "ok"


def test_client_tools_go_back_to_the_client_beside_the_servers(client, label_png) -> None:
    reply = client.chat.completions.create(
        model="tiny-llava", messages=ask_label(label_png), tools=[COLOUR], max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "pick_colour"}},
        parallel_tool_calls=False,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.model_extra["tool_runs"] == []
    [call] = choice.message.tool_calls
    assert call.function.name == "pick_colour"
    assert json.loads(call.function.arguments)["colour"] in ("red", "blue")
    with pytest.raises(openai.BadRequestError, match="one of this server's own tools"):
        client.chat.completions.create(
            model="tiny-llava", messages=ask_label(label_png), max_tokens=4,
            tools=[{"type": "function", "function": {"name": "ocr"}}],
        )  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="one choice"):
        client.chat.completions.create(
            model="tiny-llava", messages=ask_label(label_png), max_tokens=4, n=2
        )


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["chat", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_visto_chat_runs_the_ocr_tool_and_answers(capsys, checkpoint, label_png) -> None:
    code, out, err = cli(capsys, "--model", str(checkpoint), str(label_png),
                         "What does the label say?", "--tools", "ocr", "--tool-choice", "ocr",
                         "--max-tokens", "120", "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    check_runs(result["tool_runs"])
    assert isinstance(result["answer"], str) and "<tool_call>" not in result["answer"]

    code, out, err = cli(capsys, "--model", str(checkpoint), str(label_png), "Read it.",
                         "--tools", "ocr", "--tool-choice", "required", "--max-tokens", "120",
                         "--stream")  # fmt: skip
    assert code == 0, err
    assert out.startswith("tool ocr {") and '"text":"SALE 50% OFF\\nBest before 2026"' in out
    assert "<tool_call>" not in out


def test_visto_chat_with_a_users_tool_and_clear_errors(capsys, checkpoint, label_png, tmp_path,
                                                       monkeypatch) -> None:  # fmt: skip
    (tmp_path / "shop_tools.py").write_text(
        "from visto.tools import Tool\n"
        "size = Tool('size', 'The image size', lambda image: [image.width, image.height])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = cli(capsys, "--model", str(checkpoint), str(label_png), "How big?",
                         "--tools", "shop_tools:size", "--tool-choice", "size",
                         "--max-tokens", "60", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["tool_runs"][0] == {"name": "size", "arguments": "{}",
                                               "result": [480, 200], "ok": True}  # fmt: skip
    sys.modules.pop("shop_tools", None)

    for flags, message in [
        (["--tool-choice", "required"], "--tool-choice needs --tools"),
        (["--tools", "ocr", "--tool-choice", "zoom"], "--tool-choice 'zoom'"),
        (["--tools", "paint"], "unknown tool 'paint'"),
        (["--tools", "segment=nowhere/checkpoint"], "read a clipseg checkpoint"),
        (["--tools", "ocr", "--task", "extract"], "do not mix"),
    ]:
        code, _, err = cli(capsys, "--model", str(checkpoint), str(label_png), "q", *flags)
        assert code == 2 and message in err, err


def test_the_interactive_chat_keeps_the_tools_after_reset(capsys, checkpoint, label_png,
                                                          monkeypatch) -> None:  # fmt: skip
    monkeypatch.setattr(sys, "stdin", io.StringIO("Read it.\n/reset\nAgain?\n"))
    code, out, err = cli(capsys, "--model", str(checkpoint), str(label_png), "--interactive",
                         "--tools", "ocr", "--tool-choice", "ocr", "--max-tokens", "120",
                         "--json")  # fmt: skip
    assert code == 0, err
    answers = [json.loads(line) for line in out.splitlines()]
    assert len(answers) == 2
    for answer in answers:
        check_runs(answer["tool_runs"])


def test_the_readme_tools_section_commands_parse() -> None:
    """Every `visto` command the README's tools section shows parses; those that chat or serve
    name tools the registry has."""
    import shlex
    from pathlib import Path

    from visto.tools import default_registry

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Tools and experts", 1)[1].split("\n## ", 1)[0]
    joined = section.replace("\\\n", " ")  # continuation lines: one command
    commands = [ln.split("  #")[0] for ln in joined.splitlines() if ln.startswith("visto ")]
    assert len(commands) >= 2
    known = set(default_registry().names) | {"segment", "detect"}  # the two load a checkpoint
    for line in commands:
        args = build_parser().parse_args(shlex.split(line)[1:])
        if getattr(args, "tools", None):
            assert set(args.tools.split(",")) <= known, line
