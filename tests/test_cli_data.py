"""`visto data synth|show|export` and `visto quickstart` through the real CLI entry point."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from visto.cli import main
from visto.data.formats import read_samples
from visto.data.synth import iter_samples


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "world"
    assert (
        main(["data", "synth", "--out", str(out), "--n", "24", "--seed", "1", "--workers", "2"])
        == 0
    )
    return out


def test_synth_writes_the_layout(world):
    meta = json.loads((world / "world.json").read_text())
    assert meta["config"]["n"] == 24 and meta["config"]["seed"] == 1
    for split in ("train", "val", "test", "heldout"):
        assert (world / f"{split}.jsonl").is_file()
    assert len(list((world / "images").glob("*.png"))) == 24
    assert len(list((world / "masks").glob("*.png"))) == 24
    assert not [p for p in world.parent.iterdir() if p.name.endswith(".tmp")], (
        "temp dir left behind"
    )


def test_show_writes_a_png_grid(world, tmp_path):
    out = tmp_path / "grid.png"
    assert (
        main(["data", "show", str(world), "--split", "heldout", "--n", "2", "--out", str(out)]) == 0
    )
    grid = Image.open(out)
    assert grid.format == "PNG" and grid.width > 400 and grid.height > 250
    assert main(["data", "show", str(world)]) == 0
    assert (world / "show.png").is_file()


def test_export_llava_round_trips(world, tmp_path):
    out = tmp_path / "llava"
    args = [
        "data",
        "export",
        str(world),
        "--split",
        "train",
        "--format",
        "llava",
        "--out",
        str(out),
    ]
    assert main([*args, "--tasks", "vqa", "ocr"]) == 0
    back = list(read_samples(out, "llava"))
    ours = list(iter_samples(world, "train", tasks=["vqa", "ocr"]))
    assert len(back) == len(ours) > 0
    assert [t.content for t in back[0].turns] == [t.content for t in ours[0].turns]
    assert back[0].images[0].tobytes() == ours[0].images[0].tobytes()
    assert main(args) == 2  # exists: refuses without --overwrite
    assert main([*args, "--overwrite"]) == 0


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["data", "show", str(tmp_path)]) == 2
    assert "not a synthetic world" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path / "w"), "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    assert main(["quickstart", "--out", str(tmp_path / "q"), "--vision-batch", "0"]) == 2
    assert "--vision-batch must be at least 1, got 0" in capsys.readouterr().err


def test_quickstart_makes_and_then_reuses_the_world(tmp_path, capsys):
    # Only the data stage: the whole pipeline has its own test (tests/test_quickstart.py).
    args = ["quickstart", "--out", str(tmp_path / "qs"), "--until", "data",
            "--n", "16", "--workers", "1"]
    assert main(args) == 0
    world = tmp_path / "qs" / "world"
    assert (world / "world.json").is_file() and (world / "show.png").is_file()
    stamp = (world / "world.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert "reusing" in capsys.readouterr().out
    assert (world / "world.json").stat().st_mtime_ns == stamp
    assert main([*args[:-4], "--n", "20", "--workers", "1"]) == 0  # new settings: regenerated
    assert json.loads((world / "world.json").read_text())["config"]["n"] == 20
