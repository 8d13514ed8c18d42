"""The server's own tools (--tools) at the edges of the tool loop, over real HTTP with the
openai SDK, with a model that always calls (test_serve_tool_budget's wired caller: after
`<|assistant|>` it writes `<tool_call>`, and after a call's closing `>` it begins another):

- the loop's last round may not call: its answer is decoded under a grammar in which no
  `<tool` markup can begin (free text, cut by the budget like any text), or the
  response_format's JSON, so the model's urge to call never reaches the content;
- calls of the server's tools that closed before a call the budget cut run (tool_runs) and the
  answer ends there: content without any call markup, finish_reason "length", whole and
  streamed alike."""

from __future__ import annotations

import json
import sys

import openai
import pytest

from test_serve_support import data_url, png_bytes, running
from test_serve_tool_budget import make_caller_checkpoint
from visto.cli import build_parser
from visto.commands.serve import build_app
from visto.data.tool_calls import TOOL_CALL_END
from visto.serve.tools import TOOL_MARKUP
from visto.tools.loop import MAX_TOOL_ROUNDS

pytestmark = pytest.mark.timeout(300)

MARK_TOOLS = (
    "from visto.tools import Tool\n"
    "mark = Tool('mark', 'Mark the image', lambda image: {'marked': image.size[0]})\n"
)
MESSAGES = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
    {"type": "text", "text": "Mark it."},
]}]  # fmt: skip


def caller_with_mark_tool(tmp_path_factory, module: str):
    """Yields (checkpoint, the tool spec): the wired caller and a tool module named `module`
    that it calls (a module fixture's body: the module leaves sys.path afterwards)."""
    root = tmp_path_factory.mktemp(module)
    ckpt = make_caller_checkpoint(root / "caller" / "checkpoint")
    (root / f"{module}.py").write_text(MARK_TOOLS)
    sys.path.insert(0, str(root))
    yield ckpt, f"{module}:mark"
    sys.path.remove(str(root))
    sys.modules.pop(module, None)


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    """(checkpoint, the tool spec): the wired caller and a tool module it calls."""
    yield from caller_with_mark_tool(tmp_path_factory, "rounds_mark")


@pytest.fixture(scope="module")
def client(caller):
    ckpt, spec = caller
    app = build_app(build_parser().parse_args(["serve", "--model", str(ckpt), "--tools", spec]))
    with running(app) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


def clean(content: str | None) -> None:
    assert content is not None
    assert TOOL_MARKUP not in content and TOOL_CALL_END not in content, content
    assert '"name":"mark"' not in content, content


def streamed(client, **kwargs) -> tuple[str, list[dict], str | None, int]:
    """(content, tool runs, finish_reason, tool_calls deltas) of a streamed answer."""
    content, runs, finish, deltas = "", [], None, 0
    for chunk in client.chat.completions.create(model="caller", messages=MESSAGES, stream=True,
                                                **kwargs):  # fmt: skip
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        runs += (choice.model_extra or {}).get("tool_runs", [])
        deltas += len(choice.delta.tool_calls or [])
        finish = choice.finish_reason or finish
    return content, runs, finish, deltas


def plan_of(tools):
    """The first round's plan of an answer that may call `tools`, all the server's own."""
    from visto.serve.tools import ToolPlan

    return ToolPlan(tools.openai(), {n: tools.get(n).parameters for n in tools.names}, "auto",
                    tuple(tools.names), True, frozenset(tools.names))  # fmt: skip


def check_runs(runs: list[dict]) -> None:
    assert runs and all((r["name"], r["ok"], r["result"]) == ("mark", True, {"marked": 24})
                        for r in runs), runs  # fmt: skip


def test_the_last_round_cannot_begin_a_call(client) -> None:
    # 40 tokens: one call per round (the next one could not close in what is left)
    reply = client.chat.completions.create(model="caller", messages=MESSAGES, max_tokens=40)
    choice = reply.choices[0]
    runs = choice.model_extra["tool_runs"]
    check_runs(runs)
    # every round but the last called, and the last one, which the model would fill with calls
    # as well, is free text without tool markup that the budget cut
    assert len(runs) == MAX_TOOL_ROUNDS and reply.usage.completion_tokens > 3 * 30
    clean(choice.message.content)
    assert choice.message.content and choice.message.tool_calls is None
    assert choice.finish_reason == "length"

    content, streamed_runs, finish, deltas = streamed(client, max_tokens=40)
    assert (content, finish, deltas) == (choice.message.content, "length", 0)
    assert streamed_runs == runs


