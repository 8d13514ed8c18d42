"""The build pipeline and the CLI: `visto index build` / `visto search` end to end, bad files,
crash safety (SIGKILL mid-build, then resume), and a real tiny CLIP checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visto.checkpoint import save_checkpoint
from visto.cli import main
from visto.data.processor import Processor, ProcessorConfig
from visto.data.tokenizer import train_tokenizer
from visto.index import PixelEmbedder, VectorStore
from visto.index.build import build_index
from visto.index.sources import folder_items
from visto.models import build_model
from visto.models.clip import CLIPConfig

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30), (200, 40, 200)]


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` distinct small PNGs: a coloured square at a random place on a light background."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = Image.new("RGB", (32, 32), (245, 245, 240))
        x, y = (int(v) for v in rng.integers(0, 20, 2))
        image.paste(Image.new("RGB", (12, 12), COLOURS[i % len(COLOURS)]), (x, y))
        path = folder / f"img{i:04d}.png"
        image.save(path)
        paths.append(path)
    return paths


def test_cli_build_search_and_bad_files(tmp_path, capsys):
    paths = make_images(tmp_path / "imgs", 30)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png at all")
    db = tmp_path / "db"
    argv = ["index", "build", "--model", "pixels", "--images", str(tmp_path / "imgs")]
    assert main([*argv, "--db", str(db), "--batch", "8"]) == 0
    err = capsys.readouterr().err
    assert "added 30" in err and "unreadable 1" in err and "broken.png" in err
    # Again: nothing new, nothing duplicated.
    assert main([*argv, "--db", str(db), "--batch", "8"]) == 0
    assert "added 0, already indexed 30" in capsys.readouterr().err
    assert VectorStore(db).count() == 30

    # Image -> image: an indexed image finds itself first, with cosine 1.
    assert main(["search", "--db", str(db), "--image", str(paths[7]), "-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in out["results"]] == [1, 2, 3]
    assert out["results"][0]["path"] == str(paths[7].resolve())
    assert out["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert out["results"][0]["metadata"] == {"file": "img0007.png"}

    # The table view names the same image.
    assert main(["search", "--db", str(db), "--image", str(paths[7]), "-k", "2"]) == 0
    assert "img0007.png" in capsys.readouterr().out

    # The pixels embedder cannot embed text: a clear error, exit 2.
    assert main(["search", "--db", str(db), "a red square"]) == 2
    assert "cannot embed text" in capsys.readouterr().err
    # A model other than the one the index was built with is refused.
    assert main(["search", "--db", str(db), "--image", str(paths[0]), "--model", "pixels-4"]) == 2
    assert "not comparable" in capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["search", "--db", str(tmp_path / "nothing"), "query"]) == 2
    assert "no index at" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["index", "build", "--model", "pixels", "--images", str(tmp_path / "empty"),
                 "--db", str(tmp_path / "db")]) == 2  # fmt: skip
    assert "no image files found" in capsys.readouterr().err


def test_build_from_synthetic_world_stores_its_metadata(tmp_path, capsys):
    world = tmp_path / "world"
    assert main(["data", "synth", "--out", str(world), "--n", "20", "--size", "48",
                 "--workers", "1"]) == 0  # fmt: skip
    db = tmp_path / "db"
    assert main(["index", "build", "--model", "pixels", "--data", str(world),
                 "--split", "train", "--db", str(db)]) == 0  # fmt: skip
    n_train = sum(1 for line in (world / "train.jsonl").read_text().splitlines() if line.strip())
    store = VectorStore(db)
    assert store.count() == n_train
    record = json.loads((world / "train.jsonl").read_text().splitlines()[0])
    hit = store.search(PixelEmbedder().embed_images([Image.open(world / record["image"])])[0], 1)[0]
    assert hit.path == str((world / record["image"]).resolve())
    assert hit.metadata["split"] == "train" and hit.metadata["id"] == record["id"]
    assert hit.metadata["caption"] == record["tasks"]["captions"][0]
    assert hit.metadata["objects"] == [
        f"{o['colour']} {o['shape']}" for o in record["truth"]["objects"]
    ]


# A build that announces each committed batch. The parent kills it right after the third
# announcement, while the fourth batch is being decoded, embedded or committed; the short
# pause only keeps the child from finishing all eight batches before the kill lands.
CHILD = textwrap.dedent(
    """
    import sys, time
    from visto.index import PixelEmbedder, VectorStore
    from visto.index.build import build_index
    from visto.index.sources import folder_items

    embedder = PixelEmbedder()
    store = VectorStore(sys.argv[2], model=embedder.name, dim=embedder.dim)
    def on_progress(n):
        print("committed", n, flush=True)
        time.sleep(0.05)
    build_index(store, folder_items(sys.argv[1]), embedder, batch_size=5, on_progress=on_progress)
    print("finished", flush=True)
    """
)


@pytest.mark.slow
def test_killed_build_keeps_committed_batches_and_resumes(tmp_path):
    folder, db = tmp_path / "imgs", tmp_path / "db"
    make_images(folder, 40)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), str(folder), str(db)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        seen = 0
        deadline = time.monotonic() + 120
        while seen < 3 and time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line.startswith("committed"), f"unexpected child output {line!r}"
            seen += 1
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL

    store = VectorStore(db)  # opens cleanly after the crash
    committed = store.count()
    assert 15 <= committed < 40 and committed % 5 == 0  # whole batches only
    ids = store.all_ids()
    assert len(ids) == len(set(ids)) == committed
    assert len(store.search(PixelEmbedder().embed_images([Image.new("RGB", (8, 8))])[0], 3)) == 3

    # Resume: the committed images are skipped, the rest added, nothing duplicated.
    embedder = PixelEmbedder()
    store = VectorStore(db, model=embedder.name, dim=embedder.dim)
    report = build_index(store, folder_items(folder), embedder, batch_size=5)
    assert report.already_indexed == committed and report.added == 40 - committed
    ids = store.all_ids()
    assert len(ids) == len(set(ids)) == store.count() == 40


@pytest.mark.slow
def test_cli_with_a_tiny_clip_checkpoint(tmp_path, capsys):
    world = tmp_path / "world"
    assert main(["data", "synth", "--out", str(world), "--n", "24", "--size", "48",
                 "--workers", "1"]) == 0  # fmt: skip
    captions = [json.loads(line)["tasks"]["captions"][0]
                for line in (world / "train.jsonl").read_text().splitlines()]  # fmt: skip
    config = ProcessorConfig(image_size=32, resize_mode="resize", loc_bins=4, vocab_size=300)
    processor = Processor(
        config, train_tokenizer(captions * 3, vocab_size=300, loc_bins=4, min_frequency=1)
    )
    model = build_model("clip", CLIPConfig.preset("tiny"), seed=0)
    model.processor = processor
    ckpt = save_checkpoint(model, tmp_path / "clip")
    db = tmp_path / "db"
    assert main(["index", "build", "--model", str(ckpt), "--data", str(world),
                 "--split", "train", "--db", str(db), "--batch", "4"]) == 0  # fmt: skip
    capsys.readouterr()
    store = VectorStore(db)
    assert store.count() == len(captions) and store.dim == model.config.embed_dim

    # Text -> image, with the model read from the index (no --model).
    assert main(["search", "--db", str(db), "a red circle left of a blue square", "-k", "5",
                 "--json"]) == 0  # fmt: skip
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 5 and all(Path(r["path"]).is_file() for r in results)
    assert all(a["score"] >= b["score"] for a, b in zip(results, results[1:], strict=False))
    # Image -> image: an indexed image finds itself first.
    first = world / json.loads((world / "train.jsonl").read_text().splitlines()[0])["image"]
    assert main(["search", "--db", str(db), "--image", str(first), "-k", "1", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["results"][0]
    assert top["path"] == str(first.resolve()) and top["score"] == pytest.approx(1.0, abs=1e-4)
    # Another model's queries are refused.
    assert main(["search", "--db", str(db), "--image", str(first), "--model", "pixels"]) == 2
    assert "not comparable" in capsys.readouterr().err


def test_a_folder_of_only_broken_files_is_an_error(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "imgs" / name).write_bytes(b"\x89PNG garbage")
    argv = ["index", "build", "--model", "pixels", "--images", str(tmp_path / "imgs")]
    assert main([*argv, "--db", str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 files could be read" in err and "a.png" in err
