"""How tools, tool calls and tool results are written in visto's chat text, and read back.

visto's vocabulary has no tool role or tool tokens (adding special tokens would move the ids
of every trained checkpoint), so function calling lives in plain text inside the existing
turns, in the shape Hermes/Qwen models use:

    <|system|>{TOOLS_INTRO}<tools>{"type":"function","function":{...}}</tools>\\n{system}<|end|>
    <|user|>What does the label say?<|end|>
    <|assistant|><tool_call>{"name":"ocr","arguments":{}}</tool_call><|end|>
    <|user|><tool_response>{"text":"SALE 50%",...}</tool_response><|end|>
    <|assistant|>It says SALE 50%.<|end|>

- Tool definitions go first in the system turn (one is added when the conversation has none).
- A call is `<tool_call>{"name":NAME,"arguments":ARGS}</tool_call>`, JSON without spaces, as
  the grammar (serve/grammar.py) forces it; several calls follow one another.
- A tool's result is a user turn `<tool_response>CONTENT</tool_response>`: results come back
  in the order of the calls, so the template needs no call ids.

`chat.JINJA_CHAT_TEMPLATE` writes the same text from transformers-style messages (`tools=`,
`tool_calls`, role `tool`); a test holds the two equal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from visto.data.sample import Turn

TOOLS_START, TOOLS_END = "<tools>", "</tools>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
TOOLS_INTRO = (
    "You may call these tools. To call one, answer "
    f'{TOOL_CALL_START}{{"name":NAME,"arguments":{{...}}}}{TOOL_CALL_END}; '
    f"its result comes back as {TOOL_RESPONSE_START}...{TOOL_RESPONSE_END}."
)
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_CALL_RE = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.S)


def compact_json(value: Any) -> str:
    """JSON as the template and the grammar write it: no spaces, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def tools_text(tools: list[dict[str, Any]]) -> str:
    """The system-turn text that offers `tools` (OpenAI `{"type": "function", ...}` dicts)."""
    return TOOLS_INTRO + TOOLS_START + "\n".join(compact_json(t) for t in tools) + TOOLS_END


def with_tools(turns: list[Turn], tools: list[dict[str, Any]] | None) -> list[Turn]:
    """The conversation with `tools` offered at the start of its system turn."""
    if not tools:
        return list(turns)
    offer = tools_text(tools)
    if turns and turns[0].role == "system":
        return [Turn("system", offer + "\n" + turns[0].content), *turns[1:]]
    return [Turn("system", offer), *turns]


def tool_call_text(name: str, arguments: str | dict[str, Any]) -> str:
    """One call as the model writes it; `arguments` as OpenAI sends them (a JSON string, kept
    verbatim) or as transformers does (a dict)."""
    args = arguments if isinstance(arguments, str) else compact_json(arguments)
    return f'{TOOL_CALL_START}{{"name":{json.dumps(name, ensure_ascii=False)},"arguments":{args}}}{TOOL_CALL_END}'


def assistant_turn(content: str | None, calls: list[tuple[str, str | dict[str, Any]]]) -> Turn:
    """An assistant turn: its text, then its calls as (name, arguments)."""
    return Turn("assistant", (content or "") + "".join(tool_call_text(n, a) for n, a in calls))


def tool_result_turn(content: str) -> Turn:
    return Turn("user", TOOL_RESPONSE_START + content + TOOL_RESPONSE_END)


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, compact


def parse_tool_calls(
    text: str, known: set[str] | None = None
) -> tuple[str, list[ParsedCall]] | None:
    """(the text outside the calls, the calls) of a model's answer; None when the answer has
    no call, or a call that is not JSON `{"name": str, "arguments": object}` naming one of
    `known` (then the answer is plain text, as the model wrote it)."""
    blocks = list(_CALL_RE.finditer(text))
    if not blocks or TOOL_CALL_START in _CALL_RE.sub("", text):
        return None  # no call, or one cut off (the token budget ran out inside it)
    calls = []
    for block in blocks:
        try:
            # strict=False: lenient on raw control characters in strings (JSON forbids them;
            # a model decoding without the grammar may write them): re-dumped below, escaped
            call = json.loads(block.group(1), strict=False)
        except json.JSONDecodeError:
            return None
        if not (
            isinstance(call, dict)
            and set(call) == {"name", "arguments"}
            and isinstance(call["name"], str)
            and isinstance(call["arguments"], dict)
        ):
            return None
        if known is not None and call["name"] not in known:
            return None
        calls.append(ParsedCall(call["name"], compact_json(call["arguments"])))
    return _CALL_RE.sub("", text), calls


# The built-in OCR tool's definition, here in the data layer so that a training mix can offer
# it (data/ may not import tools/); visto.tools.ocr builds its Tool from the same two values,
# so the text a model learns and the tool it calls cannot drift apart.
OCR_DESCRIPTION = ("Read the text in the image: the text line by line and each word with its box "
                   "(x1, y1, x2, y2 in 0..999 and in pixels) and confidence.")
OCR_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "detail": {
            "type": "string",
            "enum": ["text", "words"],
            "description": "'text' for the text only, 'words' (the default) for each word's box too",
        }
    },
    "additionalProperties": False,
}  # fmt: skip
