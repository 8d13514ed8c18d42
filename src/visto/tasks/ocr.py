"""OCR: read every text in the image, in reading order."""

from __future__ import annotations

from visto.data.sample import Turn
from visto.tasks.common import user_turns
from visto.tasks.parsers import normalize_ocr

PROMPT = "Read all the text in the image."  # one of the synthetic world's OCR prompts


def build_prompt() -> list[Turn]:
    return user_turns(PROMPT)


def parse(answer: str, image_size: tuple[int, int] | None = None) -> str:
    """The text read, whitespace runs collapsed (case and punctuation are the reading)."""
    return normalize_ocr(answer)
