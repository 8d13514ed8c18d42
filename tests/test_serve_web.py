"""The web page in a real browser (Debian's chromium driven by Playwright): choose an image,
chat with a streamed answer whose boxes are drawn on the image, search the index by text; with
the server's tools, each call listed and a segment mask and detect boxes drawn on the image,
and an answer that quotes a tool's text (--quote-results) marked so;
bad input (a file that is not an image, one that cannot be decoded, one only the server cannot
read, a tool that fails) shown as an error in the page."""

from __future__ import annotations

import json
import shutil
import urllib.parse

import httpx
import pytest

from test_serve_support import (
    data_url,
    make_clip_checkpoint,
    make_clipseg_checkpoint,
    make_index,
    make_llava_checkpoint,
    png_bytes,
    running,
)
from visto.cli import build_parser
from visto.commands.serve import build_app
from visto.tasks import ocr

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("chromium") is None,
                       reason="needs Debian's chromium (apt-get install -y chromium)"),  # fmt: skip
]
MODELS_LOADED = "document.getElementById('models').textContent.includes('tiny-llava')"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


# Answers constrained to this schema always hold a box: "[x1, y1, x2, y2]" in 0..999, which
# the processor's box parser reads (as it reads <loc_k> tokens), whatever the random weights.
BOX_SCHEMA = {
    "type": "object",
    "properties": {"box": {"type": "array", "minItems": 4, "maxItems": 4,
                           "items": {"type": "integer", "minimum": 0, "maximum": 999}}},
    "required": ["box"],
    "additionalProperties": False,
}  # fmt: skip


def test_page_chat_boxes_and_search(tmp_path):
    from playwright.sync_api import sync_playwright

    llava = make_llava_checkpoint(tmp_path / "tiny-llava" / "checkpoint")
    clip = make_clip_checkpoint(tmp_path / "tiny-clip" / "checkpoint")
    make_index(tmp_path / "db", clip, tmp_path / "images")
    app = build_app(build_parser().parse_args(
        ["serve", "--model", str(llava), "--clip", str(clip), "--db", str(tmp_path / "db")]))  # fmt: skip
    image = png_bytes((200, 40, 40), (96, 64))
    (tmp_path / "query.png").write_bytes(image)
    question = "where is the red square?"

    with running(app) as url, sync_playwright() as pw:
        body = {"model": "tiny-llava", "max_tokens": 40,
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "answer", "schema": BOX_SCHEMA}},
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url(image)}},
                    {"type": "text", "text": question}]}]}  # fmt: skip
        expected = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        expected = expected["choices"][0]
        assert len(expected["boxes"]) == 1
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            schema = urllib.parse.quote(json.dumps(BOX_SCHEMA))
            page.goto(f"{url}/?max_tokens=40&schema={schema}")
            page.wait_for_function(MODELS_LOADED)
            page.set_input_files("#file", str(tmp_path / "query.png"))
            page.wait_for_selector("#stage:not([hidden])")
            page.fill("#prompt", question)
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
            assert page.inner_text(".msg.assistant") == expected["message"]["content"]
            drawn = page.get_attribute("#boxes", "data-boxes")
            assert drawn is not None and json.loads(drawn) == expected["boxes"]
            # Magenta box edges are on the canvas.
            magenta = page.evaluate("""() => {
                const c = document.getElementById('boxes'), ctx = c.getContext('2d');
                const px = ctx.getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let i = 0; i < px.length; i += 4)
                    if (px[i] > 200 && px[i + 1] < 60 && px[i + 2] > 200 && px[i + 3] > 0) n++;
                return n; }""")  # fmt: skip
            assert magenta > 0

            page.fill("#query", "a red square")
            page.click("#search-form button")
            page.wait_for_selector("#results .hit img[src^='data:image/png']")
            assert page.locator("#results .hit").count() == 6  # every indexed image, best first
        finally:
            browser.close()


# Colours the page draws the tools' results in (static/app.js): a mask in see-through cyan,
# boxes in orange. Counted over the overlay canvas, as drawn.
COUNT_PIXELS = """([canvas, colour]) => {
    const c = document.getElementById(canvas), ctx = c.getContext('2d');
    const px = ctx.getImageData(0, 0, c.width, c.height).data;
    const is = colour === 'cyan'
      ? (i) => px[i] < 60 && px[i + 1] > 150 && px[i + 2] > 200 && px[i + 3] > 0
      : (i) => px[i] > 200 && px[i + 1] > 100 && px[i + 1] < 200 && px[i + 2] < 60 && px[i + 3] > 0;
    let n = 0;
    for (let i = 0; i < px.length; i += 4) if (is(i)) n++;
    return n; }"""
