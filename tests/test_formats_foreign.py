"""Datasets written by other tools read into samples: caption sets become the caption task,
conversations keep their turns, images are found through image_root, names are settable."""

from __future__ import annotations

import json

import pytest

import foreign_data
from visto.data.formats import ReadStats, read_samples
from visto.data.formats._common import CAPTION_PROMPT
from visto.errors import UserError


def read_all(path, **options):
    stats = ReadStats()
    return list(read_samples(path, stats=stats, **options)), stats


def assert_caption_sample(sample, caption: str) -> None:
    assert [t.role for t in sample.turns] == ["user", "assistant"]
    assert sample.turns[0].content == f"<image>\n{CAPTION_PROMPT}"
    assert sample.turns[1].content == caption
    assert sample.truth["captions"][0] == caption
    assert len(sample.images) == 1 and sample.images[0].mode == "RGB"


def test_webdataset_caption_shards_from_tarwriter(tmp_path):
    shard = foreign_data.write_webdataset(tmp_path / "wds")
    samples, stats = read_all(shard.parent)
    assert (stats.read, stats.skipped, dict(stats.reasons)) == (8, 1, {"bad image": 1})
    assert "000000003.jpg" in stats.messages[0]
    assert [s.id for s in samples] == [f"{i:09d}" for i in range(9) if i != 3]
    for sample in samples:
        i = int(sample.id)
        image, caption = foreign_data.picture(i)
        assert_caption_sample(sample, caption)
        assert sample.images[0].size == image.size


def test_webdataset_caption_from_json_alone_or_named_keys(tmp_path):
    import webdataset as wds

    image, caption = foreign_data.picture(0)
    frame = foreign_data.jpeg_bytes(image)
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        sink.write({"__key__": "k0", "png": image, "json": {"caption": caption}})
        sink.write({"__key__": "k1", "png": image, "json": {"alt": "alt text"}, "alt": "alt text"})
        sink.write({"__key__": "k2", "frame": frame, "json": {"caption": caption}})
    samples, stats = read_all(tmp_path / "a.tar")
    assert [s.id for s in samples] == ["k0"] and stats.reasons == {
        "bad fields": 1,
        "missing image": 1,
    }
    assert_caption_sample(samples[0], caption)
    assert "it has ['alt']" in stats.messages[0] and "data.caption_key" in stats.messages[0]
    assert "have: ['frame', 'json']" in stats.messages[1] and "data.image_key" in stats.messages[1]
    samples, stats = read_all(tmp_path / "a.tar", caption_key="alt")
    assert [s.turns[1].content for s in samples] == ["alt text"]  # k0 and k2 have no "alt"
    samples, stats = read_all(tmp_path / "a.tar", image_key="frame")
    assert [s.id for s in samples] == ["k2"]


@pytest.mark.parametrize("column", ["text", "caption"])
def test_hf_datasets_parquet_with_an_image_feature(tmp_path, column):
    path = foreign_data.write_hf_parquet(tmp_path / "train.parquet", caption_column=column)
    samples, stats = read_all(path)
    assert (stats.read, stats.skipped, dict(stats.reasons)) == (8, 1, {"bad image": 1})
    assert "row 5" in stats.messages[0]
    for sample in samples:
        i = int(sample.id.removeprefix("row "))
        assert_caption_sample(sample, foreign_data.picture(i)[1])
        assert sample.images[0].size == foreign_data.picture(i)[0].size


