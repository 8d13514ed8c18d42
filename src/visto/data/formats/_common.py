"""Pieces every format shares: turns <-> conversation records, image (de)coding, checks.

Each helper raises `BadRecord` for a malformed record, so a reader's loop can skip and
count it (see stats.py) instead of crashing.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from visto.data.images import BadImage, open_image
from visto.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
from visto.errors import UserError
from visto.utils.io import atomic_directory

from .stats import BAD_FIELDS, BAD_IMAGE, MISSING_IMAGE, PLACEHOLDER_MISMATCH, BadRecord

# Caption-only sources (COCO, a WebDataset `.txt`) become this two-turn conversation.
CAPTION_PROMPT = "Describe the image briefly."

# LLaVA / ShareGPT speak "human"/"gpt"; some exports say "user"/"assistant".
ROLE_FROM_SPEAKER = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
SPEAKER_FROM_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}

IMAGE_FORMATS = {"png": ("PNG", "png"), "jpeg": ("JPEG", "jpg")}


def caption_turns(caption: str) -> list[Turn]:
    """The conversation a caption-only record reads as: a caption prompt, then the caption."""
    return [Turn("user", f"{IMAGE_PLACEHOLDER}\n{CAPTION_PROMPT}"), Turn("assistant", caption)]


def record_id(value: Any, fallback: str) -> str:
    if value is None:
        return fallback
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRecord(
            BAD_FIELDS, f"id must be a string or an integer, got {type(value).__name__}"
        )
    return str(value)


def turns_from_conversations(conversations: Any) -> list[Turn]:
    """LLaVA's `[{"from": "human"|"gpt"|"system", "value": str}, ...]` as turns."""
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord(BAD_FIELDS, '"conversations" must be a non-empty list')
    turns = []
    for i, message in enumerate(conversations):
        if not isinstance(message, dict):
            raise BadRecord(BAD_FIELDS, f"conversations[{i}] must be an object")
        speaker, value = message.get("from"), message.get("value")
        if speaker not in ROLE_FROM_SPEAKER:
            raise BadRecord(
                BAD_FIELDS,
                f'conversations[{i}]["from"] is {speaker!r}; expected one of {sorted(ROLE_FROM_SPEAKER)}',
            )
        if not isinstance(value, str):
            raise BadRecord(BAD_FIELDS, f'conversations[{i}]["value"] must be a string')
        turns.append(Turn(ROLE_FROM_SPEAKER[speaker], value))
    return turns


def conversations_from_turns(turns: list[Turn]) -> list[dict[str, str]]:
    return [{"from": SPEAKER_FROM_ROLE[t.role], "value": t.content} for t in turns]


