"""A text reader for the object-token connector: find each line of text, read it with CTC.

The vision tower sees a 128 px image in 16 px patches; a character is smaller than a patch, so
its features barely carry what is written (the dense pretraining's per-patch character head
reads 0.18). Systems that answer questions about text feed the words an OCR system read as
tokens of their own (M4C, Hu et al. 2020; LaTr, Biten et al. 2022). This is that OCR system,
small enough to train in the quickstart from the world's text boxes:

    pixel values (B, 3, S, S), normalised as the vision tower gets them
      -> `find`: a small dilated CNN at stride 2, per-cell "text core here" logits (B, S/2, S/2)
         (the core is the line's box shrunk, as PSENet / DBNet shrink their kernels: lines
         2 px apart have cores 3 cells apart, so they never merge)
      -> connected components of cells above 0.5, grown back by the shrink -> one box per line
      -> reading order (top to bottom, a line left to right, as the world's OCR answers)
      -> each box cropped, resized to CROP_H high (aspect kept, padded to CROP_W)
      -> `read`: CRNN (Shi et al. 2015): CNN -> bidirectional GRU -> per-column characters,
         CTC greedy decoding                                             -> "EXIT", "9658"

The connector turns the strings into the decoder's own token embeddings (see
`visto.connectors.regions`), so an OCR answer is a copy. Characters are the world's: upper-case
letters and digits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"  # CTC class k + 1; class 0 is the blank
CROP_H, CROP_W = 16, 96  # a line is read at 16 px high, up to 6 times as wide
FIND_STRIDE = 2  # `find` works on a grid of 2 x 2 px cells: lines 4 px apart stay apart
MIN_CELLS = 4  # a component smaller than this is noise, not a line of text
PAD = 2  # px added around a found box before reading: the cells cut glyph edges
SHRINK_X = 2  # px taken off each side of a line's box for its core
SHRINK_Y = 0.25  # of the line's height taken off the top and the bottom for its core


def text_core(box: list[int] | tuple[int, ...]) -> tuple[float, float, float, float]:
    """A line's pixel box -> its core: SHRINK_X px in from the sides, SHRINK_Y of the height
    in from the top and the bottom (what `find` learns to mark)."""
    x1, y1, x2, y2 = box
    dy = SHRINK_Y * (y2 - y1)
    return x1 + SHRINK_X, y1 + dy, max(x2 - SHRINK_X, x1 + SHRINK_X + 1), max(y2 - dy, y1 + dy + 1)


def grow_core(core: tuple[float, float, float, float]) -> list[float]:
    """The inverse of `text_core` (a core is half its line's height), plus PAD."""
    x1, y1, x2, y2 = core
    dy = (y2 - y1) * SHRINK_Y / (1 - 2 * SHRINK_Y)
    return [x1 - SHRINK_X - PAD, y1 - dy - PAD, x2 + SHRINK_X + PAD, y2 + dy + PAD]


def conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation)


