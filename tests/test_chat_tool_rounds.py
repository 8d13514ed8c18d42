"""`visto chat --tools`: the tool loop's last round may not call. With a model that always
calls (test_serve_tool_budget's wired caller), every round but the last runs a call, and the
last one answers in text without tool markup (its grammar lets no `<tool` begin), as
`visto serve --tools` does (test_serve_tool_rounds). Each round is read with its own plan: a
call the budget cut after calls that closed ends the answer there (those calls run), and in
the last round, which cannot call, a `<` the budget cut is only text cut short."""

from __future__ import annotations

import json

import pytest

from test_serve_tool_rounds import caller_with_mark_tool, check_runs, clean
from visto.cli import main
from visto.tools.loop import MAX_TOOL_ROUNDS

TOOL_CUT = "a tool call was cut at --max-tokens"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    """(checkpoint, the tool spec): the wired caller and a tool module it calls."""
    yield from caller_with_mark_tool(tmp_path_factory, "chat_rounds_mark")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("chat-rounds-image") / "square.png"
    Image.new("RGB", (24, 16), (200, 30, 30)).save(path)
    return path


def test_visto_chat_ends_the_loop_with_an_answer_that_cannot_call(capsys, caller, image) -> None:
    ckpt, spec = caller
    code = main(["chat", "--model", str(ckpt), str(image), "Mark it.", "--tools", spec,
                 "--max-tokens", "40", "--json"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    reply = json.loads(out.out)
    check_runs(reply["tool_runs"])
    assert len(reply["tool_runs"]) == MAX_TOOL_ROUNDS
    clean(reply["answer"])
    assert reply["answer"] and reply["finish_reason"] == "length"

    code = main(["chat", "--model", str(ckpt), str(image), "Mark it.", "--tools", spec,
                 "--max-tokens", "40", "--stream"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    lines = out.out.splitlines()
    assert [line.split(" ", 2)[:2] for line in lines[:MAX_TOOL_ROUNDS]] == [["tool", "mark"]] * 3
    clean("\n".join(lines[MAX_TOOL_ROUNDS:]))


def chat(capsys, caller, image, budget: int, *flags: str) -> tuple[str, str]:
    ckpt, spec = caller
    code = main(["chat", "--model", str(ckpt), str(image), "Mark it.", "--tools", spec,
                 "--max-tokens", str(budget), *flags])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err  # a cut answer is an answer (chat's exit code for "length")
    return out.out, out.err


@pytest.mark.parametrize("budget", [50, 70])
def test_a_call_cut_after_calls_that_ran_ends_the_answer(capsys, caller, image, budget) -> None:
    # The wired caller writes a call (37 tokens) and begins another after it: from 42 to 75
    # tokens the second one cannot close, so the grammar ends the answer inside `<tool_call`.
    # The first call runs and the answer ends there, as the server's does (finish_reason
    # "length", test_serve_tool_rounds); it went on to the next rounds.
    reply = json.loads(chat(capsys, caller, image, budget, "--json")[0])
    check_runs(reply["tool_runs"])
    assert len(reply["tool_runs"]) == 1, reply
    clean(reply["answer"])
    assert "<" not in reply["answer"], reply
    assert (reply["finish_reason"], reply["tool_call_cut"]) == ("length", True), reply
    assert reply["completion_tokens"] <= budget, reply

    # streamed: the one run, then the answer's text (outside the calls), and nothing more
    out, err = chat(capsys, caller, image, budget, "--stream")
    run, *text = out.splitlines()
    assert run.split(" ", 2)[:2] == ["tool", "mark"], out
    assert "\n".join(text).strip() == reply["answer"], out
    assert f"{TOOL_CUT} {budget}" in err and "raise --max-tokens" in err, err


def test_the_last_round_cut_at_a_lt_is_text_cut_short(capsys, caller, image) -> None:
    # At 79 tokens each round but the last writes two calls and ends after them (no call cut);
    # the last round, whose grammar lets no `<tool` begin, repeats `<!_call>\ufffd` (6 tokens)
    # and the budget cuts it just after a `<`. That `<` is dropped (the server's rule) but it
    # begins no call: the answer was cut, not a call (it said "a tool call was cut").
    out, err = chat(capsys, caller, image, 79, "--json")
    reply = json.loads(out)
    check_runs(reply["tool_runs"])
    assert len(reply["tool_runs"]) == 2 * MAX_TOOL_ROUNDS, reply
    clean(reply["answer"])
    assert reply["answer"] and not reply["answer"].endswith("<"), reply
    assert (reply["finish_reason"], reply["tool_call_cut"]) == ("length", False), reply
    assert TOOL_CUT not in err, err

    out, err = chat(capsys, caller, image, 79)
    assert TOOL_CUT not in err and "(the answer was cut at --max-tokens 79)" in err, err
