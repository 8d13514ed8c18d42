"""`Sample`: the one schema every data source produces and every consumer reads.

A sample is a conversation about zero or more images:

    Sample(id="0001",
           images=[<PIL.Image RGB>],
           turns=[Turn("user", "<image>\\nHow many circles?"), Turn("assistant", "2")],
           truth={...})                     # optional ground truth (synthetic world, COCO boxes)

Image placement follows the LLaVA convention: the literal string `IMAGE_PLACEHOLDER`
("<image>") in a turn's text marks where image i goes, in order. If a sample carries images
but no placeholders, `normalized()` puts them all at the start of the first user turn.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")


@dataclass
class Turn:
    role: str  # one of ROLES
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"turn role must be one of {ROLES}, got {self.role!r}")


def exchanges(qas: list[tuple[str, str]]) -> list[Turn]:
    """(question, answer) pairs -> user and assistant turns, in order."""
    return [Turn(role, text) for q, a in qas for role, text in (("user", q), ("assistant", a))]


def with_image(turns: list[Turn]) -> list[Turn]:
    """The turns with the image placeholder leading the first (user) turn: one image per
    conversation, asked about in its first question."""
    if not turns:
        return turns
    return [Turn(turns[0].role, f"{IMAGE_PLACEHOLDER}\n{turns[0].content}"), *turns[1:]]


@dataclass
class Sample:
    id: str
    images: list[Image.Image] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    # Ground truth where the source has it: for the synthetic world
    # {"width", "height", "objects": [{"shape","colour","size","box"}...], "texts": [...],
    #  "label", "split", "task", ...}. Boxes in pixels (x1, y1, x2, y2) of images[0].
    truth: dict[str, Any] | None = None
    source: str = ""
    # Training only: each user/assistant exchange is a separate question about the same
    # images, asked as the first one is (the later user turns get the first turn's leading
    # image text). The processor encodes the images once and hides the exchanges from each
    # other (`Encoded.segment_ids`): many answers per image, none readable from another.
    independent_turns: bool = False

    def num_placeholders(self) -> int:
        return sum(t.content.count(IMAGE_PLACEHOLDER) for t in self.turns)

    def normalized(self) -> Sample:
        """A copy whose placeholders match its images one to one, or a ValueError saying why not."""
        n = self.num_placeholders()
        if n == len(self.images):
            return self
        if n == 0 and self.images:
            turns = list(self.turns)
            first_user = next((i for i, t in enumerate(turns) if t.role == "user"), None)
            prefix = (IMAGE_PLACEHOLDER + "\n") * len(self.images)
            if first_user is None:
                turns.insert(0, Turn("user", prefix.rstrip("\n")))
            else:
                turns[first_user] = Turn("user", prefix + turns[first_user].content)
            return dataclasses.replace(self, turns=turns)
        raise ValueError(
            f"sample {self.id!r} has {len(self.images)} image(s) but {n} "
            f"{IMAGE_PLACEHOLDER!r} placeholder(s) in its turns; they must match"
        )

    def to_json(self) -> dict[str, Any]:
        """Everything but the pixels, as JSON-able values."""
        return {
            "id": self.id,
            "turns": [{"role": t.role, "content": t.content} for t in self.turns],
            "truth": self.truth,
            "source": self.source,
        }


def image_to_png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


def samples_equal(a: Sample, b: Sample) -> bool:
    """Same id, turns, truth and pixels (used by round-trip tests of every format)."""
    return (
        a.id == b.id
        and a.turns == b.turns
        and a.truth == b.truth
        and len(a.images) == len(b.images)
        and all(same_pixels(x, y) for x, y in zip(a.images, b.images, strict=True))
    )