class TextReader(nn.Module):
    """Finds and reads the lines of text in an image; see the module doc."""

    def __init__(self, frozen: bool = False) -> None:
        super().__init__()
        # Inside a connector the reader is a fixed expert: it stays in eval mode (BatchNorm's
        # running statistics) when the model around it trains.
        self.frozen = frozen
        # Dilations widen the view to ~30 px so a glyph is told from a shape's corner.
        self.find = nn.Sequential(
            conv(3, 16, stride=FIND_STRIDE), nn.GELU(), conv(16, 16), nn.GELU(),
            conv(16, 16, dilation=2), nn.GELU(), conv(16, 16, dilation=4), nn.GELU(),
            nn.Conv2d(16, 1, 1),
        )  # fmt: skip
        # BatchNorm: without it CTC sat on its all-blank plateau twice as long (measured:
        # loss 3.3 at 400 steps without, 0.33 with; GroupNorm as slow as none).
        self.read_features = nn.Sequential(
            conv(3, 32), nn.BatchNorm2d(32), nn.GELU(), nn.MaxPool2d(2),  # (16, 96) -> (8, 48)
            conv(32, 64), nn.BatchNorm2d(64), nn.GELU(), nn.MaxPool2d((2, 1)),  # -> (4, 48)
            conv(64, 96), nn.BatchNorm2d(96), nn.GELU(), nn.MaxPool2d((4, 1)),  # -> (1, 48)
        )  # fmt: skip
        self.sequence = nn.GRU(96, 64, batch_first=True, bidirectional=True)
        self.classify = nn.Linear(128, 1 + len(CHARS))

    def train(self, mode: bool = True) -> TextReader:
        return super().train(mode and not self.frozen)

    # -- finding lines

    def text_logits(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, S / FIND_STRIDE, S / FIND_STRIDE) "text here" logits."""
        return self.find(pixels).squeeze(1)

    @torch.no_grad()
    def find_boxes(self, pixels: Tensor) -> list[list[list[int]]]:
        """(B, 3, S, S) -> per image, pixel boxes [x1, y1, x2, y2] of its lines in reading order."""
        from visto.data.synth.tasks import reading_order

        masks = (self.text_logits(pixels) > 0).cpu().numpy()
        size = pixels.shape[-1]
        out = []
        for mask in masks:
            labels, n = ndimage.label(mask)
            boxes = []
            for k, found in enumerate(ndimage.find_objects(labels), start=1):
                if found is None or (labels[found] == k).sum() < MIN_CELLS:
                    continue
                ys, xs = found
                core = (xs.start * FIND_STRIDE, ys.start * FIND_STRIDE,
                        xs.stop * FIND_STRIDE, ys.stop * FIND_STRIDE)  # fmt: skip
                box = [min(max(round(v), 0), size) for v in grow_core(core)]
                boxes.append({"box": box})
            out.append([b["box"] for b in reading_order(boxes)])
        return out

    # -- reading a line

    def read_logits(self, crops: Tensor) -> Tensor:
        """(L, 3, CROP_H, CROP_W) -> (L, CROP_W / 2, 1 + len(CHARS)) per-column logits."""
        columns = self.read_features(crops).squeeze(2).transpose(1, 2)  # (L, W', 96)
        return self.classify(self.sequence(columns)[0])

    def read(self, crops: Tensor) -> list[str]:
        """(L, 3, CROP_H, CROP_W) -> the strings, by greedy CTC decoding."""
        if crops.shape[0] == 0:
            return []
        with torch.no_grad():
            best = self.read_logits(crops).argmax(-1).cpu().numpy()  # (L, W')
        return [ctc_greedy(row) for row in best]

    def forward(self, pixels: Tensor) -> list[list[tuple[str, list[int]]]]:
        """(B, 3, S, S) -> per image, (text, pixel box) of each line read, in reading order."""
        boxes = self.find_boxes(pixels)
        flat = [(i, box) for i, image_boxes in enumerate(boxes) for box in image_boxes]
        crops = (
            torch.stack([crop_line(pixels[i], box) for i, box in flat])
            if flat
            else pixels.new_zeros(0)
        )
        texts = self.read(crops)
        out: list[list[tuple[str, list[int]]]] = [[] for _ in boxes]
        for (i, box), text in zip(flat, texts, strict=True):
            if text:
                out[i].append((text, box))
        return out


def crop_line(image: Tensor, box: list[int] | tuple[int, ...]) -> Tensor:
    """(3, S, S) and a pixel box -> (3, CROP_H, CROP_W): the line at CROP_H px high, its aspect
    kept, zero-padded on the right (zero is mid-grey in the normalised pixels)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
    patch = image[:, y1:y2, x1:x2][None]  # (1, 3, h, w)
    width = min(CROP_W, max(1, round(patch.shape[-1] * CROP_H / patch.shape[-2])))
    line = F.interpolate(patch, size=(CROP_H, width), mode="bilinear", align_corners=False)[0]
    return F.pad(line, (0, CROP_W - width))


def ctc_greedy(best: np.ndarray) -> str:
    """Per-column argmax classes -> text: repeats collapse, blanks (0) drop."""
    chars, previous = [], 0
    for k in best.tolist():
        if k != previous and k != 0:
            chars.append(CHARS[k - 1])
        previous = k
    return "".join(chars)


def encode_text(text: str) -> list[int]:
    """A string -> its CTC targets (class k + 1 for CHARS[k]); other characters are dropped."""
    return [CHARS.index(c) + 1 for c in text.upper() if c in CHARS]


__all__ = ["CHARS", "CROP_H", "CROP_W", "TextReader", "crop_line", "ctc_greedy", "encode_text"]
