"""visto.tools: the OCR expert (a real model, PP-OCRv4) reads rendered labels on a photo-like
background, words with boxes where they were drawn; the registry takes a user's tool in a few
lines and turns every way a call can go wrong into an {"error": ...} result."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from visto.errors import UserError
from visto.tools import Tool, ToolRegistry, default_registry, load_tools

pytestmark = pytest.mark.timeout(300)


def photo_label(lines: list[tuple[str, int]], size=(480, 200), seed=0):
    """A printed label on a noisy colour-gradient background, and each word's drawn box."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    bg = np.stack([120 + 80 * x / size[0], 160 + 60 * y / size[1], 200 - 50 * x / size[0]], -1)
    bg = np.clip(bg + rng.normal(0, 18, bg.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(bg).filter(ImageFilter.GaussianBlur(1.5))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, size[0] - 20, size[1] - 20), fill=(250, 248, 240),
                   outline=(40, 40, 40), width=3)  # fmt: skip
    boxes, top = {}, 35
    for text, font_size in lines:
        font = ImageFont.load_default(size=font_size)
        left = 40
        for word in text.split(" "):
            boxes[word] = draw.textbbox((left, top), word, font=font)
            draw.text((left, top), word, fill=(20, 20, 30), font=font)
            left = draw.textbbox((left, top), word + " ", font=font)[2]
        top += int(font_size * 1.6)
    return image, boxes


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("lines", [
    [("SALE 50% OFF", 36), ("Best before 2026", 26)],
    [("NET WT 12 OZ", 34), ("Keep refrigerated", 24)],
])  # fmt: skip
def test_ocr_reads_a_printed_label_word_by_word_with_boxes(lines) -> None:
    image, drawn = photo_label(lines)
    result = default_registry().run("ocr", "{}", image)
    assert result.ok, result.output
    assert result.output["text"] == "\n".join(text for text, _ in lines)
    words = result.output["words"]
    assert [w["text"] for w in words] == [w for text, _ in lines for w in text.split()]
    for word in words:
        assert word["confidence"] > 0.8
        assert iou(word["pixels"], drawn[word["text"]]) > 0.4, (word, drawn[word["text"]])
        x1, y1, x2, y2 = word["pixels"]
        assert word["box"] == [x1 * 1000 // 480, y1 * 1000 // 200, x2 * 1000 // 480,
                               y2 * 1000 // 200]  # fmt: skip
    text_only = default_registry().run("ocr", '{"detail":"text"}', image).output
    assert text_only == {"text": result.output["text"]}


def test_ocr_on_images_without_text_or_in_other_modes() -> None:
    tools = default_registry()
    assert tools.run("ocr", {}, Image.new("RGB", (1, 1))).output == {"text": "", "words": []}
    image, _ = photo_label([("HELLO 42", 40)])
    for mode in ("L", "RGBA", "P"):  # any PIL image: converted to RGB first
        assert tools.run("ocr", {}, image.convert(mode)).output["text"] == "HELLO 42"


def small_scene() -> Image.Image:
    """A 128-px image as the synthetic world draws them: a red cross, and two labels 4 px
    apart ("22" in DejaVu Serif, "CAT" in DejaVu Sans Bold)."""
    image = Image.new("RGB", (128, 128), (235, 230, 215))
    draw = ImageDraw.Draw(image)
    (x, y), r, t = (84, 40), 22, 7
    draw.polygon([(x - t, y - r), (x + t, y - r), (x + t, y - t), (x + r, y - t), (x + r, y + t),
                  (x + t, y + t), (x + t, y + r), (x - t, y + r), (x - t, y + t), (x - r, y + t),
                  (x - r, y - t), (x - t, y - t)], fill=(200, 40, 40))  # fmt: skip
    fonts = "/usr/share/fonts/truetype/dejavu/"
    serif = ImageFont.truetype(fonts + "DejaVuSerif.ttf", 20)
    bold = ImageFont.truetype(fonts + "DejaVuSans-Bold.ttf", 20)
    draw.text((10, 95), "22", font=serif, fill=(20, 20, 20))
    draw.text((draw.textbbox((10, 95), "22", font=serif)[2] + 4, 95), "CAT", font=bold,
              fill=(20, 20, 20))  # fmt: skip
    return image


def test_ocr_enlarges_small_images_and_drops_shapes_read_as_symbols() -> None:
    from visto.tools.ocr import is_text, read_lines

    image = small_scene()
    words = lambda lines: [w.text for line in lines for w in line]  # noqa: E731
    # as read before: the cross is a "+", the two labels one word
    assert words(read_lines(image, min_side=0, symbols=True)) == ["+", "22CAT"]
    lines = read_lines(image)  # enlarged 3x, symbols-only runs dropped
    assert words(lines) == ["22", "CAT"]
    # boxes in the caller's pixels, not the enlarged image's
    assert iou(lines[0][0].pixels, [10, 99, 33, 114]) > 0.4, lines[0][0]
    assert max(lines[0][1].pixels) <= 128
    assert not is_text("+") and not is_text("★★") and is_text("50%") and is_text("C++")


def test_ocr_reads_a_real_scanned_page() -> None:
    """scikit-image's data.page(): a photographed book page, unevenly lit (its lower lines
    dark, which PP-OCR's detector misses)."""
    from skimage import data

    from visto.tools.ocr import read_lines

    image = Image.fromarray(data.page())
    lines = [" ".join(w.text for w in line) for line in read_lines(image)]
    assert lines[0] == "Region-based segmentation"
    assert lines[1] == "Let us first determine markers of the coins and the"
    assert "histogram of grey values:" in lines


def test_a_user_adds_a_tool_in_a_few_lines_and_bad_calls_become_error_results() -> None:
    tools = ToolRegistry()

    @tools.tool("brightness", "Mean brightness, 0..255", {"type": "object", "properties": {
        "channel": {"type": "string", "enum": ["L", "R"]}}, "additionalProperties": False})  # fmt: skip
    def brightness(image, channel="L"):
        plane = image.convert("L") if channel == "L" else image.getchannel("R")
        return {"mean": round(float(np.asarray(plane).mean()), 1)}

    grey = Image.new("RGB", (4, 4), (200, 100, 0))
    assert tools.run("brightness", '{"channel":"R"}', grey).output == {"mean": 200.0}
    assert (
        tools.run("brightness", "{}", grey).text == '{"mean":118.0}'
    )  # ITU-R 601 luma of (200, 100, 0)
    assert tools.openai()[0]["function"]["name"] == "brightness"

    def error(*args) -> str:
        result = tools.run(*args)
        assert not result.ok and set(result.output) == {"error"}
        return result.output["error"]

    assert "not JSON" in error("brightness", "{nope", grey)
    assert "JSON object" in error("brightness", "[1]", grey)
    assert "must be one of ['L', 'R']" in error("brightness", '{"channel":"G"}', grey)
    assert "unknown argument 'gamma'" in error("brightness", '{"gamma":2}', grey)
    assert "no tool named 'zoom'" in error("zoom", "{}", grey)
    assert "no image" in error("brightness", "{}", None)

    tools.add(Tool("boom", "raises", lambda image: 1 / 0))
    assert "ZeroDivisionError" in error("boom", "{}", grey)

    def mute(image):
        raise RuntimeError()

    tools.add(Tool("mute", "raises without a word", mute))
    assert error("mute", "{}", grey) == "the tool failed: RuntimeError (no message)"
    tools.add(Tool("bounded", "bounds", lambda image, **a: a, {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 4},
        "n": {"type": "integer", "minimum": 1, "maximum": 9},
        "tags": {"type": "array", "maxItems": 1}}}))  # fmt: skip
    assert tools.run("bounded", '{"name":"ab","n":9,"tags":["x"]}', grey).ok
    assert error("bounded", '{"name":"abcde","n":0,"tags":[1,2]}', grey) == (
        "argument 'name' must be at most 4 characters, got 5 characters; "
        "argument 'n' must be at least 1, got 0; argument 'tags' must be at most 1 items, got 2 items"
    )
    assert "at least 2 characters" in error("bounded", '{"name":"a"}', grey)
    tools.add(Tool("opaque", "returns what JSON cannot hold", lambda image: {"im": image}))
    assert "not JSON serializable" in error("opaque", "{}", grey)
    tools.add(Tool("slow", "hangs", lambda image: time.sleep(5), timeout_s=0.2))
    started = time.monotonic()
    assert "longer than its 0.2 s" in error("slow", "{}", grey)
    assert time.monotonic() - started < 2

    def unreadable(image):
        raise UserError("the image is too small to read")

    tools.add(Tool("strict", "refuses", unreadable))
    assert error("strict", "{}", grey) == "the image is too small to read"
    with pytest.raises(UserError, match="tool name"):
        tools.add(Tool("no spaces", "bad name", lambda image: 0))


