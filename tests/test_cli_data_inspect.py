"""`visto data inspect`: any format, through the CLI, on data other tools wrote."""

from __future__ import annotations

from collections import Counter

import pytest
from PIL import Image

import foreign_data
from visto.cli import main
from visto.data.dataset_report import histogram, survey
from visto.data.processor import Processor, ProcessorConfig


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    llava_json, llava_images = foreign_data.write_llava_mix(root / "llava")
    coco_json, coco_images = foreign_data.write_coco_captions(root / "coco")
    return {
        "webdataset": (foreign_data.write_webdataset(root / "wds").parent, []),
        "parquet": (foreign_data.write_hf_parquet(root / "train.parquet"), []),
        "llava": (llava_json, ["--image-root", str(llava_images)]),
        "coco": (coco_json, ["--image-root", str(coco_images)]),
    }


@pytest.mark.parametrize(
    "kind, skipped_key, task",
    [
        ("webdataset", "000000003", "caption: 8"),
        ("parquet", "row 5", "caption: 8"),
        ("llava", "#2 (id 000000000002)", "conversation: 7, text only: 1"),
        ("coco", "images[4] (id 104)", "caption: 8"),
    ],
)
def test_each_foreign_file_loads_8_and_reports_the_corrupt_one(
    datasets, capsys, kind, skipped_key, task
):
    path, flags = datasets[kind]
    assert main(["data", "inspect", str(path), *flags]) == 0
    out = capsys.readouterr().out
    assert f"{path}: {kind}" in out
    assert "loaded 8 sample(s), skipped 1" in out
    assert "skipped, bad image: 1" in out and f"    {skipped_key}: " in out
    assert f"tasks: {task}" in out
    assert "image sizes: width 32-40, height 32-32" in out


def test_images_elsewhere_without_image_root_say_what_to_do(datasets, capsys):
    path, _ = datasets["coco"]
    assert main(["data", "inspect", str(path)]) == 1  # nothing loads
    out = capsys.readouterr().out
    assert "skipped, missing image: 9" in out and "pass --image-root DIR" in out
    assert "nothing loaded" in out


def test_token_lengths_against_the_processor_max_length(datasets, tmp_path, capsys):
    path, flags = datasets["llava"]
    config = ProcessorConfig(
        image_size=32, image_tokens=16, vocab_size=300, loc_bins=8, max_length=40
    )
    texts = ["What colour is the square?", "a red square on grey", "Say hello.", "Hello."] * 20
    Processor.train(texts, config).save(tmp_path / "proc")
    assert main(["data", "inspect", str(path), *flags, "--processor", str(tmp_path / "proc")]) == 0
    out = capsys.readouterr().out
    processor = Processor.load(tmp_path / "proc")
    report = survey(path, processor=processor, image_root=flags[1])
    assert report.length_unit == "tokens" and report.lengths.total() == 8
    over = sum(n for length, n in report.lengths.items() if length > 40)
    assert 0 < over < 8  # the text-only sample fits, the image ones (16 image tokens) do not
    assert f"over max_length 40: {over} of 8" in out and "> max_length" in out
    assert "length in tokens: min" in out
    assert main(["data", "inspect", str(path), *flags, "--max-length", "1000"]) == 0
    assert "over max_length 1000: 0 of 8" in capsys.readouterr().out


def test_show_draws_the_first_samples(datasets, tmp_path, monkeypatch, capsys):
    path, _ = datasets["parquet"]
    out = tmp_path / "sheet.png"
    assert main(["data", "inspect", str(path), "--show", "4", "--out", str(out)]) == 0
    sheet = Image.open(out)
    assert sheet.format == "PNG" and sheet.width > 600 and sheet.height > 500  # 2 rows of 3
    monkeypatch.chdir(tmp_path)
    assert main(["data", "inspect", str(path), "--show", "1", "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert "loaded 2 sample(s) (the --limit" in printed
    assert (tmp_path / "runs" / "inspect" / "train.parquet.png").is_file()


def test_named_keys_reach_the_reader(tmp_path, capsys):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    image, caption = foreign_data.picture(1)
    dataset = Dataset.from_dict({"picture": [image], "alt_text": [caption]})
    dataset.cast_column("picture", ImageFeature()).to_parquet(str(tmp_path / "odd.parquet"))
    assert main(["data", "inspect", str(tmp_path / "odd.parquet")]) == 2
    assert "data.caption_key (or --caption-key)" in capsys.readouterr().err
    args = ["--caption-key", "alt_text", "--image-key", "picture"]
    assert main(["data", "inspect", str(tmp_path / "odd.parquet"), *args]) == 0
    assert "tasks: caption: 1" in capsys.readouterr().out


def test_a_synthetic_world_reports_its_tasks(tmp_path, capsys):
    world = tmp_path / "world"
    assert main(["data", "synth", "--out", str(world), "--n", "8", "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(world)]) == 0
    out = capsys.readouterr().out
    assert f"{world}: synth" in out and "caption: " in out and "vqa: " in out


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "nowhere")]) == 2
    assert "does not exist; give a dataset file or folder" in capsys.readouterr().err
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("x")
    assert main(["data", "inspect", str(tmp_path / "odd")]) == 2
    assert "cannot tell the format of folder" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "odd"), "--limit", "0"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "odd"), "--processor", str(tmp_path)]) == 2
    assert "processor.json not found" in capsys.readouterr().err


def test_histogram_puts_an_edge_on_max_length():
    lengths = Counter({3: 1, 10: 2, 11: 1, 30: 4})
    bins = histogram(lengths, max_length=10, bins=4)
    assert sum(n for _, _, n in bins) == 8
    assert any(hi == 10 for _, hi, _ in bins)  # no bin straddles max_length
    assert bins[0][0] <= 3 and bins[-1][1] >= 30
    assert histogram(Counter(), None) == []
