"""Datasets written the way other tools write them (never with visto's writers).

Each writer makes 8 good records and 1 corrupt one (an image that does not decode), the
shapes issue 18 found visto could not read:

  webdataset  `webdataset.TarWriter` shards: KEY.jpg + KEY.txt + KEY.json {"caption", ...}
  parquet     HF `datasets`: an `Image` feature and a `text` (or `caption`) column
  llava       llava_v1_5_mix665k.json's layout, images under an --image_folder elsewhere
  coco        captions_train2017.json with its images in a folder elsewhere
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image

GOOD = 8
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
CORRUPT_JPEG = b"\xff\xd8\xff\xe0 this is not a JPEG"


def picture(i: int, size: int = 32) -> tuple[Image.Image, str]:
    """A square of one colour on grey, and its caption."""
    name = list(COLOURS)[i % len(COLOURS)]
    image = Image.new("RGB", (size + i, size), (128, 128, 128))  # widths differ: sizes are seen
    image.paste(COLOURS[name], (4, 4, size - 4, size - 4))
    return image, f"a {name} square on grey"


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_webdataset(out: Path) -> Path:
    """One shard of caption records written by webdataset's TarWriter; record 3 is corrupt."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    shard = out / "captions-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(GOOD + 1):
            image, caption = picture(i)
            data = CORRUPT_JPEG if i == 3 else image
            meta = {
                "caption": caption,
                "key": f"{i:09d}",
                "width": image.width,
                "status": "success",
            }
            sink.write({"__key__": f"{i:09d}", "jpg": data, "txt": caption, "json": meta})
    return shard


def write_hf_parquet(out: Path, caption_column: str = "text") -> Path:
    """A parquet file of HF `datasets` with an `Image` feature; row 5 is corrupt."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    images, captions = [], []
    for i in range(GOOD + 1):
        image, caption = picture(i)
        images.append({"bytes": CORRUPT_JPEG, "path": None} if i == 5 else image)
        captions.append(caption)
    dataset = Dataset.from_dict({"image": images, caption_column: captions})
    dataset = dataset.cast_column("image", ImageFeature())
    out.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(out))
    return out


def write_llava_mix(out: Path) -> tuple[Path, Path]:
    """(annotation JSON, image folder) in llava_v1_5_mix665k's layout: paths like
    `coco/train2017/NNN.jpg` under an image folder that is not beside the JSON; one record
    is text only (mix665k has ShareGPT ones), and one image is corrupt."""
    image_folder, json_path = out / "images", out / "annotations" / "mix.json"
    records = []
    for i in range(GOOD + 1):
        if i == 7:  # a text-only conversation, as in mix665k
            conversation = [
                {"from": "human", "value": "Say hello."},
                {"from": "gpt", "value": "Hello."},
            ]
            records.append({"id": f"text-{i}", "model": "", "conversations": conversation})
            continue
        image, caption = picture(i)
        relative = f"{'coco/train2017' if i % 2 else 'gqa/images'}/{i:012d}.jpg"
        (image_folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (image_folder / relative).write_bytes(CORRUPT_JPEG if i == 2 else jpeg_bytes(image))
        conversation = [
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": caption.split()[1]},
            {"from": "human", "value": "Describe the image."},
            {"from": "gpt", "value": caption},
        ]
        records.append({"id": f"{i:012d}", "image": relative, "conversations": conversation})
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(records))
    return json_path, image_folder


def write_coco_captions(out: Path) -> tuple[Path, Path]:
    """(captions_train2017.json, image folder elsewhere); image 4 is corrupt; two captions
    an image, in shuffled annotation order as COCO has them."""
    image_folder, json_path = out / "pictures", out / "annotations" / "captions_train2017.json"
    image_folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(GOOD + 1):
        image, caption = picture(i)
        name = f"{i + 100:012d}.jpg"
        (image_folder / name).write_bytes(CORRUPT_JPEG if i == 4 else jpeg_bytes(image))
        images.append(
            {"id": i + 100, "file_name": name, "width": image.width, "height": image.height}
        )
        for text in (caption, caption.replace("a ", "one ", 1)):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 100, "caption": text})
    random.Random(0).shuffle(annotations)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations})
    )
    return json_path, image_folder
