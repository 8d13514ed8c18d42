"""A tiny random transformers FuyuForCausalLM (Llama text model) loads into visto with the same
logits; a Persimmon Fuyu (the released Fuyu-8B's layout) is refused with the reasons."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers  # a hard dependency: a broken install fails here, not skips
from PIL import Image

from visto.data.processor import ProcessorConfig, patch_image_transform
from visto.data.special_tokens import IMAGE_TOKEN_ID
from visto.errors import UserError
from visto.models.fuyu import from_transformers

PATCH = 8
TEXT = dict(
    model_type="llama", vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    tie_word_embeddings=True, rms_norm_eps=1e-6,
)


def save_tiny_fuyu(directory, tie: bool = True) -> None:
    text = {**TEXT, "tie_word_embeddings": tie}
    config = transformers.FuyuConfig(
        text_config=text, image_token_id=IMAGE_TOKEN_ID, patch_size=PATCH, num_channels=3,
        image_size=32, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.FuyuForCausalLM(config).eval()
    with torch.no_grad():  # random biases too, so a dropped bias would show
        model.model.vision_embed_tokens.bias.normal_()
    model.save_pretrained(directory)


def wide_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))  # -> 3 x 4 patches


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_transformers_fuyu_logits_agree(tmp_path, tie):
    from transformers.image_processing_utils import SizeDict
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    save_tiny_fuyu(tmp_path, tie)
    proc = ProcessorConfig(image_size=32, resize_mode="patch", patch_size=PATCH, image_delimiters=False, vocab_size=400)
    ours = from_transformers(tmp_path, proc)
    theirs = transformers.FuyuForCausalLM.from_pretrained(tmp_path).eval()

    # One padded image, patchified by each side's own code: visto (channel, y, x), transformers
    # (y, x, channel). The key map permutes the projection's columns to match.
    pixels, (rows, cols) = patch_image_transform(wide_image(), proc)  # (3, 24, 32)
    assert (rows, cols) == (3, 4)
    from visto.data.processor import patchify

    ours_patches = patchify(pixels, PATCH)  # (12, 192)
    hf_patches = torch.from_numpy(
        FuyuImageProcessorPil().patchify_image(pixels.numpy(), SizeDict(height=PATCH, width=PATCH))
    )
    assert hf_patches.shape == ours_patches.shape and not torch.equal(hf_patches, ours_patches)

    newline = 6
    image_ids = ([IMAGE_TOKEN_ID] * cols + [newline]) * rows
    ids = torch.tensor([[1, 20, 21, *image_ids, 30, 31, 32, 33]])
    with torch.no_grad():
        expected = theirs(input_ids=ids, pixel_values=hf_patches[None]).logits
        embeds = ours.embed_inputs(ids, ours_patches)
        got, _ = ours.language_model(inputs_embeds=embeds)
        text_only, _ = ours.language_model(input_ids=ids[:, :3])
        expected_text = theirs(input_ids=ids[:, :3]).logits
    assert (got - expected).abs().max() < 1e-4
    assert (text_only - expected_text).abs().max() < 1e-4


def test_persimmon_fuyu_is_refused_with_reasons(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "fuyu", "text_config": {"model_type": "persimmon"}}))
    with pytest.raises(UserError, match="Persimmon.*qk_layernorm.*partial rotary"):
        from_transformers(tmp_path)
