"""A CLIP recipe's top-level `processor` section normalises pixels as the model's vision tower
was trained (visto.train.data.model_normalisation / follow_tower): the section's processor
takes a `vision_init` tower's mean/std (a transformers directory's image processor, a visto
checkpoint's processor) or an `init_from` checkpoint's, where it sets none; one that sets
others is refused before anything trains; a fresh tower keeps the section's as before.
Checked end to end: the batches `visto train` builds hold the tower's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visto.checkpoint import load, save_checkpoint
from visto.cli import main
from visto.config import to_dict
from visto.data.processor import Processor, ProcessorConfig, load_rgb
from visto.data.synth import WorldConfig, generate_world
from visto.data.tokenizer import train_tokenizer
from visto.errors import UserError
from visto.models.clip import CLIP, CLIPConfig
from visto.nn.vision import CLIP_MEAN, CLIP_STD, ViTConfig
from visto.pretrained import build_model
from visto.train.loop import train
from visto.train.recipe import recipe_from_dict

MEAN, STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)  # neither the default 0.5 nor CLIP's
HALF = ((0.5,) * 3, (0.5,) * 3)  # ProcessorConfig's default
SIZE = 32  # the towers' side


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("world") / "w"
    generate_world(WorldConfig(n=16, seed=0, size=48), path, workers=1)
    return path


def hf_tower(directory: Path, mean=MEAN, std=STD) -> str:
    """A tiny transformers CLIPVisionModel whose CLIPImageProcessor normalises with mean/std."""
    from test_pretrained_normalisation import save_tower

    save_tower(directory, "image", image_mean=list(mean), image_std=list(std))
    return str(directory)


def visto_tower(directory: Path, world: Path, mean=MEAN, std=STD) -> str:
    """A tiny visto CLIP checkpoint saved with a processor that normalises with mean/std."""
    model = build_model("clip", CLIPConfig.preset("tiny"), seed=1)
    tokenizer = train_tokenizer(["a red circle"] * 4, vocab_size=300, loc_bins=4, min_frequency=1)
    config = ProcessorConfig(image_size=SIZE, resize_mode="resize", loc_bins=4, mean=mean, std=std)
    model.processor = Processor(config, tokenizer)
    return str(save_checkpoint(model, directory))


def clip_recipe(world: Path, processor: dict | None, **model: object) -> dict:
    config = to_dict(CLIPConfig.preset("tiny"))
    config.update(model.pop("config", {}))  # type: ignore[arg-type]
    return {
        "name": "clip-tower-normalisation",
        "model": {"family": "clip", "config": config, **model},
        "processor": processor,
        "data": {"source": str(world), "tasks": ["caption"], "prefetch": 0},
        "optim": {"lr": 1e-3},
        "schedule": {"warmup_steps": 1},
        "batch_size": 4, "max_steps": 2, "log_every": 1, "eval_every": None, "num_threads": 1,
    }  # fmt: skip


def section(**settings: object) -> dict:
    config = {"image_size": SIZE, "resize_mode": "resize", "vocab_size": 300, "loc_bins": 4}
    return {"config": {**config, **settings}, "tokenizer_samples": 40}


def by_hand(image: Image.Image, mean, std) -> torch.Tensor:
    """(3, SIZE, SIZE): a bicubic resize and (x / 255 - mean) / std, in float64."""
    x = np.asarray(load_rgb(image).resize((SIZE, SIZE), Image.Resampling.BICUBIC), np.float64)
    return torch.from_numpy((x / 255 - np.asarray(mean)) / np.asarray(std)).permute(2, 0, 1).float()


def trained_batches(recipe: dict, run: Path, monkeypatch) -> list[tuple[list, dict]]:
    """Train `recipe` into `run`; the (samples, batch) pairs CLIP.collate made on the way."""
    seen: list[tuple[list, dict]] = []
    collate = CLIP.collate

    def recording(self, samples):
        batch = collate(self, samples)
        seen.append((samples, batch))
        return batch

    monkeypatch.setattr(CLIP, "collate", recording)
    train(recipe_from_dict(recipe), run, show_progress=False)
    assert seen
    return seen


def assert_normalised(seen: list[tuple[list, dict]], mean, std) -> None:
    for samples, batch in seen:
        expected = torch.stack([by_hand(s.images[0], mean, std) for s in samples])
        assert batch["pixel_values"].shape == expected.shape
        torch.testing.assert_close(batch["pixel_values"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tower", ["transformers", "visto"])
def test_a_recipes_processor_section_normalises_as_the_vision_init_tower(tower, world, tmp_path, monkeypatch):
    path = hf_tower(tmp_path / "tower") if tower == "transformers" else visto_tower(tmp_path / "tower", world)
    recipe = clip_recipe(world, section(), config={"vision_init": path})
    seen = trained_batches(recipe, tmp_path / "run", monkeypatch)
    assert_normalised(seen, MEAN, STD)
    # the checkpoint's processor keeps the tower's numbers for inference
    saved = json.loads((tmp_path / "run" / "checkpoint" / "processor.json").read_text())
    assert saved["mean"] == pytest.approx(MEAN) and saved["std"] == pytest.approx(STD)
    model = load(tmp_path / "run" / "checkpoint")
    torch.testing.assert_close(model.image_tensor([seen[0][0][0].images[0]])[0],
                               by_hand(seen[0][0][0].images[0], MEAN, STD), atol=1e-5, rtol=0)  # fmt: skip


def test_a_tower_with_clips_own_constants_gives_them(world, tmp_path, monkeypatch):
    """OpenAI CLIP's constants are a tower's too: the section does not fall back to 0.5."""
    recipe = clip_recipe(world, section(), config={"vision_init": hf_tower(tmp_path / "tower", CLIP_MEAN, CLIP_STD)})
    assert_normalised(trained_batches(recipe, tmp_path / "run", monkeypatch), CLIP_MEAN, CLIP_STD)


def test_the_section_may_name_the_towers_own_numbers(world, tmp_path, monkeypatch):
    """mean set to the tower's, std left out: std is the tower's too."""
    recipe = clip_recipe(world, section(mean=list(MEAN)), config={"vision_init": hf_tower(tmp_path / "tower")})
    assert_normalised(trained_batches(recipe, tmp_path / "run", monkeypatch), MEAN, STD)


@pytest.mark.parametrize("settings", [{"mean": list(CLIP_MEAN)}, {"std": [0.5, 0.5, 0.5]},
                                      {"mean": [0.5] * 3, "std": [0.5] * 3}])  # fmt: skip
def test_a_section_that_contradicts_the_tower_is_refused(settings, world, tmp_path, capsys):
    recipe = clip_recipe(world, section(**settings), config={"vision_init": hf_tower(tmp_path / "tower")})
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(tmp_path / "recipe.json"), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "processor.config normalises pixels with mean" in err
    assert f"vision tower was trained on mean {list(MEAN)} / std {list(STD)}" in err
    assert not (out / "checkpoint").exists()


def test_a_fresh_tower_keeps_the_sections_numbers(world, tmp_path, monkeypatch):
    """No tower to follow: the section's settings, the default 0.5 or its own, as before."""
    seen = trained_batches(clip_recipe(world, section()), tmp_path / "half", monkeypatch)
    assert_normalised(seen, *HALF)
    monkeypatch.undo()
    recipe = clip_recipe(world, section(mean=list(CLIP_MEAN), std=list(CLIP_STD)))
    assert_normalised(trained_batches(recipe, tmp_path / "clip", monkeypatch), CLIP_MEAN, CLIP_STD)


