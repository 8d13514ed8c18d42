"""What to index: `Item`s from a folder of images or from a synthetic-world split.

An item carries a stable key (sha256 of the image's path and bytes), so re-indexing the same
file gives the same key and the store merges instead of duplicating, while an edited image
at the same path gets a new key. Pixels are decoded lazily: a resumed build computes keys,
skips what is already stored, and decodes only the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from visto.data.images import open_image
from visto.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


@dataclass
class Item:
    key: str
    path: str
    decode: Callable[[], Image.Image]  # may raise visto.data.images.BadImage
    metadata: dict[str, Any] = field(default_factory=dict)


def item_key(path: str, content: bytes) -> str:
    h = hashlib.sha256(path.encode("utf-8"))
    h.update(b"\0")
    h.update(content)
    return h.hexdigest()[:32]


def _bytes_item(path: Path, metadata: dict[str, Any]) -> Item | OSError:
    try:
        content = path.read_bytes()
    except OSError as e:
        return e
    shown = str(path.resolve())
    return Item(item_key(shown, content), shown, lambda: open_image(content), metadata)


def image_files(folder: str | Path) -> list[Path]:
    """Image files under `folder`, recursively, in a stable (sorted) order."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--images {folder}: not a directory of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(
            f"--images {folder}: no image files found ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


def folder_items(folder: str | Path) -> Iterator[Item | tuple[str, str]]:
    """Items for the images under `folder`; an unreadable file yields (path, reason)."""
    root = Path(folder)
    for path in image_files(root):
        item = _bytes_item(path, {"file": str(path.relative_to(root))})
        yield (str(path), str(item)) if isinstance(item, OSError) else item


def world_metadata(record: dict, split: str) -> dict[str, Any]:
    """The searchable facts of one synthetic-world image: captions, labels, objects."""
    truth = record.get("truth", {})
    objects = [f"{o['colour']} {o['shape']}" for o in truth.get("objects", [])]
    captions = record.get("tasks", {}).get("captions", [])
    meta: dict[str, Any] = {
        "split": split,
        "id": record.get("id"),
        "caption": captions[0] if captions else "",
        "objects": objects,
        "texts": [t.get("text", t) if isinstance(t, dict) else t for t in truth.get("texts", [])],
    }
    label = truth.get("label")
    if isinstance(label, dict) and "class" in label:
        meta["label"] = label["class"]
    return meta


def world_items(data_dir: str | Path, split: str) -> Iterator[Item | tuple[str, str]]:
    """Items for every image of a synthetic-world `split` (see visto.data.synth)."""
    from visto.data.synth.reader import iter_records

    root = Path(data_dir)
    for record in iter_records(root, split):
        path = root / record["image"]
        item = _bytes_item(path, world_metadata(record, split))
        yield (str(path), str(item)) if isinstance(item, OSError) else item


def metadata_summary(metadata: dict[str, Any], width: int = 60) -> str:
    """A one-line summary for result tables: caption, else label/objects, else file name."""
    for key in ("caption", "label"):
        if metadata.get(key):
            text = str(metadata[key])
            break
    else:
        if metadata.get("objects"):
            text = ", ".join(metadata["objects"])
        else:
            text = ", ".join(f"{k}={v}" for k, v in metadata.items() if k != "file")
    if metadata.get("split"):
        text = f"[{metadata['split']}] {text}"
    return text if len(text) <= width else text[: width - 1] + "…"
