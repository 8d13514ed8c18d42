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
each image part as `<image>`. A test checks that both give the same string.
"""

from __future__ import annotations

from collections.abc import Sequence

from visto.data.sample import IMAGE_PLACEHOLDER, Turn
from visto.data.tokenizer import BOS, END_OF_TURN, ROLE_TOKENS


def render_chat(turns: Sequence[Turn], add_generation_prompt: bool = False) -> str:
    """The conversation as template text (see module docstring)."""
    parts = [BOS]
    for turn in turns:
        parts += [ROLE_TOKENS[turn.role], turn.content, END_OF_TURN]
    if add_generation_prompt:
        parts.append(ROLE_TOKENS["assistant"])
    return "".join(parts)


JINJA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('visto chat roles are system, user and assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}{{ '"
    + IMAGE_PLACEHOLDER
    + "' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '" + END_OF_TURN + "' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ROLE_TOKENS["assistant"] + "' }}{% endif %}"
)

# The Jinja template spells role markers as '<|' + role + '|>'; keep the Python side in step.
assert all(marker == f"<|{role}|>" for role, marker in ROLE_TOKENS.items())
