"""Round trips, format inference and whole-file errors of visto.data.formats."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from visto.data.formats import ReadStats, infer_format, read_samples, write_samples
from visto.data.formats._common import caption_turns
from visto.data.sample import Sample, Turn, samples_equal
from visto.errors import UserError


def noise_image(seed: int, size: tuple[int, int] = (12, 9)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def conversation_samples() -> list[Sample]:
    """One image, several images with several turns and a system turn, and text only."""
    return [
        Sample(
            "one",
            [noise_image(0)],
            [Turn("user", "<image>\nWhat colour is the circle?"), Turn("assistant", "red")],
            truth={"objects": [{"shape": "circle", "box": [1, 2, 5, 6]}], "label": "x"},
        ),
        Sample(
            "multi/2",
            [noise_image(1), noise_image(2, (7, 15)), noise_image(3)],
            [
                Turn("system", "You compare images."),
                Turn("user", "<image> and <image>: which is brighter?"),
                Turn("assistant", "The first."),
                Turn("user", "And this one? <image>"),
                Turn("assistant", "Darker, ünïcode ✓."),
            ],
        ),
        Sample("text", [], [Turn("user", "Say hi."), Turn("assistant", "hi")], truth={"n": 1}),
    ]


def caption_samples() -> list[Sample]:
    """Samples in the form COCO reads back: a caption prompt, the first caption, all captions."""
    return [
        Sample("9", [noise_image(4)], caption_turns("A cat."), {"captions": ["A cat.", "A pet."]}),
        Sample(
            "img-b",
            [noise_image(5, (20, 10))],
            caption_turns("Two squares."),
            {"captions": ["Two squares."], "objects": [{"shape": "square"}]},
        ),
    ]


def assert_same(expected: list[Sample], got: list[Sample]) -> None:
    assert [s.id for s in got] == [s.id for s in expected]
    for a, b in zip(expected, got, strict=True):
        assert samples_equal(a, b), (a, b)


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("llava", {}),
        ("llava", {"jsonl": True}),
        ("webdataset", {"max_samples_per_shard": 2}),
        ("parquet", {"row_group_size": 2, "max_samples_per_file": 2}),
    ],
)
def test_round_trip_conversations(tmp_path, fmt, options):
    samples = conversation_samples() + caption_samples()
    out = tmp_path / "data"
    assert write_samples(samples, out, fmt, **options) == len(samples)
    stats = ReadStats()
    got = list(read_samples(out, stats=stats))  # format inferred from the folder
    assert_same(samples, got)
    assert (stats.read, stats.skipped) == (len(samples), 0)
    assert all(s.source.startswith(fmt) for s in got)


def test_round_trip_coco(tmp_path):
    samples = caption_samples()
    assert write_samples(samples, tmp_path / "coco", "coco") == 2
    assert infer_format(tmp_path / "coco") == "coco"
    assert_same(samples, list(read_samples(tmp_path / "coco")))


def test_coco_writer_skips_what_coco_cannot_hold(tmp_path, caplog):
    samples = conversation_samples()  # "one" fits; "multi/2" has 3 images, "text" none
    assert write_samples(samples, tmp_path / "coco", "coco") == 1
    assert "sample 'multi/2' has 3 image(s)" in caplog.text
    (got,) = read_samples(tmp_path / "coco")
    # Its assistant answer becomes its caption; the other truth rides along.
    assert got.id == "one"
    assert got.turns == caption_turns("red")
    assert got.truth == {**samples[0].truth, "captions": ["red"]}


def test_samples_without_placeholders_are_written_normalized(tmp_path):
    sample = Sample("p", [noise_image(6)], [Turn("user", "Describe."), Turn("assistant", "dots")])
    write_samples([sample], tmp_path / "out", "llava")
    record = json.loads((tmp_path / "out" / "data.json").read_text())[0]
    assert record["conversations"][0] == {"from": "human", "value": "<image>\nDescribe."}
    (got,) = read_samples(tmp_path / "out")
    assert samples_equal(got, sample.normalized())


def test_llava_output_is_what_llava_loaders_read(tmp_path):
    """LLaVA's LazySupervisedDataset opens os.path.join(image_folder, record["image"])."""
    write_samples(conversation_samples(), tmp_path / "out", "llava")
    records = json.loads((tmp_path / "out" / "data.json").read_text())
    assert isinstance(records[0]["image"], str) and isinstance(records[1]["image"], list)
    assert "image" not in records[2]
    assert [m["from"] for m in records[1]["conversations"]] == ["system", "human", "gpt"] + [
        "human",
        "gpt",
    ]
    image = Image.open(tmp_path / "out" / records[0]["image"]).convert("RGB")
    assert image.tobytes() == noise_image(0).tobytes()


def test_jpeg_option_writes_jpeg(tmp_path):
    write_samples(caption_samples(), tmp_path / "w", "webdataset", image_format="jpeg")
    (got, _) = read_samples(tmp_path / "w")
    assert got.images[0].size == (12, 9)
    assert got.turns == caption_samples()[0].turns


