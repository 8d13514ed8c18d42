"""Integration: a tiny CLIP trains through the one loop on the synthetic world, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from visto.checkpoint import load
from visto.config import to_dict
from visto.data.synth import WorldConfig, generate_world
from visto.models.clip import CLIPConfig
from visto.train.loop import train
from visto.train.recipe import list_recipes, load_recipe, recipe_from_dict


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("world") / "w"
    generate_world(WorldConfig(n=60, seed=0, size=48), path)
    return path


def clip_recipe(world, **extra) -> dict:
    recipe = {
        "name": "clip-tiny-test",
        "model": {"family": "clip", "config": to_dict(CLIPConfig.preset("tiny"))},
        "processor": {"config": {"image_size": 32, "resize_mode": "resize", "vocab_size": 400,
                                 "loc_bins": 4}},
        "data": {"source": str(world), "tasks": ["caption"]},
        "optim": {"lr": 3e-3, "weight_decay": 0.05},
        "schedule": {"warmup_steps": 2},
        "batch_size": 8, "max_steps": 6, "log_every": 2, "eval_every": 3, "eval_batches": 1,
        "num_threads": 1,
    }
    recipe.update(extra)
    return recipe


@pytest.mark.slow
def test_tiny_clip_trains_saves_and_loads(world, tmp_path):
    run = tmp_path / "run"
    recipe = recipe_from_dict(clip_recipe(world, optim={"lr": 3e-3, "module_lrs": {"vision_model.embeddings": 0}}))
    result = train(recipe, run, show_progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert {"loss", "acc_i2t", "acc_t2i", "logit_scale"} <= set(train_rows[-1])
    assert [r["step"] for r in rows if r["split"] == "val"] == [3, 6]
    assert (run / "plots" / "acc_i2t.png").is_file()

    model = load(run / "checkpoint")
    assert model.family == "clip" and model.processor is not None  # the trained tokenizer travels
    assert (run / "checkpoint" / "tokenizer.json").is_file()
    fresh = recipe_from_dict(clip_recipe(world))
    from visto.pretrained import build_model

    torch.manual_seed(fresh.seed)
    init = build_model("clip", fresh.model.config)
    frozen = "vision_model.embeddings"
    for name, tensor in model.state_dict().items():
        if name.startswith(frozen):
            assert torch.equal(tensor, init.state_dict()[name]), name  # lr 0: untouched
    assert not torch.equal(model.visual_projection.weight, init.visual_projection.weight)
    emb = model.embed_texts(["a small blue star"])
    assert emb.shape == (1, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(1))
    assert result.val_metrics["loss"] > 0


def test_shipped_clip_recipe_builds(world):
    recipe = load_recipe("clip-synth", [f"data.source={world}"])
    assert recipe.model.family == "clip"
    from visto.pretrained import build_model

    model = build_model("clip", recipe.model.config)
    assert model.config.vision.image_size == recipe.processor.config["image_size"]


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_shipped_recipe_is_valid(name):
    """Each shipped recipe parses, and its model config fits its family's config class."""
    from visto.config import from_dict
    from visto.models import FAMILIES

    recipe = load_recipe(name)
    assert recipe.description, f"{name}: give it a one-line description for `visto train --list`"
    if recipe.model.family and not recipe.model.init_from:
        config_class, _ = FAMILIES[recipe.model.family]
        from_dict(config_class, recipe.model.config, where=name)
