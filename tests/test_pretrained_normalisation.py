"""A model built on a `vision_init` tower normalises pixels as that tower was trained
(visto.pretrained.tower_normalisation): a transformers CLIP directory's image processor
settings, CLIP's published constants (with a warning) where it kept none, a visto checkpoint's
processor.json. Checked on tiny CLIPVisionModels and image processors that transformers saves."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch
import transformers  # a hard dependency: a broken install fails here, not skips
from PIL import Image

from visto.checkpoint import load, save_checkpoint
from visto.data.processor import ProcessorConfig, image_transform
from visto.errors import UserError
from visto.models.clip import CLIPConfig
from visto.models.flamingo import FlamingoConfig
from visto.models.llava import LlavaConfig
from visto.nn.vision import CLIP_MEAN, CLIP_STD
from visto.pretrained import build_model, tower_normalisation

MEAN, STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)  # neither the default 0.5 nor CLIP's


def save_tower(directory, processor: str | None = None, **image_processor) -> None:
    """A tiny random transformers CLIPVisionModel in `directory`, with, as `processor` says, a
    CLIPImageProcessor's save (preprocessor_config.json), a whole CLIPProcessor's
    (processor_config.json, as transformers 5 writes it) or none."""
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)  # fmt: skip
    transformers.CLIPVisionModel(config).eval().save_pretrained(directory)
    if processor is None:
        return
    images = transformers.CLIPImageProcessor(**image_processor)
    if processor == "image":
        images.save_pretrained(directory)
    else:
        from test_transformers_parts import word_tokenizer

        tokenizer = word_tokenizer("<|startoftext|>", "<|endoftext|>", "<pad>", add_bos=True)
        transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)


def visto_tokenizer(directory) -> str:
    from test_transformers_parts import visto_tokenizer as make

    return make(directory)


def llava(tmp_path, **overrides):
    config = LlavaConfig.preset("tiny", vision_init=str(tmp_path / "tower"), vision_feature_layer=-2,
                                tokenizer_dir=visto_tokenizer(tmp_path), **overrides)  # fmt: skip
    return build_model("llava", config, seed=0)


@pytest.mark.parametrize("processor", ["image", "whole"])
def test_a_llava_takes_the_towers_mean_and_std_from_its_image_processor(processor, tmp_path):
    save_tower(tmp_path / "tower", processor, image_mean=list(MEAN), image_std=list(STD))
    model = llava(tmp_path)
    assert model.config.processor.mean == MEAN and model.config.processor.std == STD
    # the processor the model makes normalises so, and keeps it through a checkpoint
    image = Image.new("RGB", (32, 32), (200, 40, 90))
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip((200, 40, 90), MEAN, STD, strict=True)])
    pixels = image_transform(image, model.processor.config)
    assert torch.allclose(pixels[:, 0, 0], expected, atol=1e-6)
    save_checkpoint(model, tmp_path / "llava")
    again = load(tmp_path / "llava")
    assert again.processor.config.mean == MEAN and again.processor.config.std == STD


def test_clips_own_image_processor_gives_clips_constants(tmp_path):
    save_tower(tmp_path / "tower", "image")  # CLIPImageProcessor's defaults: OpenAI CLIP's
    saved = json.loads((tmp_path / "tower" / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == pytest.approx(CLIP_MEAN) and saved["image_std"] == pytest.approx(CLIP_STD)
    model = llava(tmp_path)
    assert model.config.processor.mean == pytest.approx(CLIP_MEAN)
    assert model.config.processor.std == pytest.approx(CLIP_STD)


def test_a_tower_without_an_image_processor_gets_clips_constants_and_a_warning(tmp_path, caplog):
    save_tower(tmp_path / "tower")
    with caplog.at_level(logging.WARNING, logger="visto.pretrained"):
        model = llava(tmp_path)
    assert model.config.processor.mean == CLIP_MEAN and model.config.processor.std == CLIP_STD
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "no preprocessor_config.json" in warned[0].getMessage()
    assert str(tmp_path / "tower") in warned[0].getMessage()


def test_other_families_and_a_processorless_clip_take_them_too(tmp_path):
    save_tower(tmp_path / "tower", "image", image_mean=list(MEAN), image_std=list(STD))
    tower = str(tmp_path / "tower")
    flamingo = build_model("flamingo", FlamingoConfig.preset("tiny", vision_init=tower), seed=0)
    assert flamingo.config.processor.mean == MEAN and flamingo.config.processor.std == STD
    # A CLIP with no processor settings (OpenAI CLIP's) gets the tower's as a resize to its side
    clip = build_model("clip", CLIPConfig.preset("tiny", vision_init=tower), seed=0)
    assert clip.config.processor == ProcessorConfig(image_size=32, resize_mode="resize", mean=MEAN, std=STD)
    image = Image.new("RGB", (40, 40), (10, 20, 30))
    assert torch.equal(clip.image_tensor([image])[0], image_transform(image, clip.config.processor))


def test_a_config_that_sets_other_values_is_refused_and_the_towers_own_are_accepted(tmp_path):
    save_tower(tmp_path / "tower", "image", image_mean=list(MEAN), image_std=list(STD))
    tiny = LlavaConfig.preset("tiny").processor
    with pytest.raises(UserError, match=r"processor mean .* differ from those the vision tower"):
        llava(tmp_path, processor=replace(tiny, mean=CLIP_MEAN, std=CLIP_STD))
    model = llava(tmp_path, processor=replace(tiny, mean=MEAN, std=STD))
    assert model.config.processor.mean == MEAN


def test_a_visto_checkpoints_processor_is_the_towers(tmp_path):
    """A LLaVA saved with its processor (as the quickstart's vision stage saves its tower) hands
    its mean/std on; a CLIP saved with neither a processor nor processor settings leaves the
    config's as they are."""
    save_tower(tmp_path / "tower", "image", image_mean=list(MEAN), image_std=list(STD))
    save_checkpoint(llava(tmp_path), tmp_path / "first")  # with the processor of tokenizer_dir
    assert (tmp_path / "first" / "processor.json").is_file()
    assert tower_normalisation(tmp_path / "first") == (MEAN, STD)
    second = build_model("llava", LlavaConfig.preset("tiny", vision_init=str(tmp_path / "first")), seed=0)
    assert second.config.processor.mean == MEAN and second.config.processor.std == STD

    save_checkpoint(build_model("clip", CLIPConfig.preset("tiny"), seed=0), tmp_path / "bare")
    assert not (tmp_path / "bare" / "processor.json").exists()
    assert tower_normalisation(tmp_path / "bare") is None
    third = build_model("llava", LlavaConfig.preset("tiny", vision_init=str(tmp_path / "bare")), seed=0)
    assert third.config.processor == LlavaConfig.preset("tiny").processor


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"image_mean": [0.1, 0.2]}, "image_mean must be one number or three"),
     ({"image_std": [0.5, 0.0, 0.5]}, "image_std must be positive"),
     ({"do_rescale": False}, "divides them by 255")],
)  # fmt: skip
def test_image_processor_settings_visto_cannot_follow_are_named(settings, message, tmp_path):
    save_tower(tmp_path / "tower")
    (tmp_path / "tower" / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(UserError, match=message):
        tower_normalisation(tmp_path / "tower")


def test_one_number_and_no_normalisation_are_read(tmp_path):
    save_tower(tmp_path / "tower")
    where = tmp_path / "tower" / "preprocessor_config.json"
    where.write_text(json.dumps({"image_mean": 0.5, "image_std": 0.25}))
    assert tower_normalisation(tmp_path / "tower") == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    where.write_text(json.dumps({"do_normalize": False, "image_mean": [0.1, 0.2, 0.3]}))
    assert tower_normalisation(tmp_path / "tower") == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
