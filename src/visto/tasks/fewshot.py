"""Few-shot in-context prompts: demonstrations first, then the query (Flamingo, Alayrac et
al. 2022, §3: interleaved image-text sequences; each demo is an image, a question and its
answer, and the model continues the pattern on the last image)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from visto.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
from visto.errors import UserError

Demo = tuple[Image.Image, str, str]  # (image, question, answer)


def few_shot(demos: Sequence[Demo], query: tuple[Image.Image, str], id: str = "few-shot") -> Sample:
    """A multi-image conversation: for each demo a user turn (its image and question) and an
    assistant turn (its answer), then the query's user turn; the model answers next."""
    images: list[Image.Image] = []
    turns: list[Turn] = []
    for k, demo in enumerate(demos):
        if len(demo) != 3:
            raise UserError(f"demo {k} must be (image, question, answer), got {len(demo)} items")
        image, question, answer = demo
        images.append(image)
        turns += [Turn("user", f"{IMAGE_PLACEHOLDER}\n{question}"), Turn("assistant", answer)]
    image, question = query
    images.append(image)
    turns.append(Turn("user", f"{IMAGE_PLACEHOLDER}\n{question}"))
    return Sample(id=id, images=images, turns=turns)
