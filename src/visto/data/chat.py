"""visto's chat template: how a conversation becomes one string of text and special tokens.

    <s><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{answer}<|end|>...

- The sequence opens with `<s>`; each turn is its role marker, its content verbatim, `<|end|>`.
- With `add_generation_prompt` the string ends in `<|assistant|>`, so the model writes the answer
  and stops by emitting `<|end|>`.
- No newlines or spaces are added around markers: every boundary between content and
  structure is a special token, so tokenizing the whole string gives the same ids as
  tokenizing each content piece alone. That is what lets the processor build the label mask
  piece by piece and still agree with transformers' `apply_chat_template` (and so vLLM).
- Images appear where the content has `<image>` (the LLaVA convention); the processor later
  expands each one to `<im_start><image>*n<im_end>`.

`JINJA_CHAT_TEMPLATE` is the same template for transformers' tokenizers; it also accepts
OpenAI-style content lists (`[{"type": "image"}, {"type": "text", "text": "..."}]`), rendering
each image part as `<image>`, and carries function calling as `tool_calls.py` writes it
(`tools=`, an assistant's `tool_calls`, role `tool`). A test checks that both give the same
string.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from visto.data.sample import IMAGE_PLACEHOLDER, Turn
from visto.data.special_tokens import BOS, END_OF_TURN, ROLE_TOKENS
from visto.data.tool_calls import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_RESPONSE_END,
    TOOL_RESPONSE_START,
    TOOLS_END,
    TOOLS_INTRO,
    TOOLS_START,
)


def render_chat(turns: Sequence[Turn], add_generation_prompt: bool = False) -> str:
    """The conversation as template text (see module docstring)."""
    parts = [BOS]
    for turn in turns:
        parts += [ROLE_TOKENS[turn.role], turn.content, END_OF_TURN]
    if add_generation_prompt:
        parts.append(ROLE_TOKENS["assistant"])
    return "".join(parts)


def _lit(text: str) -> str:
    """`text` as a Jinja string literal (JSON's escapes are Jinja's)."""
    return json.dumps(text)


# A message's content: a string, or OpenAI-style parts with each image part as `<image>`.
_CONTENT_MACRO = (
    "{% macro content(c) %}"
    "{% if c is string %}{{ c }}"
    "{% elif c %}{% for part in c %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}{{ "
    + _lit(IMAGE_PLACEHOLDER)
    + " }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
)

# tool_calls.tool_line: a tool as a one-line signature. `x is list` below stands for Python's
# isinstance(x, list): a sequence that is neither a string nor a mapping.
_JSON = "| tojson(separators=(',', ':'))"
_IS_LIST = "{0} is sequence and {0} is not string and {0} is not mapping"
_SIGNATURE_MACROS = (
    "{% macro key(k, required) %}{{ k }}{% if k not in required %}?{% endif %}: {% endmacro %}"
    "{% macro type_text(spec) %}"
    "{% if spec is not mapping %}{{ spec " + _JSON + " }}"
    "{% elif " + _IS_LIST.format("spec.get('enum')") + " and spec['enum'] | length > 0 %}"
    "{% for v in spec['enum'] %}{% if not loop.first %}|{% endif %}{{ v "
    + _JSON
    + " }}{% endfor %}"
    "{% elif " + _IS_LIST.format("spec.get('type')") + " and spec['type'] | length > 0"
    " and spec['type'] | reject('string') | list | length == 0 %}{{ spec['type'] | join('|') }}"
    "{% elif spec.get('type') == 'array' %}"
    "{% set inner = type_text(spec['items']) if spec.get('items') is mapping else 'any' %}"
    "{% if '|' in inner %}({{ inner }})[]{% else %}{{ inner }}[]{% endif %}"
    "{% elif spec.get('type') == 'object' and spec.get('properties') is mapping"
    " and spec['properties'] | length > 0 %}"
    "{% set required = spec.get('required') if "
    + _IS_LIST.format("spec.get('required')")
    + " else [] %}"
    "{{ '{' }}{% for k, v in spec['properties'].items() %}{% if not loop.first %}, {% endif %}"
    "{{ key(k, required) }}{{ type_text(v) }}{% endfor %}{{ '}' }}"
    "{% elif spec.get('type') is string %}{{ spec['type'] }}"
    "{% else %}{{ spec " + _JSON + " }}{% endif %}"
    "{% endmacro %}"
    "{% macro comment(spec) %}"
    "{% if spec is mapping and spec.get('description') is string and spec['description'] %}"
    " /*{{ spec['description'] }}*/{% endif %}"
    "{% endmacro %}"
    "{% macro tool_line(tool) %}"
    "{% set fn = tool['function'] if tool.get('function') is mapping else tool %}"
    "{% set params = fn.get('parameters') %}"
    "{{ fn.get('name') }}("
    "{% if params is mapping and params.get('properties', {}) is mapping %}"
    "{% set required = params.get('required') if "
    + _IS_LIST.format("params.get('required')")
    + " else [] %}"
    "{% for k, v in params.get('properties', {}).items() %}{% if not loop.first %}, {% endif %}"
    "{{ key(k, required) }}{{ type_text(v) }}{{ comment(v) }}{% endfor %}"
    "{% elif params is not none %}{{ params " + _JSON + " }}{% endif %})"
    "{% if fn.get('description') is string and fn['description'] %}: {{ fn['description'] }}{% endif %}"
    "{% endmacro %}"
)

# Tools first in the system turn (tool_calls.with_tools), the first system message after them.
_TOOLS_BLOCK = (
    "{% if tools %}"
    "{{ " + _lit(ROLE_TOKENS["system"] + TOOLS_INTRO + TOOLS_START) + " }}"
    "{% for tool in tools %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ tool_line(tool) }}{% endfor %}"
    "{{ " + _lit(TOOLS_END) + " }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ '\\n' }}{{ content(messages[0]['content']) }}{% endif %}"
    "{{ " + _lit(END_OF_TURN) + " }}"
    "{% endif %}"
)

# An assistant message's tool_calls (tool_calls.tool_call_text), OpenAI's shape or bare.
_TOOL_CALLS = (
    "{% for tool_call in message['tool_calls'] or [] %}"
    "{% set call = tool_call['function'] if tool_call['function'] is defined else tool_call %}"
    "{{ " + _lit(TOOL_CALL_START + '{"name":') + " }}{{ call['name'] | tojson }}"
    "{{ " + _lit(',"arguments":') + " }}"
    "{% if call['arguments'] is string %}{{ call['arguments'] }}"
    "{% else %}{{ call['arguments'] | tojson(separators=(',', ':')) }}{% endif %}"
    "{{ " + _lit("}" + TOOL_CALL_END) + " }}"
    "{% endfor %}"
)

JINJA_CHAT_TEMPLATE = (
    _CONTENT_MACRO
    + _SIGNATURE_MACROS
    + "{{ bos_token }}"
    + _TOOLS_BLOCK
    + "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('visto chat roles are system, user, assistant and tool, got ' + message['role']) }}"
    "{% endif %}"
    "{% if message['role'] == 'tool' %}"
    "{{ " + _lit(ROLE_TOKENS["user"] + TOOL_RESPONSE_START) + " }}"
    "{{ content(message['content']) }}"
    "{{ " + _lit(TOOL_RESPONSE_END) + " }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' }}{{ content(message['content']) }}"
    "{% if message['role'] == 'assistant' %}" + _TOOL_CALLS + "{% endif %}"
    "{% endif %}"
    "{{ " + _lit(END_OF_TURN) + " }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ " + _lit(ROLE_TOKENS["assistant"]) + " }}{% endif %}"
)

# The Jinja template spells role markers as '<|' + role + '|>'; keep the Python side in step.
assert all(marker == f"<|{role}|>" for role, marker in ROLE_TOKENS.items())
