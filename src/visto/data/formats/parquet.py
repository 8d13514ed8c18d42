"""Parquet with image bytes, the layout of VLM datasets on the Hugging Face hub.

One row per sample:

    id             string
    images         list<struct<bytes: binary, path: string>>   (HF `Image` cells)
    conversations  list<struct<from: string, value: string>>   (LLaVA speakers)
    truth          string                                      (JSON, or null)

Reading also accepts a single `image` struct column (or plain binary), and `messages`
(chat `{"role", "content"}` with string or `[{"type": "image"}, {"type": "text", ...}]`
content) instead of `conversations`; an image cell with no bytes but a `path` is loaded
from beside the parquet file. A file without a conversation column is a caption set (HF
`datasets` with an `Image` feature and a `caption`, `text` or `captions` column): each row
is a sample of the caption task (see captions.py). `caption_key` and `image_key` name other
columns. Files are read one batch of rows at a time
(`ParquetFile.iter_batches`), so memory holds one batch, not the file.

Writing produces `OUT/part-00000.parquet`, ... (at most `max_samples_per_file` rows each)
in row groups of `row_group_size` rows, so readers can stream and seek.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from visto.data.sample import Sample
from visto.errors import UserError

from ._common import (
    check_truth,
    conversations_from_turns,
    decode_image,
    encode_image,
    load_image_file,
    make_sample,
    output_directory,
    prepare_for_writing,
    record_id,
    resolve_image_path,
    turns_from_conversations,
    turns_from_messages,
)
from .captions import (
    DEFAULT_CAPTION_KEYS,
    SETTING_HINT,
    caption_key_in,
    caption_sample_parts,
    captions_from,
)
from .stats import BAD_FIELDS, BAD_JSON, MISSING_IMAGE, TRUNCATED, BadRecord, ReadStats

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("images", pa.list_(IMAGE_STRUCT)),
        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
        ("truth", pa.string()),
    ]
)
IMAGE_COLUMNS = ("images", "image")
TURN_COLUMNS = ("conversations", "messages")
BATCH_ROWS = 64


def read_parquet(
    path: Path,
    stats: ReadStats,
    caption_key: str | None = None,
    image_key: str | None = None,
) -> Iterator[Sample]:
    for file in _files(path):
        yield from _read_file(file, stats, caption_key, image_key)


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if files:
            return files
        raise UserError(f"no .parquet files in {path}")
    raise UserError(f"{path} does not exist; give a .parquet file or a folder of them")


class _Columns:
    """Which column holds what in one parquet file: the images, and turns or captions."""

    def __init__(
        self, file: Path, names: list[str], caption_key: str | None, image_key: str | None
    ):
        if image_key is not None and image_key not in names:
            raise UserError(
                f"{file} has no column {image_key!r} (the image_key setting); its columns are {names}"
            )
        self.image = image_key or next((c for c in IMAGE_COLUMNS if c in names), None)
        self.turns = None if caption_key else next((c for c in TURN_COLUMNS if c in names), None)
        self.caption = None if self.turns else caption_key_in(names, caption_key)
        if self.turns is None and self.caption is None:
            wanted = (
                f"a column {caption_key!r} (the caption_key setting)"
                if caption_key
                else f"a conversation column ({', '.join(TURN_COLUMNS)}) or a caption column "
                f"({', '.join(DEFAULT_CAPTION_KEYS)}); {SETTING_HINT}"
            )
            raise UserError(f"{file} has columns {names}; visto needs {wanted}")
        if self.caption is not None and self.image is None:
            raise UserError(
                f"{file} has captions ({self.caption!r}) but no image column among {names}: "
                f"visto looks for {list(IMAGE_COLUMNS)}; set data.image_key (or --image-key)"
            )

    def to_read(self, names: list[str]) -> list[str]:
        wanted = ("id", self.image, self.turns, self.caption, "truth")
        return [c for c in wanted if c is not None and c in names]


def _read_file(
    file: Path, stats: ReadStats, caption_key: str | None, image_key: str | None
) -> Iterator[Sample]:
    try:
        parquet = pq.ParquetFile(file)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{file} is not a readable parquet file ({e})") from None
    names = parquet.schema_arrow.names
    columns = _Columns(file, names, caption_key, image_key)
    source = f"parquet:{file.name}"
    row = 0
    batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns.to_read(names))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as e:
            error = BadRecord(
                TRUNCATED, f"file is damaged here ({e}); its remaining rows are skipped"
            )
            stats.skip(file, f"row {row}", error)
            return
        for record in batch.to_pylist():
            key = f"row {row}"
            row += 1
            try:
                sample = _sample_from_row(record, key, columns, file, source)
            except BadRecord as e:
                stats.skip(file, key, e)
                continue
            stats.read += 1
            yield sample


def _sample_from_row(
    record: dict[str, Any], key: str, columns: _Columns, file: Path, source: str
) -> Sample:
    sample_id = record_id(record.get("id"), fallback=key)
    truth = record.get("truth")
    if isinstance(truth, str):
        try:
            truth = json.loads(truth)
        except json.JSONDecodeError as e:
            raise BadRecord(BAD_JSON, f'"truth" is not valid JSON: {e}') from None
    truth = check_truth(truth)
    if columns.caption is not None:
        captions = captions_from(record[columns.caption], f'"{columns.caption}"')
        turns, truth = caption_sample_parts(captions, truth)
    elif columns.turns == "conversations":
        turns = turns_from_conversations(record["conversations"])
    else:
        turns = turns_from_messages(record["messages"])
    cells = record.get(columns.image) if columns.image else None
    if cells is None:
        cells = []
    elif not isinstance(cells, list):  # a single-image column (HF `Image` feature)
        cells = [cells]
    if columns.caption is not None and not cells:
        raise BadRecord(MISSING_IMAGE, f'caption row has no image in "{columns.image}"')
    images = [_image(cell, f"{columns.image}[{i}]", file) for i, cell in enumerate(cells)]
    return make_sample(sample_id, images, turns, truth, source)


def _image(cell: Any, what: str, file: Path):
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return decode_image(cell["bytes"], what)
        if cell.get("path") is not None:
            return load_image_file(resolve_image_path(cell["path"], [file.parent]))
        raise BadRecord(BAD_FIELDS, f"{what} has neither bytes nor a path")
    return decode_image(cell, what)


def write_parquet(
    samples: Iterable[Sample],
    out: str | Path,
    *,
    row_group_size: int = 100,
    max_samples_per_file: int = 10_000,
    image_format: str = "png",
    overwrite: bool = False,
) -> int:
    """Write `OUT/part-00000.parquet`, ...; returns how many samples were written."""
    if row_group_size < 1 or max_samples_per_file < 1:
        raise UserError("row_group_size and max_samples_per_file must be at least 1")
    count = 0
    rows: list[dict[str, Any]] = []
    writer: pq.ParquetWriter | None = None
    with output_directory(out, overwrite) as tmp:
        try:
            for sample in samples:
                if count % max_samples_per_file == 0:
                    _flush(writer, rows, row_group_size)
                    if writer is not None:
                        writer.close()
                    name = f"part-{count // max_samples_per_file:05d}.parquet"
                    writer = pq.ParquetWriter(tmp / name, SCHEMA)
                rows.append(_row(prepare_for_writing(sample), count, image_format))
                count += 1
                if len(rows) == row_group_size:
                    _flush(writer, rows, row_group_size)
            _flush(writer, rows, row_group_size)
        finally:
            if writer is not None:
                writer.close()
    return count


def _flush(
    writer: pq.ParquetWriter | None, rows: list[dict[str, Any]], row_group_size: int
) -> None:
    if writer is not None and rows:
        writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), row_group_size=row_group_size)
        rows.clear()


def _row(sample: Sample, index: int, image_format: str) -> dict[str, Any]:
    images = []
    for i, image in enumerate(sample.images):
        data, ext = encode_image(image, image_format)
        images.append({"bytes": data, "path": f"{index:06d}_{i}.{ext}"})
    return {
        "id": sample.id,
        "images": images,
        "conversations": conversations_from_turns(sample.turns),
        "truth": None if sample.truth is None else json.dumps(sample.truth, ensure_ascii=False),
    }