BROKEN_TOOL = """from visto.tools import Tool


def run(image):
    raise RuntimeError("the lamp is out")


broken = Tool("broken", "Always fails", run)
read = Tool("read", "Read the text in the image", lambda image: {"text": "EXIT"})
"""


def test_page_lists_tool_calls_draws_the_mask_and_boxes_and_shows_errors(tmp_path, monkeypatch):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    scene = Image.new("RGB", (160, 120), (250, 250, 250))
    scene.paste((200, 40, 40), (20, 20, 90, 80))
    scene.save(tmp_path / "scene.png")
    image = (tmp_path / "scene.png").read_bytes()
    # masks that cover 30% of the scene, whatever the prompt the random model writes
    seg = make_clipseg_checkpoint(tmp_path / "seg" / "checkpoint", scene, fraction=0.3)
    # 4,096 positions: the tools' definitions and ten detections are long in a tiny tokenizer
    llava = make_llava_checkpoint(tmp_path / "tiny-llava" / "checkpoint", context=4096)
    (tmp_path / "page_tools.py").write_text(BROKEN_TOOL)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = build_app(build_parser().parse_args(
        ["serve", "--model", str(llava),
         "--tools", f"segment={seg},detect={seg},page_tools:broken,page_tools:read"]))  # fmt: skip
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "corrupt.png").write_bytes(image[:8] + b"no chunks follow")  # a PNG signature only
    (tmp_path / "drawing.svg").write_text(  # the browser shows it; the server reads no SVG
        '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="30">'
        '<rect width="40" height="30" fill="red"/></svg>')  # fmt: skip

    def expected_choice(url: str, tool: str, question: str) -> dict:
        body = {"model": "tiny-llava", "max_tokens": 120,
                "tool_choice": {"type": "function", "function": {"name": tool}},
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url(image)}},
                    {"type": "text", "text": question}]}]}  # fmt: skip
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["tool_runs"] and choice["tool_runs"][0]["name"] == tool
        return choice

    def expected_runs(url: str, tool: str, question: str) -> list[dict]:
        return expected_choice(url, tool, question)["tool_runs"]

    def quoted_note(page) -> tuple[str | None, list[str]]:
        """The answer's data-quoted, and the notes shown under it (the page's "quoted")."""
        return (page.get_attribute(".msg.assistant", "data-quoted"),
                page.eval_on_selector_all(".msg.assistant + .quoted",
                                          "ns => ns.filter(n => n.offsetParent !== null)"
                                          ".map(n => n.textContent)"))  # fmt: skip

    def ask(page, url: str, tool: str, question: str) -> list[dict]:
        """A fresh page: the scene chosen, `tool` called, the answer done; the calls listed."""
        page.goto(f"{url}/?max_tokens=120")
        page.wait_for_function(MODELS_LOADED)
        page.wait_for_selector("#tool-choice:not([hidden])")
        page.set_input_files("#file", str(tmp_path / "scene.png"))
        page.wait_for_function("document.getElementById('preview').naturalWidth > 0")
        page.select_option("#tool-choice", tool)
        page.fill("#prompt", question)
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-done='true']", timeout=120_000)
        return page.eval_on_selector_all(".msg.tool", """divs => divs.map(d => ({
            name: d.querySelector('.name').textContent, args: d.querySelector('.args').textContent,
            result: d.querySelector('.result').textContent, ok: d.dataset.ok === 'true',
            error: d.classList.contains('error')}))""")  # fmt: skip

    with running(app) as url, sync_playwright() as pw:
        cards = httpx.get(url + "/v1/models").json()["data"]
        assert cards[0]["tools"] == ["segment", "detect", "broken", "read"]
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()

            # segment: each call listed (name, arguments, result), the mask drawn in cyan
            question = "Cut out the red square."
            runs = expected_runs(url, "segment", question)
            listed = ask(page, url, "segment", question)
            assert [(t["name"], t["args"], t["ok"]) for t in listed] == [
                (r["name"], r["arguments"], r["ok"]) for r in runs]  # fmt: skip
            assert listed[0]["result"] == "mask of 5760 pixels (30.0% of the image)"
            assert page.get_attribute(".msg.assistant", "data-tool-runs") == str(len(runs))
            masks = sum(1 for r in runs if r["ok"] and "mask.png" in r.get("files", {}))
            assert page.get_attribute("#overlay", "data-masks") == str(masks) != "0"
            # shown at its own size (160x120), the mask is drawn pixel for pixel: 30% of it
            assert page.evaluate("[document.getElementById('overlay').width, "
                                 "document.getElementById('overlay').height]") == [160, 120]  # fmt: skip
            cyan = page.evaluate(COUNT_PIXELS, ["overlay", "cyan"])
            boxes = [o["box"] for r in runs if r["ok"] for o in r["result"].get("objects", [])]
            if not boxes:  # nothing drawn over the mask: every mask pixel is there
                assert cyan == 5760
            assert abs(cyan / (160 * 120) - 0.3) < 0.05
            # a mask's result holds no text: the answer is the model's own, not marked quoted
            assert quoted_note(page) == ("false", [])

            # detect: the boxes found drawn in orange
            question = "Find the red square."
            runs = expected_runs(url, "detect", question)
            listed = ask(page, url, "detect", question)
            assert [(t["name"], t["args"]) for t in listed] == [
                (r["name"], r["arguments"]) for r in runs]  # fmt: skip
            found = runs[0]["result"]["objects"]
            assert found and listed[0]["result"].startswith(f"{len(found)} object(s) found")
            boxes = [o["box"] for r in runs if r["ok"] for o in r["result"].get("objects", [])]
            assert json.loads(page.get_attribute("#overlay", "data-boxes")) == boxes
            assert page.evaluate(COUNT_PIXELS, ["overlay", "orange"]) > 0

            # the OCR task's question answered from a result with text: under the server's
            # default --quote-results auto the answer is the tool's word, and the page says so
            # (the choice's `quoted`, which the server sends on the last chunk)
            expected = expected_choice(url, "read", ocr.PROMPT)
            assert (expected["message"]["content"], expected["quoted"]) == ("EXIT", True)
            listed = ask(page, url, "read", ocr.PROMPT)
            assert [(t["name"], t["result"]) for t in listed] == [("read", "read: EXIT")]
            assert page.inner_text(".msg.assistant") == "EXIT"
            assert quoted_note(page) == (
                "true", ["quoted from the tool result: every word of this answer is the tool's"])
            # the same tool on a free question: the model's own answer, not marked
            expected = expected_choice(url, "read", "What is wrong?")
            assert expected["quoted"] is False
            ask(page, url, "read", "What is wrong?")
            assert page.inner_text(".msg.assistant") == expected["message"]["content"]
            assert quoted_note(page) == ("false", [])

            # a tool that raises: its call listed as an error, with the tool's words
            listed = ask(page, url, "broken", "What is wrong?")
            assert listed[0]["name"] == "broken" and listed[0]["error"] and not listed[0]["ok"]
            assert listed[0]["result"] == ("error: the tool failed: RuntimeError: the lamp is out")

            # files that are no image, or no image the browser can decode: said next to it
            page.goto(url + "/")
            page.wait_for_function(MODELS_LOADED)
            page.set_input_files("#file", str(tmp_path / "notes.txt"))
            page.wait_for_selector("#image-error:not([hidden])")
            assert "notes.txt is not an image" in page.inner_text("#image-error")
            page.set_input_files("#file", str(tmp_path / "corrupt.png"))
            page.wait_for_function("$('image-error').textContent.includes('corrupt.png')")
            assert "could not be decoded" in page.inner_text("#image-error")
            assert page.is_hidden("#stage")
            # an image the browser shows but the server cannot read: the server's 400, in the log
            page.set_input_files("#file", str(tmp_path / "drawing.svg"))
            page.wait_for_selector("#stage:not([hidden])")
            assert page.is_hidden("#image-error")
            page.fill("#prompt", "What is it?")
            page.click("#send")
            page.wait_for_selector(".msg.error")
            assert "bad image" in page.inner_text(".msg.error")
            assert page.locator(".msg.assistant").count() == 0
        finally:
            browser.close()