def test_ocr_on_an_image_too_thin_to_read_says_so_at_once() -> None:
    """A 3000 x 2 strip was enlarged 192x (1.7 GB for 1 x 3000) and failed after up to a minute
    with an empty ResizeImgError inside RapidOCR; now the model hears why, at once."""
    tools = default_registry()
    for size in [(3000, 2), (1, 3000)]:
        started = time.monotonic()
        result = tools.run("ocr", "{}", Image.new("RGB", size, "white"))
        assert not result.ok and time.monotonic() - started < 1
        w, h = size
        assert result.output["error"] == (f"the image is {w} x {h} pixels, too thin to read text "
                                          "in: OCR reads images up to 100:1; crop or pad it")  # fmt: skip
    # a 1-pixel image and a long strip within 100:1 are read (nothing on them)
    assert tools.run("ocr", "{}", Image.new("RGB", (1, 1), "white")).output == {"text": "", "words": []}
    assert tools.run("ocr", '{"detail":"text"}', Image.new("RGB", (2000, 25), "white")).ok


def test_load_tools_takes_builtins_and_a_users_module(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_tools.py").write_text(
        "from visto.tools import Tool\n"
        "size = Tool('size', 'Image size', lambda image: {'w': image.width, 'h': image.height})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    tools = load_tools("ocr, my_tools:size")
    assert tools.names == ["ocr", "size"]
    assert json.loads(tools.run("size", "{}", Image.new("RGB", (3, 2))).text) == {"w": 3, "h": 2}
    with pytest.raises(UserError, match="unknown tool 'paint'"):
        load_tools("paint")
    with pytest.raises(UserError, match="there is none at"):  # segment/detect name a checkpoint
        load_tools(f"segment={tmp_path / 'none'}")
    with pytest.raises(UserError, match="only segment and detect take a checkpoint"):
        load_tools("ocr=x")
    with pytest.raises(UserError, match="cannot load the tool"):
        load_tools("my_tools:nothing")
    with pytest.raises(UserError, match="not a visto.tools.Tool"):
        load_tools("sys:path")
    sys.modules.pop("my_tools", None)
