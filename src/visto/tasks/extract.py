"""Structured extraction: the image described as JSON, optionally following a schema.

Without a schema the prompt is the synthetic world's ("... as JSON with the keys objects,
counts and text."); with one, the schema is spelled out in the prompt, and a constrained
decoder (xgrammar, DESIGN.md) can take the same schema to make the output valid by design.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from visto.data.sample import Turn
from visto.errors import UserError
from visto.tasks.common import user_turns
from visto.tasks.parsers import parse_json_answer

PROMPT = "Describe the image as JSON with the keys objects, counts and text."


def build_prompt(schema: dict | None = None) -> list[Turn]:
    if schema is None:
        return user_turns(PROMPT)
    if not isinstance(schema, dict):
        raise UserError('the JSON schema must be a JSON object, e.g. {"type": "object", ...}')
    return user_turns(
        "Describe the image as JSON that follows this JSON schema: "
        + json.dumps(schema, separators=(",", ":"))
    )


@dataclass
class Extraction:
    valid: bool  # the answer parsed as JSON
    value: Any  # the parsed value (None when not valid)
    text: str  # the answer as the model wrote it


def parse(answer: str, image_size: tuple[int, int] | None = None) -> Extraction:
    valid, value = parse_json_answer(answer)
    return Extraction(valid, value, answer)
