"""Function calling for /v1/chat/completions, in OpenAI's shape.

    plan = tool_plan(body)           # tools and tool_choice checked; None without tools
    turns = with_tools(turns, plan.offered)               # what the model reads
    grammar = factory.compile_tool_calls(plan)            # what it decodes under
    message, finish = answer_message(text, finish, plan)  # its answer as content / tool_calls

`tool_choice` "auto" lets the model answer in text or call; "required" and a named function
make it call. In every mode a call, once begun, is decoded under its tool's JSON schema
(serve/grammar.py), so the arguments always parse and validate; "none" offers no tools.
`ToolCallStream` turns the streamed text into content deltas and, at the end, tool_calls
deltas in the order the openai SDK assembles them (id, type and name first, then arguments).

A call that does not fit max_tokens is never sent, as content or as a call: the budget ran
out inside it, or the grammar, which closes what it has begun within the budget
(infer/constrain), ended the answer before `<tool_call>` was complete because the call could
not close in what was left. Either way the answer ends with finish_reason "length", its
content the text before the call ("", not null, when that is nothing and no call came
before), like any answer max_tokens cut. OpenAI's own API sends such a call with its
arguments cut mid-JSON; a client that runs the calls it gets (LangChain's agents,
`json.loads(arguments)`) would fail on it, while "length" is what OpenAI clients already
handle as "cut: raise the budget" (the SDK's `parse()` raises LengthFinishReasonError).
Calls that closed before it are sent, with finish_reason "length" still. Where calls are
possible, an answer that ends in a beginning of `<tool_call>` ("<", "<tool") is taken for
such a call: that text is dropped and the reason is "length", even after a stop sequence.
When the calls that closed before the cut are all the server's own (--tools), the server runs
them (`tool_runs`) and the answer ends there: its content is the text outside the calls, with
no markup of them, and the reason is "length" (serve/answers.py).

The server's tool loop ends with a round in which no call may begin (`ToolPlan.final`): the
tools are still in the conversation, so a model would go on calling, but the grammar of that
round is free text in which `<tool` (visto's tool markup: `<tool_call>`, `<tools>`,
`<tool_response>`) never appears, or the `response_format` alone.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Any

from visto.data.tool_calls import (
    NAME_RE,
    TOOL_CALL_START,
    ParsedCall,
    parse_tool_calls,
    unfinished_call,
)
from visto.serve.errors import APIError
from visto.serve.schemas import ChatCompletionRequest, NamedToolChoice
from visto.tools.loop import round_choice

CHOICES = ("none", "auto", "required")
FINAL = "final"  # the plan of the tool loop's last round (ToolPlan.final), never a request's
# No call may begin in the final round: its text never holds this, the start of every piece of
# visto's tool markup (data/tool_calls.py).
TOOL_MARKUP = TOOL_CALL_START[: len("<tool")]
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    offered: list[dict[str, Any]]  # the tools as the model reads them (OpenAI dicts)
    parameters: dict[str, dict[str, Any]]  # name -> JSON schema of its arguments
    mode: str  # "none", "auto" or "required" (a named choice is "required" of one tool), or FINAL
    callable: tuple[str, ...]  # the tools this answer may call
    parallel: bool  # more than one call per answer
    server_run: frozenset[str] = field(default_factory=frozenset)  # built-in tools (tools/)

    @property
    def calls(self) -> bool:
        """Whether the answer decodes under a tool grammar and is read as one that may call
        (a cut call dropped): every mode but "none"."""
        return self.mode != "none"

    @property
    def final(self) -> bool:
        """The last round of a tool loop: the tools stay in the conversation but no call may
        begin (module doc); its answer is the final one."""
        return self.mode == FINAL

    def after_tool_round(self, index: int) -> ToolPlan:
        """The plan of round `index` (>= 1) of a tool loop (the server's, `visto chat`'s): the
        model may call any tool, then, in the last round, none (tools/loop.py), which its
        grammar enforces (`final`)."""
        if round_choice(self.mode, index) == "none":
            return dataclasses.replace(self, mode=FINAL, callable=())
        return dataclasses.replace(self, mode="auto", callable=tuple(self.parameters))


def _check_tool(i: int, tool: Any) -> tuple[str, dict[str, Any]]:
    fn = tool.function
    if not NAME_RE.match(fn.name):
        raise APIError(400, f"tools[{i}].function.name {fn.name!r} is not a valid function name: "
                       "use 1-64 letters, digits, '_' or '-'", f"tools[{i}].function.name")  # fmt: skip
    params = fn.parameters if fn.parameters is not None else EMPTY_PARAMETERS
    if params.get("type") != "object":
        raise APIError(400, f"tools[{i}].function.parameters must be a JSON Schema of an object "
                       '({"type": "object", "properties": {...}}): arguments are a JSON object',
                       f"tools[{i}].function.parameters")  # fmt: skip
    return fn.name, params


def tool_plan(body: ChatCompletionRequest, builtin: list[dict[str, Any]] = ()) -> ToolPlan | None:
    """The request's tools (and the server's `builtin` ones) and tool_choice, checked; None
    when no tool is in play. Errors name the field at fault, in OpenAI's envelope."""
    choice = body.tool_choice
    if not body.tools and not builtin:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools: give the functions the model may call "
                           "in `tools`", "tool_choice")  # fmt: skip
        return None
    offered, parameters = [], {}
    for i, tool in enumerate(body.tools or []):
        name, params = _check_tool(i, tool)
        if name in parameters:
            raise APIError(400, f"tools[{i}]: the function name {name!r} is given twice; names "
                           "must be unique", f"tools[{i}].function.name")  # fmt: skip
        parameters[name] = params
        offered.append(tool.model_dump(exclude_none=True))
    server_run = set()
    for tool in builtin:
        name = tool["function"]["name"]
        if name in parameters:
            raise APIError(400, f"the function {name!r} is one of this server's own tools (--tools); "
                           "rename yours", "tools")  # fmt: skip
        parameters[name] = tool["function"]["parameters"]
        offered.append(tool)
        server_run.add(name)
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in parameters:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is "
                           f"not among the tools: {sorted(parameters)}",
                           "tool_choice.function.name", "unknown_tool")  # fmt: skip
        mode, callable_ = "required", (choice.function.name,)
    else:
        mode = choice or "auto"
        if mode not in CHOICES:
            raise APIError(400, f"tool_choice must be 'none', 'auto', 'required' or "
                           '{"type": "function", "function": {"name": NAME}}, got ' f"{mode!r}",
                           "tool_choice")  # fmt: skip
        callable_ = tuple(parameters)
    if mode == "none":  # offered anyway? no: a model that cannot call is not shown the tools
        offered = []
    parallel = body.parallel_tool_calls is not False
    return ToolPlan(offered, parameters, mode, callable_, parallel, frozenset(server_run))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def client_calls(text: str, plan: ToolPlan | None) -> tuple[str, list[ParsedCall]] | None:
    """(content, calls for the client) when the answer calls tools the plan lets it call, else
    None; the calls may be none when all of them are the server's own. Calls of the server's
    own tools are left out, markup and all: the server runs them (tools/loop.py), or, in an
    answer that also calls the client's tools or ends in a cut call, drops them."""
    if plan is None or not plan.calls or plan.final:
        return None
    parsed = parse_tool_calls(text, set(plan.callable))
    if parsed is None:
        return None
    content, calls = parsed
    return content, [c for c in calls if c.name not in plan.server_run]


