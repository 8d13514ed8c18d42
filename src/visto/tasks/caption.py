"""Captioning: "Describe this image." -> one caption."""

from __future__ import annotations

from visto.data.sample import Turn
from visto.tasks.common import user_turns

# The synthetic world's caption prompts (visto.data.synth.reader.record_items).
PROMPTS = (
    "Describe this image.",
    "Write a caption for this image.",
    "What do you see in this picture?",
)


def build_prompt(style: int = 0) -> list[Turn]:
    return user_turns(PROMPTS[style % len(PROMPTS)])


def parse(answer: str, image_size: tuple[int, int] | None = None) -> str:
    """The caption: the answer with whitespace runs collapsed."""
    return " ".join(answer.split())
