"""Contact sheets: a PNG grid of images with a few lines of text under each.

`visto data show` (the synthetic world, with masks and boxes) and `visto data inspect --show`
(any dataset: a sample's first image and its turns) both lay their cells out here.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from visto.data.sample import IMAGE_PLACEHOLDER, Sample
from visto.data.synth.vocab import load_font

PANEL = 224  # pixels per image panel
LINE_HEIGHT = 15
GAP = 6


def wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels as measured with `font`."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def grid(cells: Sequence[Image.Image], cols: int = 3) -> Image.Image:
    """The cells (all of one size) in rows of `cols`, on a grey ground."""
    assert cells, "a grid needs at least one cell"
    cols = min(cols, len(cells))
    rows = (len(cells) + cols - 1) // cols
    w, h = cells[0].size
    sheet = Image.new("RGB", (cols * (w + GAP) + GAP, rows * (h + GAP) + GAP), (200, 200, 200))
    for k, cell in enumerate(cells):
        sheet.paste(cell, (GAP + (k % cols) * (w + GAP), GAP + (k // cols) * (h + GAP)))
    return sheet


def sample_cell(sample: Sample, title: str, lines: int = 5) -> Image.Image:
    """A sample's first image fitted into the panel (aspect kept), `title` and its first
    exchange under it; a text-only sample gets a blank panel."""
    cell = Image.new("RGB", (PANEL, PANEL + LINE_HEIGHT * lines + 8), (255, 255, 255))
    if sample.images:
        image = sample.images[0].copy()
        image.thumbnail((PANEL, PANEL))  # keeps the aspect ratio; never enlarges
        if max(image.size) < PANEL // 2:  # tiny images are enlarged to be seen, pixel-sharp
            scale = (PANEL // 2) // max(image.size)
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        cell.paste(image, ((PANEL - image.width) // 2, (PANEL - image.height) // 2))
    draw = ImageDraw.Draw(cell)
    font = load_font("sans", 12)
    text = [title]
    user = next((t.content for t in sample.turns if t.role == "user"), "")
    answer = next((t.content for t in sample.turns if t.role == "assistant"), "")
    text.append("Q: " + " ".join(user.replace(IMAGE_PLACEHOLDER, "").split()))
    text.append("A: " + " ".join(answer.split()))
    wrapped = [line for paragraph in text for line in wrap(paragraph, font, PANEL - 8)]
    for k, line in enumerate(wrapped[:lines]):
        draw.text((4, PANEL + 4 + LINE_HEIGHT * k), line, font=font, fill=(0, 0, 0))
    return cell
