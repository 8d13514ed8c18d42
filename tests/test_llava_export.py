"""LLaVA -> transformers' LlavaForConditionalGeneration: same logits (fp32), and its processor
reads the exported tokenizer into the same ids ours makes (the route to vLLM)."""

from __future__ import annotations

import pytest
import torch
import transformers  # a hard dependency: a broken install fails here, not skips

from visto.data.sample import Sample, Turn
from visto.data.tokenizer import train_tokenizer
from visto.errors import UserError
from visto.models import build_model
from visto.models.llava import LlavaConfig, export_hf
from visto.nn.vision import ViTConfig


def samples():
    from PIL import Image

    red = Image.new("RGB", (40, 40), (220, 30, 30))
    blue = Image.new("RGB", (48, 32), (30, 40, 220))
    return [
        Sample("a", [red], [Turn("user", "<image>\nWhat colour?"), Turn("assistant", "red")]),
        Sample("b", [red, blue], [
            Turn("user", "<image> and <image>: which is blue?"), Turn("assistant", "the second"),
            Turn("user", "Sure?"), Turn("assistant", "yes"),
        ]),
    ]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    texts = ["What colour?", "red", "which is blue?", "the second", "Sure?", "yes"] * 3
    train_tokenizer(texts, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return path


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_transformers_llava_gives_our_logits(tokenizer_dir, tmp_path, pos_embed):
    config = LlavaConfig.preset(
        "tiny",
        vision=ViTConfig.preset("tiny", pos_embed=pos_embed),
        vision_feature_layer=-2,  # the penultimate layer, as LLaVA 1.5
        tokenizer_dir=str(tokenizer_dir),
    )
    model = build_model("llava", config, seed=0).eval()
    with torch.no_grad():  # non-zero biases and gains, so a dropped tensor would show
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "layernorm.weight")):
                p.add_(0.1 * torch.randn_like(p))
    export_hf(model, tmp_path / "hf")

    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    batch = model.collate(samples())
    with torch.no_grad():
        ours, _ = model.language_model(
            inputs_embeds=model.embed_inputs(batch["input_ids"], batch["pixel_values"]),
            attention_mask=batch["attention_mask"],
        )
        theirs = hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits
    real = batch["attention_mask"].bool()
    assert (ours[real] - theirs[real]).abs().max() < 1e-4


def test_exported_processor_makes_our_prompt_ids(tokenizer_dir, tmp_path):
    model = build_model("llava", LlavaConfig.preset("tiny", tokenizer_dir=str(tokenizer_dir)), seed=0)
    export_hf(model, tmp_path / "hf")
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    sample = samples()[1]
    messages = [{"role": t.role, "content": t.content} for t in sample.turns[:-1]]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    hf_ids = processor(text=text, images=sample.images, return_tensors="pt")["input_ids"][0]
    ours = model.processor.encode(sample, train=False).input_ids
    assert hf_ids.tolist() == ours.tolist()


def test_export_refuses_what_transformers_cannot_read(tokenizer_dir, tmp_path):
    from visto.connectors.projector import ProjectorConfig
    from visto.data.processor import ProcessorConfig

    shuffled = LlavaConfig.preset(
        "tiny", projector=ProjectorConfig(kind="pixel_shuffle"),
        processor=ProcessorConfig(image_size=32, image_tokens=4, image_delimiters=False,
                                  vocab_size=400, loc_bins=32),
    )
    with pytest.raises(UserError, match="projector kind 'mlp'"):
        export_hf(build_model("llava", shuffled), tmp_path / "a")
    delimited = LlavaConfig.preset(
        "tiny", processor=ProcessorConfig(image_size=32, image_tokens=16, vocab_size=400, loc_bins=32)
    )
    with pytest.raises(UserError, match="image_delimiters must be false"):
        export_hf(build_model("llava", delimited), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
