"""WebDataset tar shards: `shard-000000.tar`, `shard-000001.tar`, ...

Files of one sample sit next to each other in a shard and share a key (the name up to the
first dot of the base name, WebDataset's own rule):

    00000042.json      {"id": ..., "turns": [{"role", "content"}...], "truth": {...}}
    00000042.txt       a caption (written for CLIP-style loaders such as open_clip)
    00000042.png       image 0 (or .jpg / .jpeg / .webp)
    00000042.1.png     image 1, 00000042.2.png image 2, ... (multi-image samples)

Reading: a `.json` with a conversation (`"turns"`, LLaVA `"conversations"`, chat
`"messages"`) gives the turns. Otherwise the sample is a caption (see captions.py): the
`.txt` file, else the `.json`'s `"caption"` (or `"text"`, `"captions"`), the layout of
img2dataset and of `webdataset.TarWriter` caption sets. `caption_key` names another
extension or JSON key; `image_key` another image extension. Other extensions (`.cls`,
`.npy`, ...) are ignored. Shards are streamed member by member
(tarfile's stream mode, which also reads `.tar.gz`), so a shard is never held in memory. A shard that is damaged part
way is read up to the damage; the rest of it is counted as skipped.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from visto.data.sample import Sample
from visto.errors import UserError

from ._common import (
    check_truth,
    decode_image,
    encode_image,
    make_sample,
    output_directory,
    prepare_for_writing,
    record_id,
)
from .captions import (
    CONVERSATION_KEYS,
    SETTING_HINT,
    caption_sample_parts,
    captions_from,
    turns_and_truth,
)
from .stats import BAD_FIELDS, BAD_JSON, MISSING_IMAGE, TRUNCATED, BadRecord, ReadStats

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # stream mode "r|*" reads gzip too
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# WebDataset's split of a member name into (key, extension): the first dot of the base name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]+)$")
_NUMBERED_IMAGE = re.compile(r"^(\d+)\.([^.]+)$")  # "1.png": image 1 of a multi-image sample


def read_webdataset(
    path: Path,
    stats: ReadStats,
    caption_key: str | None = None,
    image_key: str | None = None,
) -> Iterator[Sample]:
    image_extensions = (image_key.lower(),) if image_key is not None else IMAGE_EXTENSIONS
    for shard in _shards(path):
        yield from _read_shard(shard, stats, caption_key, image_extensions)


def _shards(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.name.endswith(SHARD_SUFFIXES))
        if shards:
            return shards
        raise UserError(
            f"no .tar shards in {path}; WebDataset data is a folder of shard-NNNNNN.tar"
        )
    raise UserError(f"{path} does not exist; give a .tar shard or a folder of them")


def _read_shard(
    shard: Path, stats: ReadStats, caption_key: str | None, image_extensions: tuple[str, ...]
) -> Iterator[Sample]:
    try:
        tar = tarfile.open(shard, mode="r|*")
    except (OSError, tarfile.TarError) as e:
        raise UserError(
            f"{shard} is not a readable tar file ({e}); re-create or remove it"
        ) from None
    with tar:
        groups = _member_groups(tar)
        while True:
            try:
                key, files = next(groups)
            except StopIteration:
                return
            except (OSError, EOFError, tarfile.TarError) as e:
                error = BadRecord(
                    TRUNCATED, f"shard is damaged here ({e}); its remaining records are skipped"
                )
                stats.skip(shard, "after the last good record", error)
                return
            try:
                source = f"webdataset:{shard.name}"
                sample = _sample_from_files(key, files, source, caption_key, image_extensions)
            except BadRecord as e:
                stats.skip(shard, key, e)
                continue
            stats.read += 1
            yield sample


def _member_groups(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each run of consecutive members sharing a key."""
    key, files = None, {}
    for member in tar:
        match = _KEY_EXT.match(member.name)
        if not member.isfile() or match is None:
            continue
        member_key, ext = match.group(1), match.group(2).lower()
        if member_key != key:
            if key is not None:
                yield key, files
            key, files = member_key, {}
        handle = tar.extractfile(member)
        assert handle is not None  # a regular file always has a handle
        files[ext] = handle.read()
    if key is not None:
        yield key, files


