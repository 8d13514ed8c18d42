"""What we write is read by the ecosystem's own libraries: webdataset, pyarrow, pycocotools."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from test_formats import caption_samples, conversation_samples
from visto.data.formats import write_samples
from visto.data.sample import same_pixels


def test_webdataset_library_reads_our_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    samples = conversation_samples() + caption_samples()
    write_samples(samples, tmp_path / "shards", "webdataset", max_samples_per_shard=2)
    shards = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    assert [p.rsplit("/", 1)[1] for p in shards] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("pil")
    got = list(dataset)
    assert len(got) == len(samples)
    for sample, item in zip(samples, got, strict=True):
        record = item["json"]
        assert record["id"] == sample.id
        assert record["turns"] == [{"role": t.role, "content": t.content} for t in sample.turns]
        images = [item[k] for k in ["png"] + [f"{i}.png" for i in range(1, 10)] if k in item]
        assert len(images) == len(sample.images)
        assert all(same_pixels(a, b) for a, b in zip(images, sample.images, strict=True))
        if any(t.role == "assistant" for t in sample.turns):  # the caption open_clip reads
            assert item["txt"] == next(t.content for t in sample.turns if t.role == "assistant")


def test_parquet_columns_read_with_pyarrow(tmp_path):
    samples = conversation_samples()
    write_samples(samples, tmp_path / "pq", "parquet", row_group_size=2)
    path = tmp_path / "pq" / "part-00000.parquet"
    file = pq.ParquetFile(path)
    assert file.metadata.num_row_groups == 2  # 3 rows in groups of 2: readers can stream
    schema = file.schema_arrow
    assert str(schema.field("images").type) == "list<element: struct<bytes: binary, path: string>>"
    assert str(schema.field("conversations").type) == (
        "list<element: struct<from: string, value: string>>"
    )
    rows = pq.read_table(path).to_pylist()
    assert [r["id"] for r in rows] == [s.id for s in samples]
    assert [len(r["images"]) for r in rows] == [1, 3, 0]
    assert rows[1]["conversations"][1] == {"from": "human", "value": samples[1].turns[1].content}
    assert json.loads(rows[0]["truth"]) == samples[0].truth and rows[1]["truth"] is None


def check_coco_captions_structure(coco: dict) -> None:
    """The keys and types pycocotools' COCO() and pycocoevalcap's COCOEvalCap rely on."""
    assert isinstance(coco["info"], dict) and isinstance(coco["licenses"], list)
    image_ids = [img["id"] for img in coco["images"]]
    assert len(set(image_ids)) == len(image_ids)
    for img in coco["images"]:
        assert isinstance(img["id"], int) and isinstance(img["file_name"], str)
        assert isinstance(img["width"], int) and isinstance(img["height"], int)
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    for ann in coco["annotations"]:
        assert isinstance(ann["id"], int) and ann["image_id"] in image_ids
        assert isinstance(ann["caption"], str)


def test_coco_output_has_pycocotools_structure(tmp_path):
    write_samples(caption_samples(), tmp_path / "coco", "coco")
    coco = json.loads((tmp_path / "coco" / "captions.json").read_text())
    check_coco_captions_structure(coco)
    # Integer sample ids are kept as image ids; others get a fresh id and keep theirs aside.
    assert [(img["id"], img.get("visto_id")) for img in coco["images"]] == [(9, None), (1, "img-b")]
    assert (tmp_path / "coco" / "images" / coco["images"][0]["file_name"]).is_file()


def test_pycocotools_loads_our_coco_and_scores_results_against_it(tmp_path):
    coco_api = pytest.importorskip("pycocotools.coco")
    write_samples(caption_samples(), tmp_path / "coco", "coco")
    gt = coco_api.COCO(str(tmp_path / "coco" / "captions.json"))
    assert sorted(gt.getImgIds()) == [1, 9]
    assert [a["caption"] for a in gt.loadAnns(gt.getAnnIds(imgIds=[9]))] == ["A cat.", "A pet."]
    # pycocoevalcap's path: a results list of {"image_id", "caption"} loaded against it.
    results = gt.loadRes([{"image_id": 9, "caption": "A cat."}, {"image_id": 1, "caption": "x"}])
    assert sorted(results.getImgIds()) == [1, 9]
