"""The world's vocabulary: shapes, colours, sizes, words, fonts, and the held-out pairs.

Everything here is fixed data, so two worlds generated with different seeds still share the
same vocabulary and the same held-out colour-shape pairs (train on one, test on another).
"""

from __future__ import annotations

import functools
from pathlib import Path

from PIL import ImageFont

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross")
SHAPE_PLURALS: dict[str, str] = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}

# Saturated, well separated in RGB and in name; the backgrounds are light and the text dark,
# so every colour stays visible on every background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 0),
    "yellow": (235, 200, 0),
    "green": (30, 155, 50),
    "cyan": (0, 185, 205),
    "blue": (30, 60, 215),
    "purple": (135, 45, 185),
    "pink": (240, 110, 185),
}

# Object diameter as a fraction of the image side; each object gets +-6% jitter around it,
# so the three classes never overlap and "size" is a well-defined attribute.
SIZES: dict[str, float] = {"small": 0.16, "medium": 0.24, "large": 0.34}
SIZE_JITTER = 0.06

# Short, common words; none is a colour or shape name, so reading never mixes with seeing.
WORDS: tuple[str, ...] = (
    "CAT", "DOG", "SUN", "MAP", "BOX", "JAM", "STOP", "GO", "HELLO", "OPEN", "EXIT", "BUS",
    "TEA", "KEY", "CAR", "SHOP", "BOOK", "MILK", "FISH", "TREE", "PARK", "CODE", "DATA", "FROG",
    "MOON", "HAT", "WAVE", "LAMP", "DOOR", "ROAD",
)  # fmt: skip

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS: dict[str, str] = {
    "sans": "DejaVuSans.ttf",
    "sans-bold": "DejaVuSans-Bold.ttf",
    "serif": "DejaVuSerif.ttf",
    "mono": "DejaVuSansMono.ttf",
}


@functools.lru_cache(maxsize=64)
def load_font(name: str, px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The named font at `px` pixels; Pillow's built-in font when DejaVu is not installed."""
    path = FONT_DIR / FONTS[name]
    if path.exists():
        return ImageFont.truetype(str(path), px)
    return ImageFont.load_default(size=px)


def fonts_available() -> bool:
    return all((FONT_DIR / f).exists() for f in FONTS.values())


def heldout_pairs() -> list[tuple[str, str]]:
    """7 of the 56 (colour, shape) pairs (12.5%), never shown in train/val/test.

    Shape i is held out in colour (3i + 1) mod 8: each shape loses exactly one colour and
    seven different colours lose one shape each, so every shape and every colour is still
    seen in training, only never in that combination (compositional generalization).
    """
    colours = list(COLOURS)
    return [(colours[(3 * i + 1) % len(colours)], shape) for i, shape in enumerate(SHAPES)]


def describe(obj: dict, with_size: bool = True) -> str:
    """'large red circle' (or 'red circle'): the canonical words for one object."""
    words = ([obj["size"]] if with_size else []) + [obj["colour"], obj["shape"]]
    return " ".join(words)


def with_article(phrase: str) -> str:
    """'a red circle', 'an orange star'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def plural(shape: str, n: int) -> str:
    return shape if n == 1 else SHAPE_PLURALS[shape]


NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)