def test_the_last_round_answers_in_the_response_format(client) -> None:
    reply = client.chat.completions.create(
        model="caller", messages=MESSAGES, max_tokens=40, response_format={"type": "json_object"}
    )
    choice = reply.choices[0]
    check_runs(choice.model_extra["tool_runs"])
    assert isinstance(json.loads(choice.message.content), dict)  # json_object: an object
    assert choice.finish_reason == "stop"  # the JSON closes within the budget


def test_server_calls_before_a_cut_call_run_and_the_answer_ends_clean(client) -> None:
    one_round = []
    for budget in range(36, 100, 2):
        reply = client.chat.completions.create(model="caller", messages=MESSAGES,
                                               max_tokens=budget)  # fmt: skip
        choice = reply.choices[0]
        runs = choice.model_extra["tool_runs"]
        clean(choice.message.content)
        assert choice.message.tool_calls is None, budget
        if runs:
            check_runs(runs)
        content, streamed_runs, finish, deltas = streamed(client, max_tokens=budget)
        assert (content, finish) == (choice.message.content, choice.finish_reason), budget
        assert (streamed_runs, deltas) == (runs, 0), budget
        if runs and reply.usage.completion_tokens <= budget:
            # one round: its calls ran and a call after them was cut; the answer ends there
            assert choice.finish_reason == "length", (budget, choice)
            one_round.append(budget)
    # the model writes calls until the budget runs out: most budgets end in a cut call
    assert len(one_round) >= 10, one_round


def test_the_final_grammar_allows_text_but_no_tool_markup(caller) -> None:
    import xgrammar as xgr

    from visto.commands._common import load_for_inference
    from visto.serve.grammar import GrammarFactory, OpenEnded
    from visto.serve.tools import ToolPlan
    from visto.tasks.runner import logits_width, processor_of

    model = load_for_inference(str(caller[0]), "cpu", False)
    tokenizer = processor_of(model).tokenizer
    factory = GrammarFactory(tokenizer, logits_width(model), [tokenizer.end_id])
    plan = ToolPlan([], {"mark": {"type": "object", "properties": {}}}, "auto", ("mark",), True,
                    frozenset({"mark"})).after_tool_round(MAX_TOOL_ROUNDS)  # fmt: skip
    assert plan.final and plan.calls and plan.callable == ()
    compiled = factory.compile_tool_calls(plan)
    assert isinstance(compiled, OpenEnded) and factory.fewest_tokens(compiled) == 1

    def accepts(text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiled.compiled)
        return all(matcher.accept_token(t) for t in tokenizer.encode(text))

    assert accepts("a < b, <b>bold</b> and a tool") and accepts("<too")
    for text in ["<tool_call>", 'x <tool_call>{"name":"mark"', "<tools>", "<tool_response>"]:
        assert not accepts(text), text
    # rounds before the last may call
    assert not plan.after_tool_round(1).final


def test_an_answer_of_server_calls_and_a_cut_call_reads_clean() -> None:
    """The rule itself, at each way a call can be cut: by the budget inside the call (no
    grammar, or a stop sequence), or at the beginning of `<tool_call>` where the grammar ended
    the answer because the call could not close."""
    from PIL import Image

    from visto.serve.rounds import ChatRound, server_tools
    from visto.serve.tools import ToolCallStream, answer_message
    from visto.tools import Tool, ToolRegistry

    tools = ToolRegistry([Tool("mark", "Mark the image", lambda image: {"marked": image.width})])
    plan = plan_of(tools)
    ready = ChatRound([], [], 0, plan, [], [Image.new("RGB", (5, 3))])
    call = '<tool_call>{"name":"mark","arguments":{}}</tool_call>'
    for cut in ['<tool_call>{"name":"mark","argu', "<tool_call>", "<tool_c", "<"]:
        text = f"Marking.{call}{call} then{cut}"
        done = server_tools(ready, text, tools)
        assert done is not None and done.cut and len(done.report()) == 2, cut
        assert [r["result"] for r in done.report()] == [{"marked": 5}] * 2
        message, finish = answer_message(text, "length", plan)
        assert (message["content"], finish) == ("Marking. then", "length"), cut
        assert "tool_calls" not in message
        stream = ToolCallStream(plan)
        sent = "".join(stream.feed(piece) for piece in [text[:5], text[5:20], text[20:]])
        held, deltas, finish = stream.finish("length")
        assert (sent + held, deltas, finish) == ("Marking. then", [], "length"), cut
    # calls that close with nothing cut after them run, and the loop goes on
    done = server_tools(ready, f"{call}", tools)
    assert done is not None and not done.cut
