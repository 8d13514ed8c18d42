"""COCO captions JSON with an image folder (the `captions_train2017.json` layout).

    {"images": [{"id": 9, "file_name": "000000000009.jpg", "width": 640, "height": 480}],
     "annotations": [{"id": 1, "image_id": 9, "caption": "A plate of food."}, ...]}

How captions map to a `Sample`: one sample per image, `id` = the image id as a string;
its turns are a caption prompt and the image's first caption (in file order),

    [user "<image>\\nDescribe the image briefly.", assistant "<first caption>"]

and all its captions are in `truth["captions"]` (what caption metrics compare against).
An image without any caption is skipped and counted ("no captions").

Images are looked up, in order, in `image_root` if given, else in `images/` beside the JSON,
beside the JSON, and in `../train2017/` for a file named `captions_train2017.json`.

Writing keeps what COCO can hold: samples with exactly one image and at least one caption
(`truth["captions"]`, else the sample's assistant turns). Others are skipped with a warning.
Image ids are the sample ids when those are unused integers, else fresh integers; the
original id and any other truth ride along as `visto_id` / `visto_truth` in the image
record, which pycocotools and pycocoevalcap ignore.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from visto.data.sample import Sample
from visto.errors import UserError

from ._common import (
    caption_turns,
    check_truth,
    encode_image,
    find_annotation_file,
    load_image_file,
    make_sample,
    output_directory,
    resolve_image_path,
)
from .stats import BAD_FIELDS, NO_CAPTIONS, BadRecord, ReadStats, log

ANNOTATION_FILE = "captions.json"


def read_coco(
    path: Path, stats: ReadStats, image_root: str | Path | None = None
) -> Iterator[Sample]:
    json_path = find_annotation_file(path, (".json",), "COCO")
    data = _load(json_path)
    captions = _captions_by_image(data["annotations"], json_path, stats)
    roots = [Path(image_root)] if image_root is not None else _default_roots(json_path)
    for index, image in enumerate(data["images"]):
        key = f"images[{index}]"
        try:
            sample = _sample_from_image(image, captions, roots, f"coco:{json_path.name}")
        except BadRecord as e:
            if isinstance(image, dict) and "id" in image:
                key += f" (id {image['id']})"
            stats.skip(json_path, key, e)
            continue
        stats.read += 1
        yield sample


def _load(json_path: Path) -> dict[str, Any]:
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {json_path}: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{json_path} is not valid JSON: {e}") from None
    if not (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("annotations"), list)
    ):
        raise UserError(
            f'{json_path} is not COCO captions: it needs an object with "images" and '
            '"annotations" lists (a JSON list is LLaVA data: use fmt="llava")'
        )
    return data


def _captions_by_image(
    annotations: list[Any], json_path: Path, stats: ReadStats
) -> dict[Any, list[str]]:
    captions: dict[Any, list[str]] = defaultdict(list)
    for index, ann in enumerate(annotations):
        if (
            isinstance(ann, dict)
            and isinstance(ann.get("image_id"), (int, str))
            and isinstance(ann.get("caption"), str)
        ):
            captions[ann["image_id"]].append(ann["caption"])
        else:
            error = BadRecord(
                BAD_FIELDS, 'an annotation needs an integer "image_id" and a string "caption"'
            )
            stats.skip(json_path, f"annotations[{index}]", error)
    return captions


def _default_roots(json_path: Path) -> list[Path]:
    roots = [json_path.parent / "images", json_path.parent]
    if "_" in json_path.stem:  # captions_train2017.json -> ../train2017/
        roots.append(json_path.parent.parent / json_path.stem.split("_", 1)[1])
    return roots


def _sample_from_image(
    image: Any, captions: dict[Any, list[str]], roots: list[Path], source: str
) -> Sample:
    if not isinstance(image, dict) or not isinstance(image.get("id"), (int, str)):
        raise BadRecord(BAD_FIELDS, 'an image record needs an "id" and a "file_name"')
    if not captions.get(image["id"]):
        raise BadRecord(NO_CAPTIONS, "no caption annotation refers to this image")
    sample_id = image.get("visto_id", str(image["id"]))
    if not isinstance(sample_id, str):
        raise BadRecord(BAD_FIELDS, '"visto_id" must be a string')
    truth = dict(check_truth(image.get("visto_truth")) or {})
    truth["captions"] = list(captions[image["id"]])
    pixels = load_image_file(resolve_image_path(image.get("file_name"), roots))
    return make_sample(sample_id, [pixels], caption_turns(truth["captions"][0]), truth, source)


def write_coco(
    samples: Iterable[Sample],
    out: str | Path,
    *,
    image_format: str = "png",
    overwrite: bool = False,
) -> int:
    """Write `OUT/captions.json` and `OUT/images/`; returns how many samples were written."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    used_ids: set[int] = set()
    next_id = 1
    skipped = 0
    with output_directory(out, overwrite) as tmp:
        (tmp / "images").mkdir()
        for sample in samples:
            captions = _captions_of(sample)
            if len(sample.images) != 1 or not captions:
                skipped += 1
                log.warning(
                    "COCO holds one image and its captions per sample; sample %r has %d image(s) "
                    "and %d caption(s): not written",
                    sample.id,
                    len(sample.images),
                    len(captions),
                )
                continue
            if (
                sample.id.isdecimal()
                and str(int(sample.id)) == sample.id
                and int(sample.id) not in used_ids
            ):
                coco_id = int(sample.id)
            else:
                while next_id in used_ids:
                    next_id += 1
                coco_id = next_id
            used_ids.add(coco_id)
            data, ext = encode_image(sample.images[0], image_format)
            file_name = f"{coco_id:012d}.{ext}"
            (tmp / "images" / file_name).write_bytes(data)
            width, height = sample.images[0].size
            record: dict[str, Any] = {
                "id": coco_id,
                "file_name": file_name,
                "width": width,
                "height": height,
            }
            if sample.id != str(coco_id):
                record["visto_id"] = sample.id
            extra_truth = {k: v for k, v in (sample.truth or {}).items() if k != "captions"}
            if extra_truth:
                record["visto_truth"] = extra_truth
            images.append(record)
            for caption in captions:
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": coco_id, "caption": caption}
                )
        coco = {
            "info": {"description": "written by visto", "version": "1.0"},
            "licenses": [],
            "type": "captions",
            "images": images,
            "annotations": annotations,
        }
        with open(tmp / ANNOTATION_FILE, "w", encoding="utf-8") as f:
            json.dump(coco, f, ensure_ascii=False)
    if skipped:
        log.warning(
            "COCO: wrote %d sample(s), skipped %d that COCO cannot hold", len(images), skipped
        )
    return len(images)


def _captions_of(sample: Sample) -> list[str]:
    captions = (sample.truth or {}).get("captions")
    if isinstance(captions, list) and captions and all(isinstance(c, str) for c in captions):
        return captions
    return [t.content for t in sample.turns if t.role == "assistant"]