def turns_from_messages(messages: Any) -> list[Turn]:
    """Chat messages `[{"role", "content"}]`; content is a string or a list of parts
    (`{"type": "image"}` / `{"type": "text", "text": ...}`, the transformers chat format)."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord(BAD_FIELDS, "messages must be a non-empty list")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecord(BAD_FIELDS, f"messages[{i}] must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_FROM_SPEAKER:
            raise BadRecord(BAD_FIELDS, f"messages[{i}] has unknown role {role!r}")
        if isinstance(content, list):
            content = _join_parts(content, i)
        if not isinstance(content, str):
            raise BadRecord(
                BAD_FIELDS, f"messages[{i}] content must be a string or a list of parts"
            )
        turns.append(Turn(ROLE_FROM_SPEAKER[role], content))
    return turns


def _join_parts(parts: list[Any], i: int) -> str:
    pieces = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(IMAGE_PLACEHOLDER)
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise BadRecord(
                BAD_FIELDS, f"messages[{i}] has a content part that is not image or text"
            )
    return "\n".join(pieces)


def turns_from_record(record: dict[str, Any]) -> list[Turn]:
    """Turns from whichever conversation field a JSON record has."""
    if "turns" in record:  # our own layout: Sample.to_json()
        return turns_from_messages(record["turns"])
    if "conversations" in record:
        return turns_from_conversations(record["conversations"])
    if "messages" in record:
        return turns_from_messages(record["messages"])
    raise BadRecord(BAD_FIELDS, 'no "turns", "conversations" or "messages" field')


def check_truth(truth: Any) -> dict[str, Any] | None:
    if truth is not None and not isinstance(truth, dict):
        raise BadRecord(BAD_FIELDS, f'"truth" must be an object, got {type(truth).__name__}')
    return truth


def decode_image(data: Any, what: str) -> Image.Image:
    """Bytes from inside a file (tar member, parquet cell) to an RGB image, bounded."""
    if not isinstance(data, (bytes, bytearray)):
        raise BadRecord(BAD_FIELDS, f"{what} must be bytes, got {type(data).__name__}")
    try:
        return open_image(bytes(data))
    except BadImage as e:
        raise BadRecord(BAD_IMAGE, f"{what}: {e}") from None


def resolve_image_path(relative: Any, roots: list[Path]) -> Path:
    """The first existing `root / relative`; refuses relative paths that leave their root. An
    absolute path is read where it is: HF `datasets` stores an `Image` feature cast from file
    paths as the files' absolute paths, without their bytes (`to_parquet`), and LLaVA-style
    JSONs written on one machine often hold absolute paths too."""
    if not isinstance(relative, str) or not relative:
        raise BadRecord(BAD_FIELDS, f"image path must be a non-empty string, got {relative!r}")
    if Path(relative).is_absolute():
        if Path(relative).is_file():
            return Path(relative)
        raise BadRecord(MISSING_IMAGE, f"image {relative!r} not found (an absolute path is read where it is)")
    if ".." in Path(relative).parts:
        raise BadRecord(BAD_FIELDS, f"image path {relative!r} must stay inside its folder (no '..')")
    for root in roots:
        if (root / relative).is_file():
            return root / relative
    where = " or ".join(str(r) for r in roots)
    raise BadRecord(
        MISSING_IMAGE,
        f"image {relative!r} not found in {where} (point data.image_root / --image-root at "
        "the image folder)",
    )


def load_image_file(path: Path) -> Image.Image:
    try:
        return open_image(path)
    except BadImage as e:
        raise BadRecord(BAD_IMAGE, str(e)) from None


def make_sample(
    id: str, images: list[Image.Image], turns: list[Turn], truth: dict | None, source: str
) -> Sample:
    """A normalized sample, or a BadRecord when its images and placeholders disagree."""
    try:
        return Sample(id=id, images=images, turns=turns, truth=truth, source=source).normalized()
    except ValueError as e:
        raise BadRecord(PLACEHOLDER_MISMATCH, str(e)) from None


def encode_image(image: Image.Image, image_format: str) -> tuple[bytes, str]:
    """(encoded bytes, file extension). PNG is lossless, so round trips are pixel-exact."""
    if image_format not in IMAGE_FORMATS:
        raise UserError(
            f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}"
        )
    pil_format, ext = IMAGE_FORMATS[image_format]
    buf = io.BytesIO()
    options = {"quality": 95} if pil_format == "JPEG" else {}
    image.convert("RGB").save(buf, format=pil_format, **options)
    return buf.getvalue(), ext


@contextlib.contextmanager
def output_directory(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temp directory that becomes `out` only if the whole write succeeds."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(
            f"{out} already exists; remove it, choose another path, or pass overwrite=True"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; every format writes a directory")
    with atomic_directory(out, overwrite=True) as tmp:
        yield tmp


def find_annotation_file(path: Path, suffixes: tuple[str, ...], fmt: str) -> Path:
    """`path` itself, or the one file with one of `suffixes` in the directory `path`."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{path} does not exist; give the {fmt} annotation file or its directory")
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"no {'/'.join(suffixes)} file in {path}; give the {fmt} annotation file")
    names = ", ".join(p.name for p in found)
    raise UserError(f"several annotation files in {path} ({names}); give the one to read")


def prepare_for_writing(sample: Sample) -> Sample:
    """The sample with placeholders matching its images, or a UserError naming it."""
    try:
        return sample.normalized()
    except ValueError as e:
        raise UserError(f"cannot write sample {sample.id!r}: {e}") from None
