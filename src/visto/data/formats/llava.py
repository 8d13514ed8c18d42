"""LLaVA conversation JSON with an image folder (the LLaVA-Instruct layout).

A JSON list (or JSON lines, one record a line) of

    {"id": "000123",
     "image": "images/000123.png",            # or a list of paths, or absent (text only)
     "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                       {"from": "gpt",   "value": "A red circle."}],
     "truth": {...}}                           # visto's addition; LLaVA ignores it

Image paths are relative to the JSON file's directory, or to `image_root` when given (the
`--image_folder` of LLaVA's training script). A record without a conversation but with a
`"caption"` (or `"text"`, `"captions"`) is a sample of the caption task (see captions.py);
`caption_key` and `image_key` name other fields. Reading loads the JSON index (`.jsonl` is
streamed line by line) and decodes each sample's images only when that sample is reached.

Writing produces `OUT/data.json` (or `data.jsonl`) and `OUT/images/`; LLaVA's loader reads
it with `--data_path OUT/data.json --image_folder OUT`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from visto.data.sample import Sample
from visto.errors import UserError

from ._common import (
    conversations_from_turns,
    encode_image,
    find_annotation_file,
    load_image_file,
    make_sample,
    output_directory,
    prepare_for_writing,
    record_id,
    resolve_image_path,
)
from .captions import turns_and_truth
from .stats import BAD_FIELDS, BAD_JSON, BadRecord, ReadStats


def read_llava(
    path: Path,
    stats: ReadStats,
    image_root: str | Path | None = None,
    caption_key: str | None = None,
    image_key: str | None = None,
) -> Iterator[Sample]:
    json_path = find_annotation_file(path, (".json", ".jsonl"), "LLaVA")
    roots = [Path(image_root)] if image_root is not None else [json_path.parent]
    records = _json_lines(json_path) if json_path.suffix == ".jsonl" else _json_list(json_path)
    for key, record in records:
        try:
            source = f"llava:{json_path.name}"
            sample = _sample_from_record(
                record, key, roots, source, caption_key, image_key or "image"
            )
        except BadRecord as e:
            stats.skip(json_path, key, e)
            continue
        stats.read += 1
        yield sample


def _json_list(json_path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with open(json_path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {json_path}: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(
            f"{json_path} is not valid JSON ({e}); LLaVA data is a JSON list of records "
            "or JSON lines in a .jsonl file"
        ) from None
    if not isinstance(records, list):
        hint = (
            " (this looks like COCO: use fmt='coco')"
            if isinstance(records, dict) and "annotations" in records
            else ""
        )
        raise UserError(f"{json_path} must hold a JSON list of LLaVA records{hint}")
    for index, record in enumerate(records):
        yield _key(record, f"#{index}"), record


def _json_lines(json_path: Path) -> Iterator[tuple[str, Any]]:
    try:
        f = open(json_path, "rb")  # bytes: a line of bad UTF-8 is one bad record, not a crash
    except OSError as e:
        raise UserError(f"cannot read {json_path}: {e}") from None
    with f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield f"line {number}", BadRecord(BAD_JSON, f"not valid JSON: {e}")
                continue
            yield _key(record, f"line {number}"), record


def _key(record: Any, fallback: str) -> str:
    if isinstance(record, dict) and isinstance(record.get("id"), (str, int)):
        return f"{fallback} (id {record['id']})"
    return fallback


def _sample_from_record(
    record: Any,
    key: str,
    roots: list[Path],
    source: str,
    caption_key: str | None,
    image_key: str,
) -> Sample:
    if isinstance(record, BadRecord):
        raise record
    if not isinstance(record, dict):
        raise BadRecord(BAD_FIELDS, f"a record must be a JSON object, got {type(record).__name__}")
    sample_id = record_id(record.get("id"), fallback=key)
    image_field = record.get(image_key)
    if image_field is None:
        paths = []
    elif isinstance(image_field, str):
        paths = [image_field]
    elif isinstance(image_field, list) and all(isinstance(p, str) for p in image_field):
        paths = image_field
    else:
        raise BadRecord(BAD_FIELDS, f'"{image_key}" must be a path or a list of paths')
    turns, truth = turns_and_truth(record, caption_key)
    images = [load_image_file(resolve_image_path(p, roots)) for p in paths]
    return make_sample(sample_id, images, turns, truth, source)


def write_llava(
    samples: Iterable[Sample],
    out: str | Path,
    *,
    jsonl: bool = False,
    image_format: str = "png",
    overwrite: bool = False,
) -> int:
    """Write `OUT/data.json` (a JSON list; `jsonl=True` for JSON lines) and `OUT/images/`."""
    count = 0
    with output_directory(out, overwrite) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / ("data.jsonl" if jsonl else "data.json"), "w", encoding="utf-8") as f:
            f.write("" if jsonl else "[\n")
            for sample in samples:
                record = _record_from_sample(prepare_for_writing(sample), count, tmp, image_format)
                text = json.dumps(record, ensure_ascii=False)
                f.write(text + "\n" if jsonl else ("" if count == 0 else ",\n") + text)
                count += 1
            f.write("" if jsonl else "\n]\n")
    return count


def _record_from_sample(sample: Sample, index: int, root: Path, image_format: str) -> dict:
    paths = []
    for i, image in enumerate(sample.images):
        data, ext = encode_image(image, image_format)
        name = f"{index:06d}.{ext}" if len(sample.images) == 1 else f"{index:06d}_{i}.{ext}"
        (root / "images" / name).write_bytes(data)
        paths.append(f"images/{name}")
    record: dict[str, Any] = {"id": sample.id}
    if paths:
        # LLaVA-1.5 reads a single path; multi-image loaders (LLaVA-NeXT/OneVision) a list.
        record["image"] = paths[0] if len(paths) == 1 else paths
    record["conversations"] = conversations_from_turns(sample.turns)
    if sample.truth is not None:
        record["truth"] = sample.truth
    return record
