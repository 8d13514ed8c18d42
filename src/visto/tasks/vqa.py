"""Visual question answering: a question in, a short answer out."""

from __future__ import annotations

from visto.data.sample import Turn
from visto.errors import UserError
from visto.tasks.common import first_line, user_turns


def build_prompt(question: str) -> list[Turn]:
    question = question.strip()
    if not question:
        raise UserError("the question is empty; ask something about the image")
    return user_turns(question)


def parse(answer: str, image_size: tuple[int, int] | None = None) -> str:
    """The short answer: the first line, without a trailing period ("Yes." -> "Yes").
    Metrics normalize further (`visto.eval.metrics.normalize_vqa_answer`)."""
    return first_line(answer).rstrip(".").strip()
