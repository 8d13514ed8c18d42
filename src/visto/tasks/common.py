"""What every task shares: the user turn that carries the image, and box geometry.

Boxes follow DESIGN.md: (x1, y1, x2, y2) as ints 0..999 of the image's width and height, and
pixel coordinates where the image size is known. The map is the synthetic world's
(`visto.data.synth.tasks.normalize_box`: v * 999 / side, rounded) and its inverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from visto.data.sample import IMAGE_PLACEHOLDER, Turn

ImageSize = tuple[int, int]  # (width, height), as PIL's Image.size
NORM_MAX = 999


def user_turns(text: str, num_images: int = 1) -> list[Turn]:
    """One user turn: `num_images` image placeholders, each on its own line, then the text
    (the layout of the synthetic world's samples: "<image>\\nHow many circles are there?")."""
    return [Turn("user", f"{IMAGE_PLACEHOLDER}\n" * num_images + text)]


def first_line(text: str) -> str:
    """The answer's first non-empty line, trimmed (short-answer tasks ignore any rambling)."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def norm_to_pixels(box: Sequence[int], size: ImageSize) -> list[int]:
    """A 0..999 box -> pixel box of an image of `size` (width, height)."""
    width, height = size
    sx, sy = width / NORM_MAX, height / NORM_MAX
    return [round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)]


def pixels_to_norm(box: Sequence[float], size: ImageSize) -> list[int]:
    """A pixel box -> 0..999 ints, clamped to the range."""
    width, height = size
    sx, sy = NORM_MAX / width, NORM_MAX / height
    scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return [min(NORM_MAX, max(0, round(v))) for v in scaled]


@dataclass
class Box:
    """One box read from an answer: 0..999 ints, pixels when the image size was given, and
    the label the answer gave it (detection), if any."""

    norm: list[int]
    pixels: list[int] | None = None
    label: str | None = None

    @classmethod
    def from_norm(
        cls, norm: Sequence[int], size: ImageSize | None, label: str | None = None
    ) -> Box:
        norm = [int(v) for v in norm]
        assert len(norm) == 4, f"a box has 4 coordinates, got {norm}"
        return cls(norm, norm_to_pixels(norm, size) if size else None, label)

    def to_json(self) -> dict:
        out: dict = {"box": self.norm}
        if self.pixels is not None:
            out["box_pixels"] = self.pixels
        if self.label is not None:
            out["label"] = self.label
        return out