def test_hf_datasets_parquet_of_images_cast_from_file_paths(tmp_path):
    """`Dataset.from_dict({"image": [paths]}).cast_column("image", Image())` then `to_parquet`
    keeps only each file's absolute path (no bytes): the images are read where they are, and a
    file since removed is skipped as a missing image."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    paths, captions = [], []
    for i in range(3):
        image, caption = foreign_data.picture(i)
        image.save(tmp_path / f"{i}.png")
        paths.append(str((tmp_path / f"{i}.png").resolve()))
        captions.append(caption)
    dataset = Dataset.from_dict({"image": paths, "text": captions}).cast_column("image", ImageFeature())
    dataset.to_parquet(str(tmp_path / "train.parquet"))
    (tmp_path / "2.png").unlink()
    samples, stats = read_all(tmp_path / "train.parquet")
    assert (stats.read, stats.skipped, dict(stats.reasons)) == (2, 1, {"missing image": 1})
    for i, sample in enumerate(samples):
        assert_caption_sample(sample, captions[i])
        assert sample.images[0].size == foreign_data.picture(i)[0].size


def test_parquet_columns_are_named_or_the_error_says_how(tmp_path):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    image, caption = foreign_data.picture(1)
    dataset = Dataset.from_dict({"picture": [image], "alt_text": [caption]})
    dataset.cast_column("picture", ImageFeature()).to_parquet(str(tmp_path / "odd.parquet"))
    with pytest.raises(UserError) as e:
        read_all(tmp_path / "odd.parquet")
    assert "['picture', 'alt_text']" in str(e.value) and "data.caption_key" in str(e.value)
    with pytest.raises(UserError, match="no image column.*data.image_key"):
        read_all(tmp_path / "odd.parquet", caption_key="alt_text")
    with pytest.raises(UserError, match="no column 'pic'.*image_key"):
        read_all(tmp_path / "odd.parquet", caption_key="alt_text", image_key="pic")
    samples, _ = read_all(tmp_path / "odd.parquet", caption_key="alt_text", image_key="picture")
    assert_caption_sample(samples[0], caption)


def test_llava_mix665k_layout_with_an_image_folder(tmp_path):
    json_path, image_folder = foreign_data.write_llava_mix(tmp_path)
    samples, stats = read_all(json_path)  # images are not beside the JSON
    assert stats.read == 1 and stats.reasons == {"missing image": 8}  # the text-only one loads
    samples, stats = read_all(json_path, image_root=image_folder)
    assert (stats.read, stats.skipped, dict(stats.reasons)) == (8, 1, {"bad image": 1})
    by_id = {s.id: s for s in samples}
    assert len(by_id["text-7"].images) == 0 and by_id["text-7"].turns[1].content == "Hello."
    four_turns = by_id[f"{1:012d}"]
    assert [t.role for t in four_turns.turns] == ["user", "assistant"] * 2
    assert four_turns.turns[0].content == "<image>\nWhat colour is the square?"


def test_llava_json_of_caption_records(tmp_path):
    image, caption = foreign_data.picture(2)
    image.save(tmp_path / "a.png")
    records = [{"image": "a.png", "caption": caption}, {"image": "a.png", "alt": "x"}]
    (tmp_path / "caps.json").write_text(json.dumps(records))
    samples, stats = read_all(tmp_path / "caps.json")
    assert_caption_sample(samples[0], caption)
    assert stats.reasons == {"bad fields": 1} and "it has ['alt', 'image']" in stats.messages[0]


def test_coco_captions_with_images_elsewhere(tmp_path):
    json_path, image_folder = foreign_data.write_coco_captions(tmp_path)
    _, stats = read_all(json_path)
    assert stats.read == 0 and stats.reasons == {"missing image": 9}
    samples, stats = read_all(json_path, image_root=image_folder)
    assert (stats.read, stats.skipped, dict(stats.reasons)) == (8, 1, {"bad image": 1})
    for sample in samples:
        caption = foreign_data.picture(int(sample.id) - 100)[1]
        assert sorted(sample.truth["captions"]) == sorted(
            [caption, caption.replace("a ", "one ", 1)]
        )
        assert sample.turns[1].content in sample.truth["captions"]


def test_keys_only_where_they_apply(tmp_path):
    json_path, image_folder = foreign_data.write_coco_captions(tmp_path)
    with pytest.raises(UserError, match="caption_key and image_key name fields of"):
        read_all(json_path, caption_key="text")
