"""`visto train` on datasets other tools wrote: a tiny LLaVA trains on each, from the CLI,
with the image folder given by --image-root (or data.image_root in the recipe)."""

from __future__ import annotations

import json

import pytest

import foreign_data
from visto.cli import main

TINY_PROCESSOR = {
    "image_size": 32, "image_tokens": 16, "image_delimiters": False, "vocab_size": 400,
    "loc_bins": 32, "max_length": 64,
}  # fmt: skip


def tiny_llava_recipe(path, source, **data) -> str:
    recipe = {
        "model": {"family": "llava", "config": {
            "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2,
                       "mlp_hidden": 64},
            "vision_feature_layer": -1,
            "decoder": {"vocab_size": 400, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                        "num_kv_heads": 1, "intermediate_size": 64},
            "processor": TINY_PROCESSOR,
        }},
        # The tokenizer is trained on the training data itself (read with data.image_root).
        "processor": {"config": TINY_PROCESSOR, "tokenizer_samples": 100},
        "data": {"source": str(source), **data},
        "batch_size": 4, "max_steps": 2, "log_every": 1, "eval_every": None, "num_threads": 1,
    }  # fmt: skip
    path.write_text(json.dumps(recipe))
    return str(path)


def trained_samples(run) -> int:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(r["loss"] > 0 for r in train_rows)
    return len(train_rows)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["webdataset", "parquet", "llava", "coco"])
def test_a_recipe_trains_on_each_foreign_dataset(tmp_path, kind):
    flags: list[str] = []
    if kind == "webdataset":
        source = foreign_data.write_webdataset(tmp_path / "wds").parent
    elif kind == "parquet":
        source = foreign_data.write_hf_parquet(tmp_path / "train.parquet")
    elif kind == "llava":
        source, image_folder = foreign_data.write_llava_mix(tmp_path)
        flags = ["--image-root", str(image_folder)]
    else:
        source, image_folder = foreign_data.write_coco_captions(tmp_path)
        flags = ["--set", f"data.image_root={image_folder}"]
    recipe = tiny_llava_recipe(tmp_path / "recipe.json", source)
    run = tmp_path / "run"
    assert main(["train", "--recipe", recipe, "--out", str(run), "--no-progress", *flags]) == 0
    assert trained_samples(run) == 2
    config = json.loads((run / "config.json").read_text())
    if flags:
        assert config["data"]["image_root"] == str(image_folder)


def test_image_root_on_a_synthetic_world_is_refused(tmp_path, capsys):
    world = tmp_path / "world"
    world.mkdir()
    (world / "world.json").write_text("{}")
    recipe = tiny_llava_recipe(tmp_path / "recipe.json", world)
    args = ["train", "--recipe", recipe, "--out", str(tmp_path / "run"), "--image-root", "x"]
    assert main(args) == 2
    assert "data.image_root applies to files in a real format" in capsys.readouterr().err