def _sample_from_files(
    key: str,
    files: dict[str, bytes],
    source: str,
    caption_key: str | None,
    image_extensions: tuple[str, ...],
) -> Sample:
    encoded = _images_in_order(files, image_extensions)
    record = _json_record(key, files) if "json" in files else {}
    caption_file = caption_key if caption_key is not None else "txt"
    has_turns = caption_key is None and any(k in record for k in CONVERSATION_KEYS)
    if has_turns:
        turns, truth = turns_and_truth(record, None)
    elif caption_file in files and caption_file != "json":
        # A .txt beside a caption-only .json is the caption; beside .json turns (visto's own
        # shards write one for CLIP loaders) it is not.
        caption = _text(key, caption_file, files[caption_file])
        captions = captions_from(caption, f"{key}.{caption_file}")
        turns, truth = caption_sample_parts(captions, check_truth(record.get("truth")))
    elif "json" in files:
        turns, truth = turns_and_truth(record, caption_key)
    else:
        wanted = f"{key}.{caption_key}" if caption_key else f"{key}.json or {key}.txt"
        raise BadRecord(BAD_FIELDS, f"no {wanted} (have: {sorted(files)}); {SETTING_HINT}")
    if not encoded and not has_turns:
        raise BadRecord(
            MISSING_IMAGE,
            f"caption record {key} has no .{'/.'.join(image_extensions)} image "
            f"(have: {sorted(files)}): set data.image_key (or --image-key) to its extension",
        )
    sample_id = record_id(record.get("id"), fallback=key)
    images = [decode_image(data, f"{key}.{ext}") for ext, data in encoded]
    return make_sample(sample_id, images, turns, truth, source)


def _json_record(key: str, files: dict[str, bytes]) -> dict[str, Any]:
    try:
        record = json.loads(files["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRecord(BAD_JSON, f"{key}.json is not valid JSON: {e}") from None
    if not isinstance(record, dict):
        raise BadRecord(BAD_FIELDS, f"{key}.json must hold an object")
    return record


def _text(key: str, ext: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRecord(BAD_FIELDS, f"{key}.{ext} is not UTF-8 text") from None


def _images_in_order(
    files: dict[str, bytes], image_extensions: tuple[str, ...]
) -> list[tuple[str, bytes]]:
    by_index: dict[int, tuple[str, bytes]] = {}
    for ext, data in files.items():
        numbered = _NUMBERED_IMAGE.match(ext)
        if ext in image_extensions:
            index = 0
        elif numbered and numbered.group(2) in image_extensions:
            index = int(numbered.group(1))
        else:
            continue
        if index in by_index:
            raise BadRecord(
                BAD_FIELDS, f"two files for image {index}: .{by_index[index][0]} and .{ext}"
            )
        by_index[index] = (ext, data)
    if sorted(by_index) != list(range(len(by_index))):
        raise BadRecord(
            BAD_FIELDS, f"image numbers {sorted(by_index)} must run 0 (no number), 1, 2, ..."
        )
    return [by_index[i] for i in range(len(by_index))]


def write_webdataset(
    samples: Iterable[Sample],
    out: str | Path,
    *,
    max_samples_per_shard: int = 1000,
    image_format: str = "png",
    overwrite: bool = False,
) -> int:
    """Write `OUT/shard-000000.tar`, ... with at most `max_samples_per_shard` samples each."""
    if max_samples_per_shard < 1:
        raise UserError(f"max_samples_per_shard must be at least 1, got {max_samples_per_shard}")
    count = 0
    tar: tarfile.TarFile | None = None
    with output_directory(out, overwrite) as tmp:
        try:
            for sample in samples:
                if count % max_samples_per_shard == 0:
                    if tar is not None:
                        tar.close()
                    tar = tarfile.open(tmp / f"shard-{count // max_samples_per_shard:06d}.tar", "w")
                assert tar is not None
                for name, data in _members(
                    prepare_for_writing(sample), f"{count:08d}", image_format
                ):
                    _add(tar, name, data)
                count += 1
        finally:
            if tar is not None:
                tar.close()
    return count


def _members(sample: Sample, key: str, image_format: str) -> Iterator[tuple[str, bytes]]:
    record: dict[str, Any] = sample.to_json()
    record.pop("source")
    yield f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8")
    caption = next((t.content for t in sample.turns if t.role == "assistant"), None)
    if caption is not None:
        yield f"{key}.txt", caption.encode("utf-8")
    for i, image in enumerate(sample.images):
        data, ext = encode_image(image, image_format)
        yield (f"{key}.{ext}" if i == 0 else f"{key}.{i}.{ext}"), data


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # same samples, same bytes: shards are reproducible
    tar.addfile(info, io.BytesIO(data))
