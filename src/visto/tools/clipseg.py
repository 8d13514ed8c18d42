"""Text-prompted segmentation and open-vocabulary detection as tools: a clipseg checkpoint
(visto.models.clipseg, `visto train --recipe clipseg-synth`) asked about the image.

    tools = load_tools("segment,detect")            # runs/clipseg-synth/checkpoint
    tools = load_tools("segment=runs/seg/checkpoint,detect=runs/seg/checkpoint")
    tools.run("segment", '{"prompt": "the red star"}', image).output
      -> {"prompt": "the red star", "found": true, "pixels": 412, "fraction": 0.025,
          "box": [..0..999..], "box_pixels": [...]}
         with files {"mask.png": the mask (L, 255 inside), "overlay.png": the mask drawn on the image}
    tools.run("detect", '{"query": "red star"}', image).output
      -> {"query": "red star", "objects": [{"score": 0.93, "box": [...], "box_pixels": [...]}]}
         with files {"boxes.png": the boxes drawn on the image}

The model reads the JSON; the PNGs travel beside it (visto.tools.ToolOutput), for the user.

Both tools run in one tool process, "clipseg" (visto.tools.registry, Tool.process): started by
`tools.start()` (`visto chat --tools` and `visto serve --tools` call it as they start), which
loads the checkpoint there ahead of the first call (`preload`), or else by the first call, it
loads each checkpoint it is asked about once, by its path, and keeps it, so
segment and detect over one checkpoint share one copy and the caller holds none. A call past
its tool's timeout has the process killed, model and all; the next call starts a fresh one,
which loads the checkpoint again. What comes back is what the same call returns in the
caller's process (OnCheckpoint: the process computes with the caller's torch threads).
`segment_tool(path, process=None)` runs in a thread of the caller's instead, and
`segment_image` / `detect_objects` in the caller's own.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from visto.errors import UserError
from visto.tasks.common import pixels_to_norm
from visto.tasks.draw import draw_boxes
from visto.tools.registry import Tool, ToolOutput

DEFAULT_CHECKPOINT = (
    "runs/clipseg-synth/checkpoint"  # where `visto train --recipe clipseg-synth` writes
)
EXPERT_TOOLS = ("segment", "detect")
PROCESS = "clipseg"  # the tool process both tools run in (module doc)
MIN_SCORE = 0.3  # detections below this are left out
MASK_COLOUR = (230, 30, 200)

_models: dict[str, Any] = {}  # path -> model, in the process that calls (a tool process's own)
_lock = threading.Lock()  # one load per checkpoint, one image at a time through a model


def check_checkpoint(path: str) -> str:
    from visto.checkpoint import is_checkpoint, read_config

    if not is_checkpoint(path):
        raise UserError(f"the segment and detect tools read a clipseg checkpoint; there is none "
                        f"at {path}: train one with `visto train --recipe clipseg-synth` or name "
                        "yours, e.g. --tools segment=runs/seg/checkpoint")  # fmt: skip
    family = read_config(path)["family"]
    if family != "clipseg":
        raise UserError(f"{path} is a {family!r} checkpoint; the segment and detect tools need a "
                        "clipseg one (`visto train --recipe clipseg-synth`)")  # fmt: skip
    return str(Path(path))


def _model(path: str) -> Any:
    if path not in _models:
        import visto

        _models[path] = visto.load(check_checkpoint(path))
    return _models[path]


def preload(path: str = DEFAULT_CHECKPOINT) -> None:
    """The tools' warm-up in their process: load the checkpoint and run it once on a small
    blank image (the first forward's one-time costs), so that the first call finds it ready."""
    blank = Image.new("RGB", (32, 32))
    with _lock:
        model = _model(path)
        model.segment([blank], ["x"])
        model.detect([blank], ["x"])


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def draw_mask(image: Image.Image, mask: np.ndarray, colour: tuple[int, int, int] = MASK_COLOUR,
              alpha: float = 0.55) -> Image.Image:  # fmt: skip
    """A copy of `image` (RGB) with the (H, W) bool mask painted over it, half see-through."""
    base = np.asarray(image.convert("RGB"), np.float32)
    out = base.copy()
    out[mask] = (1 - alpha) * base[mask] + alpha * np.asarray(colour, np.float32)
    return Image.fromarray(out.round().astype(np.uint8))


def segment_image(image: Image.Image, prompt: str, path: str = DEFAULT_CHECKPOINT) -> np.ndarray:
    """(H, W) bool: the pixels of `image` that `prompt` names."""
    with _lock:
        return _model(path).segment([image.convert("RGB")], [prompt])[0] > 0.5


def detect_objects(image: Image.Image, query: str, path: str = DEFAULT_CHECKPOINT,
                   min_score: float = MIN_SCORE) -> list[dict[str, Any]]:  # fmt: skip
    """The objects `query` names: [{"score", "box" (0..999), "box_pixels"}], best first."""
    from visto.models.clipseg import nms

    image = image.convert("RGB")
    with _lock:
        scores, boxes = _model(path).detect([image], [query])
    w, h = image.size
    px = (boxes[0] * torch.tensor([w, h, w, h])).numpy()
    s = scores[0, :, 0].numpy()
    out = []
    for i in nms(px, s):
        if s[i] < min_score:
            break
        pixels = [round(float(v)) for v in px[i]]
        out.append({"score": round(float(s[i]), 3), "box": pixels_to_norm(pixels, image.size),
                    "box_pixels": pixels})  # fmt: skip
    return out


def run_segment(image: Image.Image, prompt: str, path: str = DEFAULT_CHECKPOINT) -> ToolOutput:
    """The segment tool: the mask of what `prompt` names, as JSON and PNGs."""
    mask = segment_image(image, prompt, path)
    out: dict[str, Any] = {"prompt": prompt, "found": bool(mask.any()),
                           "pixels": int(mask.sum()), "fraction": round(float(mask.mean()), 4)}  # fmt: skip
    if mask.any():
        ys, xs = np.nonzero(mask)
        pixels = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        out.update(box=pixels_to_norm(pixels, image.size), box_pixels=pixels)
    files = {"mask.png": png(Image.fromarray(mask.astype(np.uint8) * 255, "L")),
             "overlay.png": png(draw_mask(image, mask))}  # fmt: skip
    return ToolOutput(out, files)


def run_detect(image: Image.Image, query: str, path: str = DEFAULT_CHECKPOINT) -> ToolOutput:
    """The detect tool: the boxes of what `query` names, as JSON and a PNG."""
    found = detect_objects(image, query, path)
    drawn = draw_boxes(image, [o["box_pixels"] for o in found],
                       [f"{query} {o['score']:.2f}" for o in found])  # fmt: skip
    return ToolOutput({"query": query, "objects": found}, {"boxes.png": png(drawn)})


@dataclass(frozen=True)
class OnCheckpoint:
    """A tool's `run` over a checkpoint: `fn(image, path=path, **arguments)` (or its `warm`:
    `fn(path=path)`, called without an image). It pickles as
    `fn` (by name), `path` and the caller's torch thread count of that moment, so a tool process
    loads the checkpoint itself (once: `_model` keeps it) and computes with the threads the
    caller would have used; called where it was made, it leaves the threads alone."""

    fn: Callable[..., Any]
    path: str
    threads: int | None = None

    def __call__(self, *image: Image.Image, **arguments: Any) -> Any:
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.fn(*image, path=self.path, **arguments)

    def __reduce__(self) -> tuple[Any, ...]:
        return OnCheckpoint, (self.fn, self.path, torch.get_num_threads())


def segment_tool(path: str = DEFAULT_CHECKPOINT, process: str | None = PROCESS) -> Tool:
    """The segment tool over the checkpoint at `path` (loaded by its process's warm-up or on
    the first call), in the tool process `process` (None: in a thread of the caller's, which
    loads its own copy on the first call)."""
    return Tool(
        name="segment",
        # short: it is in every prompt that offers the tool (data/tool_calls.py, OCR_DESCRIPTION)
        description="Mask what the prompt names, e.g. 'the red star', 'all circles', 'the text'.",
        run=OnCheckpoint(run_segment, os.path.abspath(path)),
        parameters={
            "type": "object",
            "properties": {"prompt": {"type": "string", "maxLength": 80}},
            "required": ["prompt"],
            "additionalProperties": False,
        },  # fmt: skip
        process=process,
        warm=OnCheckpoint(preload, os.path.abspath(path)) if process is not None else None,
    )


def detect_tool(path: str = DEFAULT_CHECKPOINT, process: str | None = PROCESS) -> Tool:
    """The detect tool over the checkpoint at `path`, as segment_tool."""
    return Tool(
        name="detect",
        description="Box every object the query names, e.g. 'red star', best first.",
        run=OnCheckpoint(run_detect, os.path.abspath(path)),
        parameters={
            "type": "object",
            "properties": {"query": {"type": "string", "maxLength": 80}},
            "required": ["query"],
            "additionalProperties": False,
        },  # fmt: skip
        process=process,
        warm=OnCheckpoint(preload, os.path.abspath(path)) if process is not None else None,
    )


def expert_tool(name: str, path: str | None = None) -> Tool:
    """The `segment` or `detect` tool over the clipseg checkpoint at `path` (checked now)."""
    assert name in EXPERT_TOOLS, name
    path = check_checkpoint(path or DEFAULT_CHECKPOINT)
    return segment_tool(path) if name == "segment" else detect_tool(path)
