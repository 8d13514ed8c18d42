"""The shipped recipes that start from a CLIP tower read the checkpoint `visto train --recipe
clip-synth` writes (where the README trains it), and the tower it makes fits them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from visto.checkpoint import save_checkpoint
from visto.pretrained import build_model
from visto.train.recipe import load_recipe

README = Path(__file__).resolve().parents[1] / "README.md"
READERS = ["llava-stage1", "blip2-stage1", "flamingo-synth"]


def readme_clip_run() -> Path:
    """The run directory of the README's `visto train --recipe clip-synth` command."""
    lines = [
        ln
        for ln in README.read_text().splitlines()
        if re.match(r"visto train --recipe clip-synth\s", ln)
    ]
    assert len(lines) == 1, lines
    out = re.search(r"--out\s+(\S+)", lines[0])
    return Path(out.group(1)) if out else Path("runs") / "clip-synth"  # `visto train`'s default


@pytest.mark.parametrize("name", READERS)
def test_vision_init_is_where_the_readme_trains_clip(name):
    assert Path(load_recipe(name).model.config["vision_init"]) == readme_clip_run() / "checkpoint"


@pytest.fixture(scope="module")
def clip_synth_checkpoint(tmp_path_factory):
    clip = build_model("clip", load_recipe("clip-synth").model.config)
    return save_checkpoint(clip, tmp_path_factory.mktemp("clip") / "checkpoint")


@pytest.mark.parametrize("name", READERS)
def test_the_clip_synth_tower_fits_the_recipe(name, clip_synth_checkpoint):
    config = dict(load_recipe(name).model.config, vision_init=str(clip_synth_checkpoint))
    model = build_model(load_recipe(name).model.family, config)
    tower = getattr(model, "vision_tower", None) or model.vision_model
    assert tower.config.image_size == model.config.processor.image_size == 128
