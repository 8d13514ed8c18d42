"""visto.pretrained: the parts a config names on disk are read there and handed to the family
constructors, which take built parts and never open a file (models/ does not import
checkpoint.py: tests/test_layers.py)."""

from __future__ import annotations

import builtins
import io
from dataclasses import fields
from unittest import mock

import pytest
import torch

from visto.checkpoint import save_checkpoint
from visto.errors import UserError
from visto.models import FAMILIES
from visto.models import build_model as build_from_parts
from visto.models.blip2 import Blip2, Blip2Config
from visto.models.clip import CLIP, CLIPConfig
from visto.models.clipseg import CLIPSeg, CLIPSegConfig
from visto.models.common import PART_PATHS
from visto.models.flamingo import Flamingo, FlamingoConfig
from visto.models.fuyu import Fuyu, FuyuConfig
from visto.models.llava import Llava, LlavaConfig
from visto.nn.language import DecoderConfig, DecoderLM
from visto.nn.vision import ViT, ViTConfig
from visto.pretrained import build_model


def tiny_config(family: str, **overrides):
    config_cls = FAMILIES[family][0]
    if family == "clipseg":
        return config_cls(clip=CLIPConfig.preset("tiny"), decoder_layers=1, **overrides)
    return config_cls.preset("tiny", **overrides)


PATH_FIELDS = [(family, name) for family, (config_cls, _) in sorted(FAMILIES.items())
               for name in PART_PATHS if name in {f.name for f in fields(config_cls)}]  # fmt: skip


@pytest.mark.parametrize(("family", "field"), PATH_FIELDS)
def test_a_constructor_refuses_a_config_naming_parts_on_disk(family, field, tmp_path):
    config = tiny_config(family, **{field: str(tmp_path / "somewhere")})
    for build in (lambda: FAMILIES[family][1](config), lambda: build_from_parts(family, config)):
        with pytest.raises(UserError, match=f"{field}=.*visto.pretrained.build_model"):
            build()


def test_every_families_paths_are_known():
    """A new path field must be one pretrained.py reads (PART_PATHS), or it would pass unread."""
    for config_cls, _ in FAMILIES.values():
        named = {f.name for f in fields(config_cls) if f.name.endswith(("_init", "_checkpoint"))}
        assert named <= set(PART_PATHS), named


@pytest.fixture()
def no_files():
    """Any file opened inside fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a constructor opened a file: {args[:1]}")

    with mock.patch.object(builtins, "open", refuse), mock.patch.object(io, "open", refuse):
        yield


def test_constructors_take_built_parts_without_opening_a_file(no_files):
    """The parts are used as given (the same modules) and bring their architectures."""
    tower = ViT(ViTConfig.preset("tiny", layers=1))
    decoder = DecoderLM(DecoderConfig.preset("tiny", vocab_size=400, num_layers=1))

    llava = Llava(LlavaConfig.preset("tiny"), vision=tower, language=decoder)
    assert llava.vision_tower is tower and llava.language_model is decoder
    assert llava.config.vision == tower.config and llava.config.decoder == decoder.config
    flamingo = Flamingo(FlamingoConfig.preset("tiny"), vision=tower, language=decoder)
    assert flamingo.vision_model is tower and flamingo.config.decoder.num_layers == 1
    fuyu = Fuyu(FuyuConfig.preset("tiny"), language=decoder)
    assert fuyu.language_model is decoder and fuyu.config.decoder == decoder.config

    clip = CLIP(CLIPConfig.preset("tiny", vision=ViTConfig.preset("tiny", pool="mean")), vision=tower)
    assert clip.vision_model is tower and clip.config.vision.layers == 1
    assert clip.config.vision.pool == "mean"  # the architecture is the tower's, the pooling the config's
    seg = CLIPSeg(CLIPSegConfig(clip=CLIPConfig.preset("tiny"), decoder_layers=1), clip=clip)
    assert seg.clip is clip and seg.config.clip == clip.config

    stage1 = Blip2(Blip2Config.preset("tiny"))
    stage2 = Blip2(Blip2Config.preset("tiny", losses=["lm"]), stage1=stage1)
    assert stage2.config.stage == 2 and stage2.config.qformer == stage1.config.qformer
    stage1_weights = stage1.state_dict()
    assert all(torch.equal(v, stage1_weights[k]) for k, v in stage2.state_dict().items())


def test_a_seeded_build_from_files_is_one_model_and_leaves_the_rng_alone(tmp_path):
    """Reading a checkpoint builds (and so draws from the RNG): under a seed the parts are read
    inside the seeded draws, so the same seed gives the same fresh weights every time."""
    save_checkpoint(build_model("clip", tiny_config("clip"), seed=1), tmp_path / "clip")
    config = tiny_config("llava", vision_init=str(tmp_path / "clip"))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first, second = (build_model("llava", config, seed=7).state_dict() for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = build_model("llava", config, seed=8).state_dict()
    assert not torch.equal(first["multi_modal_projector.linear_1.weight"],
                           other["multi_modal_projector.linear_1.weight"])  # fmt: skip
    # the path is consumed: the config the model keeps (and saves) names no file
    assert build_model("llava", config, seed=7).config.vision_init is None