def openai_calls(calls: list[ParsedCall]) -> list[dict[str, Any]]:
    return [{"id": new_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in calls]  # fmt: skip


def without_cut_call(text: str, plan: ToolPlan | None) -> tuple[str, bool]:
    """(the answer without a call that never closed, whether one was dropped); see the module
    docstring. Only where calls are possible: elsewhere `<tool_call>` is just text."""
    if plan is None or not plan.calls:
        return text, False
    if plan.final:  # no call can begin (its grammar): only a beginning of one, cut at the end
        ends = (k for k in range(len(TOOL_MARKUP) - 1, 0, -1) if text.endswith(TOOL_MARKUP[:k]))
        k = next(ends, 0)
        return (text[: len(text) - k], True) if k else (text, False)
    start = unfinished_call(text)
    return (text, False) if start is None else (text[:start], True)


def read_answer(text: str, finish_reason: str,
                plan: ToolPlan | None) -> tuple[str, list[ParsedCall] | None, str]:  # fmt: skip
    """(content, the client's calls or None, finish_reason) of an answer: a cut call dropped
    ("length"), the calls of the server's own tools left out of the content, and "tool_calls"
    when calls of the client's tools remain and none was cut."""
    text, cut = without_cut_call(text, plan)
    finish_reason = "length" if cut else finish_reason
    parsed = client_calls(text, plan)
    if parsed is None:
        return text, None, finish_reason
    content, calls = parsed
    if not calls:  # only the server's own calls: run (and reported) before the cut, or dropped
        return content, None, finish_reason
    return content, calls, "length" if cut else "tool_calls"


def answer_message(
    text: str, finish_reason: str, plan: ToolPlan | None
) -> tuple[dict[str, Any], str]:
    """The chat.completion `message` for an answer, and its finish_reason ("tool_calls" when it
    calls tools, "length" when max_tokens cut it, a call included)."""
    content, calls, finish_reason = read_answer(text, finish_reason, plan)
    if calls is None:
        return {"role": "assistant", "content": content, "refusal": None}, finish_reason
    message = {"role": "assistant", "content": content if content.strip() else None,
               "refusal": None, "tool_calls": openai_calls(calls)}  # fmt: skip
    return message, finish_reason


class ToolCallStream:
    """One streamed answer: text goes out as content until a tool call may begin, then is held;
    `finish` gives what is left, as content or as tool_calls deltas."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""  # everything generated
        self.sent = 0  # characters of `text` sent as content
        self.holding = False  # a call has begun: the rest waits for `finish`

    def feed(self, piece: str) -> str:
        """The content that can go out now that `piece` has arrived."""
        self.text += piece
        if self.holding:
            return ""
        end = self.text.find(TOOL_CALL_START, self.sent)
        if end >= 0:
            self.holding = True
        else:  # hold back a tail that may be the beginning of "<tool_call>"
            end = len(self.text)
            for k in range(len(TOOL_CALL_START) - 1, 0, -1):
                if self.text.endswith(TOOL_CALL_START[:k]):
                    end -= k
                    break
        out = self.text[self.sent : max(self.sent, end)]
        self.sent += len(out)
        return out

    def finish(self, finish_reason: str) -> tuple[str, list[dict[str, Any]], str]:
        """(content still to send, tool_calls deltas, finish_reason) at the end of the answer.
        A call cut by the budget was held back (it begins after `sent`) and is dropped, as are
        the server's own calls (held back too)."""
        content, calls, finish_reason = read_answer(self.text, finish_reason, self.plan)
        if calls is None:
            return content[self.sent :], [], finish_reason
        deltas = []
        for index, call in enumerate(openai_calls(calls)):
            fn = call["function"]
            deltas.append({"index": index, "id": call["id"], "type": "function",
                           "function": {"name": fn["name"], "arguments": ""}})  # fmt: skip
            deltas.append({"index": index, "function": {"arguments": fn["arguments"]}})
        return content[self.sent :], deltas, finish_reason
