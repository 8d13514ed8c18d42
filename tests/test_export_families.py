"""`visto export --format hf` beyond LLaVA: a visto BLIP-2, Fuyu and Flamingo written as
transformers' Blip2ForConditionalGeneration, FuyuForCausalLM and IdeficsForVisionText2Text,
loaded back by transformers with nothing missing and the same logits; what cannot be mapped
exactly is refused with the part and what to do."""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # a hard dependency: a broken install fails here, not skips

from test_flamingo_idefics import inputs as idefics_inputs
from test_llava import TEXTS
from visto.checkpoint import save_checkpoint
from visto.data.special_tokens import IMAGE_TOKEN_ID
from visto.data.tokenizer import train_tokenizer
from visto.errors import UserError
from visto.models import build_model
from visto.models.transformers_format import export_transformers
from visto.nn.lora import LoraConfig, apply_lora

TOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return str(path)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight random and sizeable (zero gates and zero biases would hide a dropped part)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / p.shape[-1] ** 0.5)
            else:
                p.copy_(noise * 0.2 + (1.0 if ("norm" in name or "alpha" in name) else 0.0))


def load_theirs(cls, directory) -> torch.nn.Module:
    model, info = cls.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


# ----------------------------------------------------------------------------- Fuyu


def test_fuyu_exports_to_fuyu_for_causal_lm_with_equal_logits(tokenizer_dir, tmp_path):
    """Through the CLI, with LoRA adapters merged on the way."""
    from transformers.image_processing_utils import SizeDict
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    from visto.cli import main
    from visto.data.processor import patch_image_transform, patchify
    from visto.models.fuyu import FuyuConfig

    ours = build_model("fuyu", FuyuConfig.preset("tiny", tokenizer_dir=tokenizer_dir), seed=0)
    randomize(ours)
    apply_lora(ours, LoraConfig(rank=2, targets=["q_proj", "v_proj"]))
    randomize(ours, seed=1)  # the adapters too, so merging them changes the numbers
    ours.eval()
    save_checkpoint(ours, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    theirs = load_theirs(transformers.FuyuForCausalLM, tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

    from test_fuyu_hf import wide_image

    pixels, (rows, cols) = patch_image_transform(wide_image(), ours.config.processor)
    hf_patches = torch.from_numpy(
        FuyuImageProcessorPil().patchify_image(pixels.numpy(), SizeDict(height=8, width=8))
    )
    newline = ours.processor.tokenizer.encode("a")[0]  # any id: the row end is a plain token
    ids = torch.tensor([[1, 20, 21, *([IMAGE_TOKEN_ID] * cols + [newline]) * rows, 30, 31]])
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=hf_patches[None]).logits
        got, _ = ours.language_model(inputs_embeds=ours.embed_inputs(ids, patchify(pixels, 8)))
    assert expected.abs().max() > 1
    assert (got - expected).abs().max() < TOL


# ----------------------------------------------------------------------------- BLIP-2


def tiny_blip2(tokenizer_dir, **overrides):
    from visto.models.blip2 import Blip2Config

    config = Blip2Config.preset("tiny", tokenizer_dir=tokenizer_dir, losses=["lm"], **overrides)
    return build_model("blip2", config, seed=0)


def test_blip2_exports_to_blip2_for_conditional_generation_with_equal_logits(tokenizer_dir, tmp_path):
    ours = tiny_blip2(tokenizer_dir, vision_pre_norm=False)
    randomize(ours)
    ours.eval()
    export_transformers(ours, tmp_path / "hf")
    theirs = load_theirs(transformers.Blip2ForConditionalGeneration, tmp_path / "hf")
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(20, 400, (2, 14))
    ids[:, :8] = IMAGE_TOKEN_ID  # the processor's 8 <image> ids, then text
    with torch.no_grad():
        expected = theirs(pixel_values=pixels, input_ids=ids).logits
        got, _ = ours.language_model(inputs_embeds=ours.embed_inputs(ids, pixels))
    assert expected.abs().max() > 1
    assert (got - expected).abs().max() < TOL
    # And back through visto's reader: the same numbers.
    from visto.models.blip2 import load_hf

    again = load_hf(tmp_path / "hf")
    with torch.no_grad():
        back, _ = again.language_model(inputs_embeds=again.embed_inputs(ids, pixels))
    assert (back - got).abs().max() < TOL


def test_blip2_that_transformers_cannot_hold_is_refused(tokenizer_dir, tmp_path):
    with pytest.raises(UserError, match="LayerNorm before the blocks.*vision_pre_norm false"):
        export_transformers(tiny_blip2(tokenizer_dir), tmp_path / "a")
    from visto.models.blip2 import Blip2Config

    stage1 = build_model("blip2", Blip2Config.preset("tiny", tokenizer_dir=tokenizer_dir,
                                                     vision_pre_norm=False))  # fmt: skip
    with pytest.raises(UserError, match="stage-1 model"):
        export_transformers(stage1, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- Flamingo -> Idefics


def tiny_flamingo(tokenizer_dir, **overrides):
    from visto.connectors.resampler import ResamplerConfig
    from visto.models.flamingo import FlamingoConfig
    from visto.nn.language import DecoderConfig
    from visto.nn.vision import ViTConfig

    exact = dict(
        vision=ViTConfig.preset("tiny", image_size=16, patch_size=8),
        vision_cls_token=True,
        resampler=ResamplerConfig(num_latents=3, depth=2, heads=2, head_dim=8, act="relu"),
        decoder=DecoderConfig.preset("tiny", vocab_size=400, num_layers=4, num_kv_heads=4,
                                     tie_word_embeddings=False),
        cross_attn_every=2,
        gate="vector",
    )  # fmt: skip
    config = FlamingoConfig.preset("tiny", tokenizer_dir=tokenizer_dir, **{**exact, **overrides})
    config.processor.image_size = 16
    return build_model("flamingo", config, seed=0)


def test_flamingo_exports_to_idefics_with_equal_logits(tokenizer_dir, tmp_path):
    ours = tiny_flamingo(tokenizer_dir)
    randomize(ours)
    ours.eval()
    export_transformers(ours, tmp_path / "hf")
    theirs = load_theirs(transformers.IdeficsForVisionText2Text, tmp_path / "hf")
    ids, pixels, image_mask = idefics_inputs(400)
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask,
             "pixel_values": torch.cat([pixels[0], pixels[1, :1]]),
             "image_sample_index": torch.tensor([0, 0, 1])}  # fmt: skip
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                          image_attention_mask=image_mask).logits  # fmt: skip
        got = ours.logits(batch)
        blind = ours.logits({**batch, "pixel_values": torch.randn(3, 3, 16, 16)})
    assert (got - expected).abs().max() < TOL
    assert (blind - got).abs().max() > 1e-2  # the images count: the agreement is not the LM's


