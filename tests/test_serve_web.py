"""The web page in a real browser (Debian's chromium driven by Playwright): choose an image,
chat with a streamed answer whose boxes are drawn on the image, search the index by text."""

from __future__ import annotations

import json
import shutil
import urllib.parse

import httpx
import pytest

from test_serve_support import (
    data_url,
    make_clip_checkpoint,
    make_index,
    make_llava_checkpoint,
    png_bytes,
    running,
)
from visto.cli import build_parser
from visto.commands.serve import build_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("chromium") is None,
                       reason="needs Debian's chromium (apt-get install -y chromium)"),  # fmt: skip
]
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
            page.wait_for_function("document.getElementById('models').textContent.includes('tiny-llava')")
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
