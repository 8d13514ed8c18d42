"""Reading text on any image: PP-OCRv4 detection + recognition (Baidu's PaddleOCR models, run by
`rapidocr-onnxruntime`, whose wheel carries the ONNX weights, so it works offline).

    words = read_words(image)   # [Word(text="SALE", confidence=0.99, pixels=[12, 34, 50, 71],
                                #       box=[30, 283, 125, 591]), ...] in reading order
    ocr_tool.run(image)         # {"text": "SALE 50% OFF", "words": [{"text", "box", ...}]}

The recognizer reads a detected line at a time and gives a box per character; words are the
runs of characters between spaces, their box the union of their characters'. Small images
are enlarged before reading, and words of symbols alone (a drawn cross read as "+") dropped. Boxes follow
visto's convention: `box` in 0..999 of the image, `pixels` in its pixels, both (x1, y1, x2, y2).

`ocr_tool` runs in a process of its own (visto.tools.registry, Tool.process), which loads the
engine when it starts (`warm_ocr`, where `tools.start()` starts it ahead of the first call) or
on its first call, and keeps it: a call that runs past the tool's timeout inside the
engine (native code, which no thread can interrupt) has that process killed, and the next call
gets a fresh one instead of waiting on the engine's lock. `read_lines` and `read_words` read in
the caller's process.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from visto.data.tool_calls import OCR_DESCRIPTION, OCR_PARAMETERS
from visto.errors import UserError
from visto.tools.registry import Tool

# Detected boxes grown 2.5x their outline (PP-OCR's default is 1.6): tight line crops made the
# recognizer drop the spaces between words ("SALE50%OFF") on rendered labels.
UNCLIP_RATIO = 2.5
# Small images are enlarged (bicubic) by the largest whole factor that keeps their shorter
# side within this, before reading: the recognizer reads each line crop resized to 48 px
# high, and a 15-px label cut from a 128-px image came out merged with its neighbour ("22CAT"
# for "22" and "CAT") or a shape's corner read as a letter (bench/ocr_world.py: 1x -> 3x on
# the world). Images of 192 px and more are read as they are: a 200-px label enlarged 2x lost
# its spaces ("NETWT12OZ").
MIN_SIDE = 384
# ... and never past this long side: RapidOCR shrinks any image to 2,000 px on its long side
# first, so more only costs memory (a 1 x 3,000 strip enlarged 384x took 1.7 GB and a minute).
MAX_ENLARGED_SIDE = 8192
# Longer sides than this many times the shorter one are refused with a clear error: shrunk to
# 2,000 px long, the short side rounds to 0 in RapidOCR (which raised an empty ResizeImgError).
MAX_ASPECT = 100
_engine: Any = None
_engine_lock = threading.Lock()  # one engine per process, loaded once, one image at a time


@dataclass(frozen=True)
class Word:
    text: str
    confidence: float
    pixels: list[int]  # x1, y1, x2, y2 in image pixels
    box: list[int]  # the same in 0..999


def _ocr_engine() -> Any:
    global _engine
    if _engine is None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError:
            raise UserError("the OCR tool needs rapidocr-onnxruntime: "
                            "pip install rapidocr-onnxruntime") from None  # fmt: skip
        _engine = RapidOCR()
    return _engine


def _bounds(quads: list[Any], width: int, height: int) -> tuple[list[int], list[int]]:
    """(pixels, 0..999 box) of the axis-aligned box around some quadrilaterals."""
    points = np.asarray(quads, dtype=float).reshape(-1, 2)
    x1, y1 = points.min(axis=0)
    x2, y2 = points.max(axis=0)
    pixels = [int(np.clip(round(v), 0, side)) for v, side in
              ((x1, width), (y1, height), (x2, width), (y2, height))]  # fmt: skip
    box = [min(999, pixels[i] * 1000 // (width if i % 2 == 0 else height)) for i in range(4)]
    return pixels, box


def _line_words(line: list[Any], width: int, height: int) -> list[Word]:
    """The words of one recognized line: [quad, text, confidence, char quads, chars, confs]."""
    quad, text, confidence = line[0], line[1], float(line[2])
    pieces = line[4] if len(line) > 5 else []
    if not pieces or len(pieces) != len(line[3]) or len(pieces) != len(line[5]):
        # no per-character boxes: the line is one word per space-separated run, on the line box
        pixels, box = _bounds(quad, width, height)
        return [Word(t, round(confidence, 4), pixels, box) for t in text.split()]
    words, run = [], []
    for piece, piece_quad, piece_conf in [
        *zip(pieces, line[3], line[5], strict=True),
        (" ", None, 0.0),
    ]:
        if piece.strip():
            run.append((piece, piece_quad, float(piece_conf)))
            continue
        if run:
            pixels, box = _bounds([q for _, q, _ in run], width, height)
            conf = sum(c for _, _, c in run) / len(run)
            words.append(Word("".join(p for p, _, _ in run), round(conf, 4), pixels, box))
            run = []
    return words


def is_text(word: str) -> bool:
    """A word holds at least one letter or digit. The detector also finds text-like strokes
    in drawings (a cross read as "+", a star as "★", two crosses as "++"); runs of symbols
    alone are dropped, symbols inside words ("50%", "C++") kept."""
    return any(ch.isalnum() for ch in word)


def read_lines(image: Image.Image, min_side: int = MIN_SIDE,
               symbols: bool = False) -> list[list[Word]]:  # fmt: skip
    """The text on `image`, line by line (top to bottom), each line its words; boxes in the
    image's own pixels. `min_side`: enlarge small images by min_side // their shorter side
    (0: never); `symbols`: keep words made of symbols only."""
    image = image.convert("RGB")
    width, height = image.size
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise UserError(f"the image is {width} x {height} pixels, too thin to read text in: OCR "
                        f"reads images up to {MAX_ASPECT}:1; crop or pad it")  # fmt: skip
    scale = max(1, min(min_side // max(1, min(width, height)),
                       MAX_ENLARGED_SIDE // max(width, height)))  # fmt: skip
    if scale > 1:
        image = image.resize((width * scale, height * scale), Image.BICUBIC)
    array = np.asarray(image)[:, :, ::-1]  # RapidOCR reads OpenCV's BGR order
    with _engine_lock:
        result, _ = _ocr_engine()(array, return_word_box=True, unclip_ratio=UNCLIP_RATIO)
    lines = []
    for line in result or []:
        if scale > 1:  # quads back to the caller's pixels
            line = [np.asarray(line[0], float) / scale, line[1], line[2],
                    *([[np.asarray(q, float) / scale for q in line[3]]] if len(line) > 3 else []),
                    *line[4:]]  # fmt: skip
        words = [w for w in _line_words(line, width, height) if symbols or is_text(w.text)]
        if words:
            lines.append(words)
    return lines


def read_words(image: Image.Image) -> list[Word]:
    return [word for line in read_lines(image) for word in line]


def run_ocr(image: Image.Image, detail: str = "words") -> dict[str, Any]:
    """The OCR tool: the text (lines joined by newlines) and, with detail "words", each word."""
    lines = read_lines(image)
    out: dict[str, Any] = {"text": "\n".join(" ".join(w.text for w in line) for line in lines)}
    if detail == "words":
        out["words"] = [asdict(w) for line in lines for w in line]
    return out


def warm_ocr() -> None:
    """The OCR tool's warm-up in its process: load the engine and read a small blank image
    (the ONNX sessions' first run), so that the first call finds it ready."""
    read_lines(Image.new("RGB", (32, 32), "white"))


ocr_tool = Tool(name="ocr", description=OCR_DESCRIPTION, run=run_ocr, parameters=OCR_PARAMETERS,
                process="ocr", warm=warm_ocr)  # fmt: skip
