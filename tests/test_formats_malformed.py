"""A malformed record in any format is skipped, logged (file, key, reason) and counted."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_formats import caption_samples, noise_image
from visto.data.formats import ReadStats, read_samples, write_samples
from visto.data.formats.parquet import SCHEMA
from visto.data.sample import image_to_png_bytes

CORRUPT_PNG = image_to_png_bytes(noise_image(0))[:60]  # a PNG header, then nothing


@pytest.fixture(autouse=True)
def _log_warnings(caplog):
    caplog.set_level(logging.INFO, logger="visto.data.formats")


def read_all(path, fmt=None, **kw):
    stats = ReadStats()
    return list(read_samples(path, fmt, stats=stats, **kw)), stats


def human_gpt(question: str, answer: str = "ok") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_llava_json_skips_each_kind_of_bad_record(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "good.png").write_bytes(image_to_png_bytes(noise_image(1)))
    (tmp_path / "images" / "broken.png").write_bytes(CORRUPT_PNG)
    records = [
        {"id": "good", "image": "images/good.png", "conversations": human_gpt("<image>\nHi")},
        {"id": "gone", "image": "images/missing.png", "conversations": human_gpt("<image>\nHi")},
        {"id": "corrupt", "image": "images/broken.png", "conversations": human_gpt("<image>\nx")},
        {"id": "types", "image": "images/good.png", "conversations": "not a list"},
        {"id": "speaker", "conversations": [{"from": "robot", "value": "beep"}]},
        {"id": "count", "image": "images/good.png", "conversations": human_gpt("<image><image>")},
        {"id": "escape", "image": "../../etc/passwd", "conversations": human_gpt("<image>")},
        ["not", "an", "object"],
        {"id": "text-only", "conversations": human_gpt("Hello")},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    samples, stats = read_all(tmp_path / "data.json")
    assert [s.id for s in samples] == ["good", "text-only"]
    assert (stats.read, stats.skipped) == (2, 7)
    assert stats.reasons == {
        "missing image": 1,
        "bad image": 1,
        "bad fields": 4,
        "placeholder mismatch": 1,
    }
    assert "data.json: record #1 (id gone): image 'images/missing.png' not found" in caplog.text
    assert "record #5 (id count)" in caplog.text and "placeholder" in caplog.text
    assert "read 2, skipped 7 (bad fields: 4" in caplog.text  # the end-of-pass summary


def test_llava_jsonl_skips_bad_json_lines(tmp_path, caplog):
    good = {"id": "a", "conversations": human_gpt("Hi")}
    lines = [json.dumps(good).encode(), b"{this is not json", b"", b'{"id": "\xff\xfe"}']
    lines.append(json.dumps({**good, "id": "b"}).encode())
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines))
    samples, stats = read_all(tmp_path / "d.jsonl")
    assert [s.id for s in samples] == ["a", "b"]
    assert stats.reasons == {"bad json": 2}  # the second: not UTF-8
    assert "d.jsonl: record line 2: not valid JSON" in caplog.text


def test_coco_skips_bad_images_and_annotations(tmp_path, caplog):
    write_samples(caption_samples(), tmp_path / "coco", "coco")
    path = tmp_path / "coco" / "captions.json"
    coco = json.loads(path.read_text())
    (tmp_path / "coco" / "images" / "broken.png").write_bytes(CORRUPT_PNG)
    coco["images"] += [
        {"id": 100, "file_name": "absent.png", "width": 4, "height": 4},
        {"id": 101, "file_name": "broken.png", "width": 4, "height": 4},
        {"id": 102, "file_name": "broken.png", "width": 4, "height": 4},  # no caption
        {"file_name": "no-id.png"},
    ]
    coco["annotations"] += [
        {"id": 50, "image_id": 100, "caption": "gone"},
        {"id": 51, "image_id": 101, "caption": "corrupt"},
        {"id": 52, "image_id": 9, "caption": ["not", "a", "string"]},
    ]
    path.write_text(json.dumps(coco))
    samples, stats = read_all(path)
    assert [s.id for s in samples] == ["9", "img-b"]
    assert samples[0].truth["captions"] == ["A cat.", "A pet."]  # the bad caption is not in
    assert stats.reasons == {"missing image": 1, "bad image": 1, "no captions": 1, "bad fields": 2}
    assert "captions.json: record images[4] (id 102): no caption annotation" in caplog.text
    assert "record annotations[5]" in caplog.text


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_skips_bad_samples_and_keeps_going(tmp_path, caplog):
    write_samples(caption_samples(), tmp_path / "shards", "webdataset")
    png = image_to_png_bytes(noise_image(7))
    turns = {
        "turns": [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}]
    }
    with tarfile.open(tmp_path / "shards" / "shard-000001.tar", "w") as tar:
        add_member(tar, "k1.png", CORRUPT_PNG)
        add_member(tar, "k1.json", json.dumps(turns).encode())
        add_member(tar, "k2.png", png)
        add_member(tar, "k2.json", b"{oops")
        add_member(tar, "k3.png", png)
        add_member(tar, "k3.2.png", png)  # image 1 is missing
        add_member(tar, "k3.json", json.dumps(turns).encode())
        add_member(tar, "k4.png", png)
        add_member(tar, "k4.cls", b"3")  # nothing says what the sample is
        add_member(tar, "k5.png", png)
        add_member(tar, "k5.txt", b"A caption from a CLIP-style dataset.\n")
    samples, stats = read_all(tmp_path / "shards")
    assert [s.id for s in samples] == ["9", "img-b", "k5"]
    assert samples[2].truth == {"captions": ["A caption from a CLIP-style dataset."]}
    assert stats.reasons == {"bad image": 1, "bad json": 1, "bad fields": 2}
    assert "shard-000001.tar: record k2: k2.json is not valid JSON" in caplog.text


def test_webdataset_truncated_shard_is_read_up_to_the_damage(tmp_path, caplog):
    samples = caption_samples() * 3
    write_samples(samples, tmp_path / "shards", "webdataset", max_samples_per_shard=3)
    shard = tmp_path / "shards" / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        second_image = [m for m in tar.getmembers() if m.name.endswith(".png")][1]
    cut = second_image.offset_data + second_image.size // 2  # in the middle of a member
    shard.write_bytes(shard.read_bytes()[:cut])
    got, stats = read_all(tmp_path / "shards")
    # The first shard's first sample, then the whole second shard.
    assert [s.id for s in got] == ["9", "img-b", "9", "img-b"]
    assert stats.reasons["truncated file"] == 1
    assert "shard-000000.tar" in caplog.text and "damaged" in caplog.text


def test_parquet_skips_bad_rows(tmp_path, caplog):
    png = image_to_png_bytes(noise_image(8))
    conv = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    rows = [
        {
            "id": "good",
            "images": [{"bytes": png, "path": None}],
            "conversations": conv,
            "truth": None,
        },
        {
            "id": "corrupt",
            "images": [{"bytes": CORRUPT_PNG, "path": "x.png"}],
            "conversations": conv,
            "truth": None,
        },
        {
            "id": "truth",
            "images": [{"bytes": png, "path": None}],
            "conversations": conv,
            "truth": "{no",
        },
        {"id": "count", "images": [], "conversations": conv, "truth": None},
        {
            "id": "speaker",
            "images": [],
            "conversations": [{"from": "bot", "value": "x"}],
            "truth": None,
        },
        {
            "id": "pathonly",
            "images": [{"bytes": None, "path": "nowhere.png"}],
            "conversations": conv,
            "truth": None,
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp_path / "d.parquet")
    samples, stats = read_all(tmp_path / "d.parquet")
    assert [s.id for s in samples] == ["good"]
    assert stats.reasons == {
        "bad image": 1,
        "bad json": 1,
        "placeholder mismatch": 1,
        "bad fields": 1,
        "missing image": 1,
    }
    assert "d.parquet: record row 1: images[0]" in caplog.text


def test_parquet_reads_hub_style_single_image_and_messages(tmp_path):
    """A single `image` struct column and chat `messages` with content parts."""
    png = image_to_png_bytes(noise_image(9))
    (tmp_path / "side.png").write_bytes(png)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "text": None}, {"type": "text", "text": "q?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "a."}]},
    ]
    table = pa.Table.from_pylist(
        [
            {"image": {"bytes": png, "path": "a.png"}, "messages": messages},
            {"image": {"bytes": None, "path": "side.png"}, "messages": messages},
        ]
    )
    pq.write_table(table, tmp_path / "hub.parquet")
    samples, stats = read_all(tmp_path / "hub.parquet")
    assert stats.skipped == 0 and [s.id for s in samples] == ["row 0", "row 1"]
    assert samples[0].turns[0].content == "<image>\nq?"
    assert samples[1].images[0].tobytes() == noise_image(9).tobytes()


def test_only_the_first_skips_are_logged_one_by_one(tmp_path, caplog):
    records = [{"id": i, "conversations": "bad"} for i in range(50)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    _, stats = read_all(tmp_path / "d.json")
    assert stats.skipped == 50 and len(stats.messages) == 20
    assert caplog.text.count("(skipped)") == 20
    assert "read 0, skipped 50 (bad fields: 50)" in caplog.text