def test_write_is_atomic(tmp_path):
    def failing():
        yield from conversation_samples()
        raise RuntimeError("disk on fire")

    for fmt in ("llava", "coco", "webdataset", "parquet"):
        with pytest.raises(RuntimeError):
            write_samples(failing(), tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()
    assert list(tmp_path.iterdir()) == []  # no temp directories left behind


def test_write_refuses_existing_output_unless_overwrite(tmp_path):
    write_samples(caption_samples(), tmp_path / "o", "parquet")
    with pytest.raises(UserError, match="already exists"):
        write_samples(caption_samples()[:1], tmp_path / "o", "parquet")
    assert write_samples(caption_samples()[:1], tmp_path / "o", "parquet", overwrite=True) == 1
    assert len(list(read_samples(tmp_path / "o"))) == 1


def test_write_rejects_unknown_format_and_options(tmp_path):
    with pytest.raises(UserError, match="writable formats"):
        write_samples([], tmp_path / "x", "synth")
    with pytest.raises(UserError, match="max_samples_per_shard"):
        write_samples([], tmp_path / "x", "webdataset", shard_size=3)


def test_writer_rejects_mismatched_placeholders(tmp_path):
    bad = Sample("bad", [noise_image(0)], [Turn("user", "<image><image>"), Turn("assistant", "x")])
    with pytest.raises(UserError, match="'bad'"):
        write_samples([bad], tmp_path / "x", "llava")
    assert not (tmp_path / "x").exists()


def test_infer_format(tmp_path):
    write_samples(conversation_samples(), tmp_path / "llava", "llava")
    write_samples(conversation_samples(), tmp_path / "jsonl", "llava", jsonl=True)
    write_samples(caption_samples(), tmp_path / "coco", "coco")
    write_samples(conversation_samples(), tmp_path / "wds", "webdataset")
    write_samples(conversation_samples(), tmp_path / "pq", "parquet")
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "world.json").write_text("{}")
    assert infer_format(tmp_path / "llava") == "llava"
    assert infer_format(tmp_path / "llava" / "data.json") == "llava"
    assert infer_format(tmp_path / "jsonl" / "data.jsonl") == "llava"
    assert infer_format(tmp_path / "coco" / "captions.json") == "coco"
    assert infer_format(tmp_path / "wds") == "webdataset"
    assert infer_format(tmp_path / "wds" / "shard-000000.tar") == "webdataset"
    assert infer_format(tmp_path / "pq") == "parquet"
    assert infer_format(tmp_path / "pq" / "part-00000.parquet") == "parquet"
    assert infer_format(tmp_path / "world") == "synth"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="pass fmt="):
        infer_format(tmp_path / "empty")


def test_missing_and_unreadable_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_samples(tmp_path / "nope.json")
    with pytest.raises(UserError, match="unknown data format"):
        read_samples(tmp_path, "csv")
    cases = {
        "llava": ("bad.json", b"[{not json"),
        "coco": ("c.json", b'{"images": []}'),
        "webdataset": ("s.tar", b"this is not a tar file at all" * 40),
        "parquet": ("p.parquet", b"PAR1 garbage"),
    }
    for fmt, (name, data) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=name):
            list(read_samples(tmp_path / name, fmt))


def test_options_that_do_not_apply_are_user_errors(tmp_path):
    write_samples(caption_samples(), tmp_path / "w", "webdataset")
    with pytest.raises(UserError, match="image_root"):
        read_samples(tmp_path / "w", image_root=tmp_path)
    with pytest.raises(UserError, match="split="):
        read_samples(tmp_path / "w", split="val")


def test_image_root_points_llava_at_another_folder(tmp_path):
    write_samples(caption_samples(), tmp_path / "out", "llava")
    (tmp_path / "out" / "images").rename(tmp_path / "pictures")
    records = json.loads((tmp_path / "out" / "data.json").read_text())
    for r in records:
        r["image"] = r["image"].removeprefix("images/")
    (tmp_path / "out" / "data.json").write_text(json.dumps(records))
    got = list(read_samples(tmp_path / "out" / "data.json", image_root=tmp_path / "pictures"))
    assert_same(caption_samples(), got)


def test_synth_world_reads_and_converts(tmp_path):
    synth = pytest.importorskip("visto.data.synth")
    synth.generate_world(synth.WorldConfig(n=6, size=48, seed=3), tmp_path / "world", workers=1)
    direct = list(synth.iter_samples(tmp_path / "world", "train", tasks=["caption"], seed=1))
    stats = ReadStats()
    via_formats = list(
        read_samples(tmp_path / "world", split="train", tasks=["caption"], seed=1, stats=stats)
    )
    assert direct and stats.read == len(direct)
    assert_same(direct, via_formats)
    # The synthetic world converts to a real format and back unchanged.
    write_samples(via_formats, tmp_path / "shards", "webdataset")
    assert_same(direct, list(read_samples(tmp_path / "shards")))


def test_gzipped_shards_are_read(tmp_path):
    import gzip

    write_samples(conversation_samples(), tmp_path / "w", "webdataset")
    shard = tmp_path / "w" / "shard-000000.tar"
    (tmp_path / "w" / "shard-000000.tar.gz").write_bytes(gzip.compress(shard.read_bytes()))
    shard.unlink()
    assert infer_format(tmp_path / "w") == "webdataset"
    assert_same(conversation_samples(), list(read_samples(tmp_path / "w")))
