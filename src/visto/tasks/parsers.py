"""The readers of free answers that several tasks and the metrics share: a count, OCR text,
a JSON value. Each task's `parse` is built on these, and `visto.eval.metrics` scores what
they read, so an answer is read the same way when it is asked and when it is scored."""

from __future__ import annotations

import json
import re
from typing import Any

_NUMBER_WORD_VALUES = {
    "no": 0, "none": 0, "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
    "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17,
    "eighteen": 18, "nineteen": 19, "twenty": 20,
}  # fmt: skip
_COUNT_TOKEN = re.compile(r"-?\d+|[a-z]+")


def parse_count(text: str) -> int | None:
    """The first integer or number word in `text` ("There are 3." -> 3, "two" -> 2,
    "no circles" -> 0), or None when there is none. Digits must stand alone ("3rd" is not 3)."""
    for m in _COUNT_TOKEN.finditer(text.lower()):
        token = m.group()
        if token[-1].isdigit():
            end = m.end()
            if end < len(text) and text[end].isalpha():
                continue
            return int(token)
        if token in _NUMBER_WORD_VALUES:
            return _NUMBER_WORD_VALUES[token]
    return None


def normalize_ocr(text: str) -> str:
    """Whitespace runs collapsed to one space and trimmed; case and punctuation kept
    (reading "STOP" as "stop" is a reading error)."""
    return " ".join(text.split())


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_json_answer(text: str) -> tuple[bool, Any]:
    """(valid, value): the answer parsed as JSON, allowing surrounding whitespace and one
    Markdown code fence (```json ... ```); (False, None) when it does not parse."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False, None
