"""`visto chat --tools` at the token budget's edge, through the CLI: a call that does not fit
--max-tokens is never printed (whole answer, --json, or --stream), the answer ends with
finish_reason "length" and the user is told that a tool call was cut and to raise
--max-tokens; at a budget the call fits, it runs. The server's rule (serve.tools.
without_cut_call), tested over HTTP in test_serve_tool_budget, with its model: a tiny LLaVA
wired to begin a call, whose arguments the grammar decodes under the tool's schema."""

from __future__ import annotations

import json
import sys

import pytest

from test_serve_tool_budget import PAINT, make_caller_checkpoint, valid
from visto.cli import main

pytestmark = pytest.mark.timeout(300)

NOTE = "a tool call was cut at --max-tokens"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("chat-budget")
    ckpt = make_caller_checkpoint(root / "caller" / "checkpoint")
    image = root / "square.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    parameters = PAINT["function"]["parameters"]
    (root / "budget_paint.py").write_text(
        "from visto.tools import Tool\n"
        f"paint = Tool('paint', 'Paint the square', lambda image, **a: {{'painted': a['colour']}},"
        f" parameters={parameters!r})\n"
    )
    sys.path.insert(0, str(root))
    yield ckpt, image
    sys.path.remove(str(root))
    sys.modules.pop("budget_paint", None)


def chat(capsys, setup, budget: int, *flags: str) -> tuple[str, str]:
    ckpt, image = setup
    code = main(["chat", "--model", str(ckpt), str(image), "Paint the square red.",
                 "--tools", "budget_paint:paint", "--max-tokens", str(budget), *flags])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out, out.err


@pytest.mark.slow  # 88 budgets, whole and streamed: ~20 s
def test_a_call_cut_by_max_tokens_is_never_printed(capsys, setup) -> None:
    # With one token the grammar may end the answer before it writes any of the call (it
    # closes what it begins within the budget): nothing to cut then, and "stop" is true.
    one = json.loads(chat(capsys, setup, 1, "--json")[0])
    assert (one["answer"], one["tool_runs"]) == ("", [])
    assert one["finish_reason"] in ("stop", "length")
    kinds = []
    for budget in range(2, 90):
        out, err = chat(capsys, setup, budget, "--json")
        reply = json.loads(out)
        streamed, streamed_err = chat(capsys, setup, budget, "--stream")
        if not reply["tool_runs"]:  # the call did not fit: nothing of it, and the user is told
            assert "<" not in reply["answer"], (budget, reply)
            assert (reply["answer"], reply["finish_reason"]) == ("", "length"), (budget, reply)
            assert reply["tool_call_cut"] is True
            assert NOTE in err and "raise --max-tokens" in err, (budget, err)
            assert streamed.strip() == "", (budget, streamed)
            assert f"{NOTE} {budget}" in streamed_err, (budget, streamed_err)
            kinds.append("cut")
        else:  # it fit (or the grammar closed a shorter one in time): it ran, never as text
            first = reply["tool_runs"][0]
            assert (first["name"], first["ok"]) == ("paint", True), (budget, reply)
            valid(first["arguments"])
            assert streamed.startswith(f"tool paint {first['arguments']} -> "), (budget, streamed)
            kinds.append("ran")
    # the call is ~80 tokens: small budgets cut it, from some budget on it runs
    assert kinds[:20] == ["cut"] * 20 and kinds[-1] == "ran", kinds
    edge = kinds.index("ran")
    assert set(kinds[edge:]) == {"ran"}, kinds


def test_the_conversation_keeps_the_answer_without_the_cut_call(setup) -> None:
    """What the next turn reads is the answer as printed (as a client of the server sends it
    back), not the cut markup."""
    import argparse

    from PIL import Image

    from visto.commands._chat_tools import ToolLoop
    from visto.commands._common import load_for_inference
    from visto.infer import SamplingParams
    from visto.tasks.runner import Chat

    ckpt, image_path = setup
    model = load_for_inference(str(ckpt), "cpu", False)
    loop = ToolLoop.build(model, "budget_paint:paint", "auto")
    image = Image.open(image_path).convert("RGB")
    chat_ = Chat(model, [image], tools=loop.tools.openai())
    args = argparse.Namespace(task=None, stream=False, json=True)
    reply, runs = loop.answer(chat_, "Paint it.", args, SamplingParams(max_new_tokens=20), [image])
    assert (reply.text, reply.raw, reply.finish_reason, runs) == ("", "", "length", [])
    assert loop.cut_call and chat_.turns[-1].role == "assistant"
    assert chat_.turns[-1].content == ""
    reply, _ = loop.answer(chat_, "Again.", args, SamplingParams(max_new_tokens=20), [image])
    assert reply.finish_reason == "length" and "<" not in reply.text
