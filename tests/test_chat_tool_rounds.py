"""`visto chat --tools`: the tool loop's last round may not call. With a model that always
calls (test_serve_tool_budget's wired caller), every round but the last runs a call, and the
last one answers in text without tool markup (its grammar lets no `<tool` begin), as
`visto serve --tools` does (test_serve_tool_rounds)."""

from __future__ import annotations

import json
import sys

import pytest

from test_serve_tool_budget import make_caller_checkpoint
from test_serve_tool_rounds import MARK_TOOLS, check_runs, clean
from visto.cli import main
from visto.tools.loop import MAX_TOOL_ROUNDS

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    """(checkpoint, the tool spec): the wired caller and a tool module it calls."""
    root = tmp_path_factory.mktemp("chat-rounds")
    ckpt = make_caller_checkpoint(root / "caller" / "checkpoint")
    (root / "chat_rounds_mark.py").write_text(MARK_TOOLS)
    sys.path.insert(0, str(root))
    yield ckpt, "chat_rounds_mark:mark"
    sys.path.remove(str(root))
    sys.modules.pop("chat_rounds_mark", None)


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