def test_init_from_and_a_saved_processor_follow_the_tower(world, tmp_path, monkeypatch):
    """A run from a checkpoint: a new section takes the checkpoint's processor's numbers. A
    saved processor (processor.path) at the default 0.5 takes the tower's; one that chose
    others is refused."""
    start = visto_tower(tmp_path / "start", world)
    recipe = clip_recipe(world, section(), init_from=start)
    assert_normalised(trained_batches(recipe, tmp_path / "run", monkeypatch), MEAN, STD)

    tokenizer = train_tokenizer(["a red circle"] * 4, vocab_size=300, loc_bins=4, min_frequency=1)
    Processor(ProcessorConfig(image_size=SIZE, resize_mode="resize", loc_bins=4), tokenizer).save(tmp_path / "half")
    recipe = clip_recipe(world, {"path": str(tmp_path / "half")}, init_from=start)
    assert_normalised(trained_batches(recipe, tmp_path / "path", monkeypatch), MEAN, STD)

    other = ProcessorConfig(image_size=SIZE, resize_mode="resize", loc_bins=4, mean=CLIP_MEAN, std=CLIP_STD)
    Processor(other, tokenizer).save(tmp_path / "clip")
    recipe = clip_recipe(world, {"path": str(tmp_path / "clip")}, init_from=start)
    with pytest.raises(UserError, match=r"the processor at processor.path .* normalises pixels with mean"):
        train(recipe_from_dict(recipe), tmp_path / "refused", show_progress=False)


def test_a_clip_built_on_a_tower_records_its_numbers_even_clips_own(tmp_path):
    """visto.pretrained.take_tower_normalisation: a processor-less CLIP gets the tower's
    numbers as settings, OpenAI CLIP's too (the same pixels as none; a section follows them)."""
    tower = hf_tower(tmp_path / "tower", CLIP_MEAN, CLIP_STD)
    model = build_model("clip", CLIPConfig.preset("tiny", vision_init=tower), seed=0)
    assert model.config.processor == ProcessorConfig(image_size=SIZE, resize_mode="resize", mean=CLIP_MEAN, std=CLIP_STD)
    fresh = build_model("clip", CLIPConfig.preset("tiny", vision=ViTConfig.preset("tiny")), seed=0)
    assert fresh.config.processor is None
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    assert torch.equal(model.image_tensor([image]), fresh.image_tensor([image]))
