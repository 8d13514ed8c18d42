"""Real data formats, one schema: every source reads into `visto.data.sample.Sample`.

    from visto.data.formats import ReadStats, read_samples, write_samples

    stats = ReadStats()
    for sample in read_samples("llava_instruct.json", image_root="coco/train2017", stats=stats):
        ...
    print(stats.summary())                      # read 157710, skipped 2 (missing image: 2)

    write_samples(samples, "out/shards", "webdataset", max_samples_per_shard=1000)

Formats (one module each; their docstrings give the exact layout):

    llava       LLaVA conversation JSON / JSON lines + image folder     llava.py
    coco        COCO captions JSON + image folder                       coco.py
    webdataset  tar shards: KEY.json, KEY.txt, KEY.png, KEY.1.png, ...   webdataset.py
    parquet     HF-hub style: images as struct{bytes, path} + turns      parquet.py

Caption-only records (an image and a caption, no conversation) in any of them read as
samples of the caption task (captions.py).
    synth       the built-in synthetic world (a folder with world.json; read only)

Reading streams and is forgiving per record, strict per file: a malformed record is
skipped, logged with its file, key and reason, counted in `ReadStats`, and summarized
when the pass ends; a missing or unreadable file is a `UserError`. Samples come out
normalized (one `<image>` placeholder per image). Writing is atomic: the output directory
appears whole or not at all.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from pathlib import Path

from visto.data.sample import Sample
from visto.errors import UserError

from .coco import read_coco, write_coco
from .llava import read_llava, write_llava
from .parquet import read_parquet, write_parquet
from .stats import ReadStats
from .webdataset import SHARD_SUFFIXES, read_webdataset, write_webdataset

__all__ = ["FORMATS", "ReadStats", "infer_format", "read_samples", "write_samples"]

FORMATS = ("llava", "coco", "webdataset", "parquet", "synth")
KEYED_FORMATS = ("llava", "webdataset", "parquet")  # caption_key / image_key apply to these
WRITERS = {
    "llava": write_llava,
    "coco": write_coco,
    "webdataset": write_webdataset,
    "parquet": write_parquet,
}


def infer_format(path: str | Path) -> str:
    """The format of `path`, from its name, its folder's contents, or a JSON file's first byte."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.is_dir():
        if (path / "world.json").is_file():
            return "synth"
        # Only the top two levels are looked at: a LLaVA folder may hold 100k images.
        names = [p.name for p in path.iterdir()]
        if any(n.endswith(SHARD_SUFFIXES) for n in names):
            return "webdataset"
        if any(path.glob("*.parquet")) or any(path.glob("*/*.parquet")):
            return "parquet"
        if any(path.glob("*.jsonl")):
            return "llava"
        json_files = sorted(path.glob("*.json"))
        if len(json_files) == 1:
            return infer_format(json_files[0])
        raise UserError(
            f"cannot tell the format of folder {path}; pass fmt= one of {FORMATS} "
            "(or give the annotation file itself)"
        )
    suffix = path.suffix.lower()
    if path.name.lower().endswith(SHARD_SUFFIXES):
        return "webdataset"
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".jsonl":
        return "llava"
    if suffix == ".json":
        # LLaVA data is a JSON list, COCO a JSON object: the first character tells them apart.
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096).lstrip("\ufeff \t\r\n")
        if head.startswith("["):
            return "llava"
        if head.startswith("{"):
            return "coco"
    raise UserError(f"cannot tell the format of {path}; pass fmt= one of {FORMATS}")


def read_samples(
    path: str | Path,
    fmt: str | None = None,
    *,
    stats: ReadStats | None = None,
    image_root: str | Path | None = None,
    caption_key: str | None = None,
    image_key: str | None = None,
    split: str | None = None,
    tasks: list[str] | None = None,
    seed: int = 0,
) -> Iterator[Sample]:
    """Stream the samples at `path`.

    fmt: one of FORMATS, or None to infer it from the path.
    stats: filled in as the pass goes (read / skipped / reasons); pass one to inspect it.
    image_root: where relative image paths point (llava, coco); default beside the JSON.
    caption_key: the field / column / WebDataset extension holding a caption-only record's
        caption (llava, webdataset, parquet); default "txt" files, then "caption", "text",
        "captions". Naming it reads every record as a caption, even one with turns.
    image_key: the field / column / extension holding the image(s) (llava: "image";
        parquet: "images", then "image"; webdataset: png, jpg, jpeg, webp).
    split, tasks, seed: passed to the synthetic world (synth only; split defaults to "train").
    """
    path = Path(path)
    fmt = fmt or infer_format(path)
    if fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r}; use one of {FORMATS}")
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path to the {fmt} data")
    if image_root is not None and fmt not in ("llava", "coco"):
        raise UserError(f"image_root applies to llava and coco data, not {fmt}")
    if (caption_key is not None or image_key is not None) and fmt not in KEYED_FORMATS:
        raise UserError(
            f"caption_key and image_key name fields of {', '.join(KEYED_FORMATS)} data; "
            f"{fmt} data has fixed names"
        )
    if (split is not None or tasks is not None) and fmt != "synth":
        raise UserError(
            f"split= and tasks= select from the synthetic world; {fmt} data has no splits: "
            "give the file or folder of the split you want"
        )
    stats = stats if stats is not None else ReadStats()
    if fmt == "synth":
        samples = _read_synth(path, stats, split or "train", tasks, seed)
    elif fmt == "llava":
        samples = read_llava(path, stats, image_root, caption_key, image_key)
    elif fmt == "coco":
        samples = read_coco(path, stats, image_root=image_root)
    elif fmt == "webdataset":
        samples = read_webdataset(path, stats, caption_key, image_key)
    else:
        samples = read_parquet(path, stats, caption_key, image_key)
    return _summarized(samples, stats, path)


def _summarized(samples: Iterator[Sample], stats: ReadStats, path: Path) -> Iterator[Sample]:
    yield from samples
    stats.log_summary(path)


def _read_synth(
    path: Path, stats: ReadStats, split: str, tasks: list[str] | None, seed: int
) -> Iterator[Sample]:
    # Imported here: the synthetic world's renderer is only needed when it is read.
    from visto.data.synth import iter_samples

    for sample in iter_samples(path, split, tasks=tasks, seed=seed):
        stats.read += 1
        yield sample


def write_samples(samples: Iterable[Sample], out: str | Path, fmt: str, **options) -> int:
    """Write `samples` to the directory `out` in `fmt`; returns how many were written.

    Options per format (all take image_format="png"|"jpeg" and overwrite=False):
      llava: jsonl=False            webdataset: max_samples_per_shard=1000
      coco: -                       parquet: row_group_size=100, max_samples_per_file=10000
    PNG (the default) is lossless, so reading back gives the same pixels.
    """
    if fmt not in WRITERS:
        raise UserError(f"cannot write {fmt!r}; writable formats are {sorted(WRITERS)}")
    writer = WRITERS[fmt]
    accepted = [p for p in inspect.signature(writer).parameters if p not in ("samples", "out")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UserError(f"unknown option(s) {unknown} for {fmt}; it accepts {accepted}")
    return writer(samples, out, **options)
