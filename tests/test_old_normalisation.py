"""Image normalisation lives in the processor alone (ProcessorConfig.mean/std). Checkpoints
saved when the tower's config held it too (vision.image_mean / image_std) still load and give
the same pixel_values and logits; a transformers CLIP keeps its preprocessor_config.json's.

The old layouts are written by hand here from the old field names, and the expected pixels
are computed by hand, so these tests do not depend on the code that wrote them."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import visto
from test_transformers_parts import save_two_tower
from visto.checkpoint import load, save_checkpoint
from visto.config import from_dict, to_dict
from visto.models.clip import CLIPConfig
from visto.models.clipseg import CLIPSegConfig
from visto.models.common import training_logits
from visto.models.llava import LlavaConfig
from visto.nn.vision import CLIP_MEAN, CLIP_STD, ViTConfig, pop_old_normalisation
from visto.pretrained import build_model

MEAN, STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)  # not CLIP's constants, nor the processor's 0.5


def images() -> list[Image.Image]:
    """A non-square image (resized) and one already at the tower's 32 px."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))]  # fmt: skip


def by_hand(image: Image.Image, mean, std, size: int = 32) -> torch.Tensor:
    """(x / 255 - mean) / std in float32 after a bicubic resize to size x size."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, np.uint8).transpose(2, 0, 1).astype(np.float32))
    return x.div(255.0).sub(torch.tensor(mean).view(3, 1, 1)).div(torch.tensor(std).view(3, 1, 1))


def write_old_layout(path, vision_mean, vision_std, drop=("processor",)) -> dict:
    """Rewrite a checkpoint's config.json in the layout of before: the normalisation also in
    the tower's config (image_mean / image_std), without the fields added since."""
    meta = json.loads((path / "config.json").read_text())
    for key in drop:
        meta["config"].pop(key, None)
    meta["config"]["vision"]["image_mean"] = list(vision_mean)
    meta["config"]["vision"]["image_std"] = list(vision_std)
    (path / "config.json").write_text(json.dumps(meta, indent=2))
    return meta


