"""How tools, tool calls and tool results are written in visto's chat text, and read back.

visto's vocabulary has no tool role or tool tokens (adding special tokens would move the ids
of every trained checkpoint), so function calling lives in plain text inside the existing
turns, in the shape Hermes/Qwen models use:

    <|system|>{TOOLS_INTRO}<tools>ocr(detail?: "text"|"words"): Read the text ...</tools>\\n{system}<|end|>
    <|user|>What does the label say?<|end|>
    <|assistant|><tool_call>{"name":"ocr","arguments":{}}</tool_call><|end|>
    <|user|><tool_response>{"text":"SALE 50%",...}</tool_response><|end|>
    <|assistant|>It says SALE 50%.<|end|>

- Tool definitions go first in the system turn (one is added when the conversation has none),
  one line each in a compact, TypeScript-like signature of the JSON schema (`tool_line`), as
  gpt-oss's template renders tools, rather than the schema's JSON: the quickstart tokenizer
  spends ~0.7 tokens a character on JSON, and the three built-in tools' JSON took 884 tokens
  of a 512-token training sample. Requests still send (and the server still validates and
  decodes calls under) full JSON schemas; only what the model reads is shorter.
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
TOOLS_INTRO = f'Call a tool as {TOOL_CALL_START}{{"name":NAME,"arguments":{{...}}}}{TOOL_CALL_END}.'
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_CALL_RE = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)" + re.escape(TOOL_CALL_END), re.S)


def compact_json(value: Any) -> str:
    """JSON as the template and the grammar write it: no spaces, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def tools_text(tools: list[dict[str, Any]]) -> str:
    """The system-turn text that offers `tools` (OpenAI `{"type": "function", ...}` dicts)."""
    return TOOLS_INTRO + TOOLS_START + "\n".join(tool_line(t) for t in tools) + TOOLS_END


def tool_line(tool: dict[str, Any]) -> str:
    """One tool as the model reads it: `name(arg: type, opt?: type /*about arg*/): about`.

    `detail?: "text"|"words"` is an optional enum, `n: integer`, `tags: string[]`,
    `box: {x: number, y: number}`; chat.JINJA_CHAT_TEMPLATE writes the same."""
    fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    params = fn.get("parameters")
    if isinstance(params, dict) and isinstance(params.get("properties", {}), dict):
        required = _required(params)
        args = ", ".join(
            _key(k, required) + _type_text(spec) + _comment(spec)
            for k, spec in params.get("properties", {}).items()
        )
    elif params is None:
        args = ""
    else:
        args = compact_json(params)
    description = fn.get("description")
    about = f": {description}" if isinstance(description, str) and description else ""
    return f"{fn.get('name')}({args}){about}"


def _required(schema: dict[str, Any]) -> list[Any]:
    required = schema.get("required")
    return required if isinstance(required, list) else []


def _key(key: str, required: list[Any]) -> str:
    return f"{key}{'' if key in required else '?'}: "


def _comment(spec: Any) -> str:
    description = spec.get("description") if isinstance(spec, dict) else None
    return f" /*{description}*/" if isinstance(description, str) and description else ""


def _type_text(spec: Any) -> str:
    """A schema as a TypeScript-like type: JSON Schema's type names, enums, arrays and objects
    (nested properties without their descriptions); anything else (anyOf, $ref, no type) as its
    compact JSON."""
    if not isinstance(spec, dict):
        return compact_json(spec)
    if isinstance(spec.get("enum"), list) and spec["enum"]:
        return "|".join(compact_json(v) for v in spec["enum"])
    kind = spec.get("type")
    if isinstance(kind, list) and kind and all(isinstance(k, str) for k in kind):
        return "|".join(kind)
    if kind == "array":
        items = spec.get("items")
        inner = _type_text(items) if isinstance(items, dict) else "any"
        return f"({inner})[]" if "|" in inner else f"{inner}[]"
    if kind == "object" and isinstance(spec.get("properties"), dict) and spec["properties"]:
        required = _required(spec)
        return "{" + ", ".join(_key(k, required) + _type_text(v)
                               for k, v in spec["properties"].items()) + "}"  # fmt: skip
    if isinstance(kind, str):
        return kind
    return compact_json(spec)


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


def unfinished_call(text: str) -> int | None:
    """Where a tool call that never closed begins in a model's answer: a `<tool_call>` with no
    `</tool_call>` after it, or a beginning of `<tool_call>` at its very end (the budget ran
    out, or the grammar ended the answer there because the call could not close within it);
    None when there is none."""
    start = text.rfind(TOOL_CALL_START)
    if start >= 0 and text.find(TOOL_CALL_END, start) < 0:
        return start
    for k in range(len(TOOL_CALL_START) - 1, 0, -1):
        if text.endswith(TOOL_CALL_START[:k]):
            return len(text) - k
    return None


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
# Descriptions are short: every token of them is in every prompt that offers the tool
# (bench/tool_prompt.py); the result's keys (text, words, box, box_pixels, confidence) say the rest.
OCR_DESCRIPTION = "Read the text in the image; 'words' (the default) adds each word's box."
OCR_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"detail": {"type": "string", "enum": ["text", "words"]}},
    "additionalProperties": False,
}  # fmt: skip
