"""Grounding: a referring expression in, the box of the object it names out.

Answers hold boxes as the processor writes them (`visto.data.tokenizer.format_box`: four
location tokens `<loc_k>`) or as plain "[x1, y1, x2, y2]" 0..999 lists (the synthetic
world's answers, and what a model that writes numbers says); `parse` reads both.
"""

from __future__ import annotations

from visto.data.sample import Turn
from visto.data.tokenizer import DEFAULT_LOC_BINS, parse_boxes
from visto.errors import UserError
from visto.tasks.common import Box, ImageSize, user_turns


def build_prompt(expression: str) -> list[Turn]:
    """Expression "red circle" -> "Where is the red circle?" (the world's phrasing; a leading article
    in the expression is dropped so it does not double)."""
    words = expression.strip().rstrip("?.").split()
    if words and words[0].lower() in ("the", "a", "an"):
        words = words[1:]
    if not words:
        raise UserError("the referring expression is empty; name the object, e.g. 'red circle'")
    return user_turns(f"Where is the {' '.join(words)}?")


def parse(
    answer: str, image_size: ImageSize | None = None, loc_bins: int = DEFAULT_LOC_BINS
) -> list[Box]:
    """Every box in the answer, in order (the first is the answer to a grounding prompt),
    as 0..999 ints and, given the image size (width, height), as pixels."""
    return [Box.from_norm(b, image_size) for b in parse_boxes(answer, loc_bins)]