def clip_logits(model, pixels: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 2], [1, 7, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        return (
            model.encode_image(pixels)
            @ model.encode_text_tokens(ids, mask).T
            * model.logit_scale.exp()
        )


@pytest.mark.parametrize("mean, std", [(MEAN, STD), (CLIP_MEAN, CLIP_STD)])
def test_old_processorless_clip_keeps_its_towers_normalisation(mean, std, tmp_path):
    """Layout 1: a CLIP with no processor normalised with vision.image_mean / image_std."""
    model = build_model("clip", CLIPConfig.preset("tiny"), seed=0).eval()
    save_checkpoint(model, tmp_path / "clip")
    write_old_layout(tmp_path / "clip", mean, std)
    old = load(tmp_path / "clip")
    assert old.processor is None
    expected = torch.stack([by_hand(im, mean, std) for im in images()])
    pixels = old.image_tensor(images())
    assert torch.equal(pixels, expected)
    assert torch.equal(clip_logits(old, pixels), clip_logits(model, expected))
    # CLIP's own constants are the default: nothing to keep; others move to `processor`.
    assert (old.config.processor is None) == ((mean, std) == (CLIP_MEAN, CLIP_STD))
    # Re-saved, it is in today's layout and loads to the same pixels.
    save_checkpoint(old, tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["config"]
    assert "image_mean" not in saved["vision"] and "image_std" not in saved["vision"]
    assert torch.equal(load(tmp_path / "again").image_tensor(images()), expected)


def test_old_checkpoint_with_a_processor_keeps_the_processors(tokenizer_dir, tmp_path):
    """Layout 2: a LLaVA whose processor.json normalised (mean/std 0.5) while its config.json's
    vision held a copy nothing read (CLIP's constants, ViTConfig's old default)."""
    from test_llava import colour_samples

    model = build_model(
        "llava", LlavaConfig.preset("tiny", tokenizer_dir=str(tokenizer_dir)), seed=0
    ).eval()
    samples = colour_samples(2, seed=1)
    batch = model.collate(samples)
    save_checkpoint(model, tmp_path / "llava")
    write_old_layout(tmp_path / "llava", CLIP_MEAN, CLIP_STD, drop=())
    old = load(tmp_path / "llava")
    assert old.processor.config.mean == (0.5, 0.5, 0.5) and old.config.processor.mean == (
        0.5,
        0.5,
        0.5,
    )
    again = old.collate(samples)
    expected = torch.stack([by_hand(s.images[0], (0.5,) * 3, (0.5,) * 3) for s in samples])
    assert torch.equal(again["pixel_values"], expected)
    assert torch.equal(batch["pixel_values"], expected)

    def logits(m, b):
        with torch.no_grad():
            embeds = m.embed_inputs(b["input_ids"], b["pixel_values"], b.get("image_sample_index"))
            return training_logits(m.language_model, embeds, b)

    assert torch.equal(logits(old, again), logits(model, batch))


@pytest.fixture
def tokenizer_dir(tmp_path):
    from test_llava import TEXTS
    from visto.data.tokenizer import train_tokenizer

    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(
        tmp_path / "tokenizer.json"
    )
    return tmp_path


def test_pop_old_normalisation_and_the_configs_that_nest_a_tower():
    """The migration itself: the old keys leave every tower config; a CLIP's (clipseg's too)
    move to its `processor`; recipes and run configs of other families load as they are."""
    vision = {"image_size": 16, "patch_size": 8, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    assert pop_old_normalisation(vision) == (
        {"image_size": 16, "patch_size": 8}, {"mean": [0.5] * 3, "std": [0.25] * 3})  # fmt: skip
    assert pop_old_normalisation({"width": 8}) == ({"width": 8}, {})

    clip = from_dict(CLIPConfig, {"vision": vision})
    assert clip.processor.mean == (0.5,) * 3 and clip.processor.std == (0.25,) * 3
    assert clip.processor.image_size == 16 and clip.processor.resize_mode == "resize"
    only_mean = from_dict(CLIPConfig, {"vision": {"image_mean": list(MEAN)}}).processor
    assert (only_mean.mean, only_mean.std, only_mean.image_size) == (MEAN, CLIP_STD, 64)
    seg = from_dict(
        CLIPSegConfig, {"clip": {"vision": {**vision, "layers": 3}}, "decoder_layers": 1}
    )
    assert seg.clip.processor.mean == (0.5,) * 3
    llava = from_dict(LlavaConfig, {"vision": vision})
    assert llava.processor.mean == (0.5,) * 3 and llava.processor.std == (0.5,) * 3  # its own
    assert "image_mean" not in to_dict(llava)["vision"]
    with pytest.raises(visto.errors.UserError, match="unknown setting"):
        from_dict(ViTConfig, {"image_means": [0.5] * 3})  # a typo is still an error


def test_vit_config_no_longer_holds_a_normalisation():
    """Callers that still pass the old arguments are warned; the value is not kept."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = ViTConfig(image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    assert [w.category for w in caught] == [DeprecationWarning]
    assert "image_mean" not in to_dict(config) and "image_std" not in to_dict(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ViTConfig.preset("tiny")  # the ordinary path does not warn


def test_transformers_clip_keeps_its_preprocessor_normalisation(tmp_path):
    """A transformers CLIPModel directory with its own preprocessor_config.json: visto.load's
    embed_images equals transformers' processor + get_image_features, and a visto checkpoint of
    it (no visto processor) keeps that normalisation."""
    hf, _tok = save_two_tower("clip", tmp_path / "m")
    processor = transformers.CLIPImageProcessor(
        size={"height": 32, "width": 32}, do_center_crop=False, resample=3,
        image_mean=list(MEAN), image_std=list(STD),
    )  # fmt: skip
    processor.save_pretrained(tmp_path / "m")
    ours = visto.load(tmp_path / "m")
    assert ours.config.processor.mean == MEAN and ours.config.processor.std == STD
    square = [images()[1]]  # transformers resizes in float; at the tower's size there is no resize
    theirs = processor(images=square, return_tensors="pt")["pixel_values"]
    assert (ours.image_tensor(square) - theirs).abs().max() < 1e-5
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=theirs)
    ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    ref = torch.nn.functional.normalize(ref, dim=-1)
    assert (ours.embed_images(square) - ref).abs().max() < 1e-4
    save_checkpoint(ours, tmp_path / "visto")
    again = load(tmp_path / "visto")
    assert again.config.processor == ours.config.processor
    assert torch.equal(again.image_tensor(images()), ours.image_tensor(images()))
    assert torch.equal(
        ours.image_tensor(images()), torch.stack([by_hand(im, MEAN, STD) for im in images()])
    )
