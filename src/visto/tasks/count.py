"""Counting: "How many circles are there?" -> an integer."""

from __future__ import annotations

from visto.data.sample import Turn
from visto.errors import UserError
from visto.tasks.common import user_turns
from visto.tasks.parsers import parse_count


def build_prompt(things: str) -> list[Turn]:
    """`things` is the plural the user would say ("circles", "red objects"); the phrasing is
    the synthetic world's ("How many {things} are there?")."""
    things = things.strip()
    if not things:
        raise UserError("say what to count, e.g. 'circles' or 'red objects'")
    return user_turns(f"How many {things} are there?")


def parse(answer: str, image_size: tuple[int, int] | None = None) -> int | None:
    """The first integer or number word of the answer ("3", "three", "no circles" -> 0);
    None when the answer holds no number."""
    return parse_count(answer)