def test_flamingo_that_idefics_cannot_hold_is_refused_with_each_reason(tokenizer_dir, tmp_path):
    from visto.connectors.resampler import ResamplerConfig

    model = tiny_flamingo(tokenizer_dir, vision_cls_token=False,
                          resampler=ResamplerConfig(num_latents=3, depth=1, heads=2, act="gelu"))  # fmt: skip
    with pytest.raises(UserError) as e:
        export_transformers(model, tmp_path / "x")
    assert "vision_cls_token true" in str(e.value) and "act 'relu'" in str(e.value)
    assert not (tmp_path / "x").exists()


def test_a_family_transformers_lacks_is_refused_with_what_to_do(tokenizer_dir, tmp_path):
    from visto.models.cogvlm import CogVLMConfig

    cog = build_model("cogvlm", CogVLMConfig.preset("tiny", tokenizer_dir=tokenizer_dir))
    with pytest.raises(UserError, match="no transformers export for 'cogvlm'.*--format visto"):
        export_transformers(cog, tmp_path / "x")
    # The exported config names the class transformers builds from it.
    fuyu = build_model("fuyu", __import__("visto.models.fuyu", fromlist=["FuyuConfig"]).FuyuConfig.preset(
        "tiny", tokenizer_dir=tokenizer_dir))  # fmt: skip
    export_transformers(fuyu, tmp_path / "f")
    assert json.loads((tmp_path / "f" / "config.json").read_text())["architectures"] == ["FuyuForCausalLM"]
