"""CLIP family: collate -> forward -> loss, training on a toy world, locks, clamp, registry."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from visto.data.pairs import caption_of
from visto.data.processor import Processor, ProcessorConfig
from visto.data.sample import Sample, Turn
from visto.data.tokenizer import train_tokenizer
from visto.errors import UserError
from visto.models import FAMILIES
from visto.models.clip import CLIP, CLIPConfig
from visto.nn.text import TextConfig
from visto.nn.vision import ViTConfig
from visto.pretrained import build_model

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
}


def toy_samples() -> list[Sample]:
    """A plain square of each colour, captioned by its colour (half via truth, half via turns)."""
    samples = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (40, 40), (250, 250, 250))
        image.paste(Image.new("RGB", (20, 20), rgb), (10, 10))
        if i % 2:
            samples.append(Sample(str(i), [image], truth={"caption": f"a {name} square"}))
        else:
            turns = [Turn("user", "<image>\nDescribe."), Turn("assistant", f"a {name} square")]
            samples.append(Sample(str(i), [image], turns))
    return samples


@pytest.fixture(scope="module")
def processor() -> Processor:
    texts = [f"a {c} square" for c in COLOURS] * 5
    config = ProcessorConfig(image_size=32, resize_mode="resize", loc_bins=4, vocab_size=300)
    return Processor(config, train_tokenizer(texts, vocab_size=300, loc_bins=4, min_frequency=1))


def tiny_clip(processor: Processor, **overrides) -> CLIP:
    config = CLIPConfig.preset("tiny", **overrides)
    model = build_model("clip", config, seed=0)
    model.processor = processor
    return model


def test_collate_forward_backward(processor):
    model = tiny_clip(processor)
    batch = model.collate(toy_samples())
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert (
        batch["input_ids"].shape[0] == 4
        and batch["attention_mask"].shape == batch["input_ids"].shape
    )
    out = model(batch)
    assert set(out) == {"loss", "logit_scale", "acc_i2t", "acc_t2i"}
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    # At init the scale is 1 / 0.07 and the loss is near log(B) (embeddings barely aligned).
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    out["loss"].backward()
    assert model.logit_scale.grad is not None
    assert model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert model.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0


def train_toy(model: CLIP, steps: int) -> tuple[float, dict]:
    batch = model.collate(toy_samples())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(batch)["loss"].item()
    for _ in range(steps):
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return first, model(batch)


def test_training_separates_the_toy_world(processor):
    model = tiny_clip(processor)
    first, out = train_toy(model, steps=40)
    assert out["loss"].item() < first / 10
    assert out["acc_i2t"].item() == 1.0 and out["acc_t2i"].item() == 1.0
    # The PIL/str conveniences agree with the trained model: each image retrieves its caption.
    images = [s.images[0] for s in toy_samples()]
    sims = model.embed_images(images) @ model.embed_texts([caption_of(s) for s in toy_samples()]).T
    assert sims.argmax(dim=1).tolist() == [0, 1, 2, 3]


@pytest.mark.slow
def test_siglip_training_lowers_the_loss(processor):
    # With 4 pairs SigLIP sits on a plateau (all images alike) for ~80 steps before it
    # separates them; InfoNCE's softmax escapes it at once. So: more steps, a looser check.
    first, out = train_toy(tiny_clip(processor, loss="siglip"), steps=150)
    assert out["loss"].item() < 0.75 * first


def test_locked_image_tower_gets_no_gradient(processor):
    model = tiny_clip(processor, lock_image=True)
    model.train()
    assert not model.vision_model.training and model.text_model.training
    # Even if a training loop turns requires_grad back on, a locked tower runs without grad.
    model.vision_model.requires_grad_(True)
    model(model.collate(toy_samples()))["loss"].backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert model.visual_projection.weight.grad is not None  # LiT trains the head
    assert model.text_model.embeddings.token_embedding.weight.grad is not None


def test_logit_scale_is_clamped_at_100(processor):
    model = tiny_clip(processor)
    batch = model.collate(toy_samples())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    model.eval()
    assert model(batch)["logit_scale"].item() == pytest.approx(100.0, rel=1e-5)
    model.train()
    out = model(batch)
    assert out["logit_scale"].item() == pytest.approx(100.0, rel=1e-5)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0), rel=1e-6)  # the parameter too
    out["loss"].backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad != 0


def test_siglip_has_learnable_bias(processor):
    model = tiny_clip(processor, loss="siglip")
    out = model(model.collate(toy_samples()))
    assert out["logit_bias"].item() == -10.0
    out["loss"].backward()
    assert model.logit_bias.grad is not None


def test_checkpoint_round_trip(processor, tmp_path):
    from visto.checkpoint import load, save_checkpoint

    model = tiny_clip(processor).eval()
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")
    texts = ["a red square", "a blue square"]
    torch.testing.assert_close(loaded.embed_texts(texts), model.embed_texts(texts))
    images = [s.images[0] for s in toy_samples()]
    torch.testing.assert_close(loaded.embed_images(images), model.embed_images(images))


def test_own_image_transform_without_processor_and_size_mismatch(processor):
    model = build_model("clip", CLIPConfig.preset("tiny"), seed=0)
    model.text_model.set_tokenizer(processor.tokenizer)
    emb = model.embed_images([s.images[0] for s in toy_samples()])
    assert emb.shape == (4, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    wrong = Processor(
        ProcessorConfig(image_size=48, resize_mode="resize", loc_bins=4), processor.tokenizer
    )
    model.processor = wrong
    with pytest.raises(UserError, match="agree"):
        model.embed_images([s.images[0] for s in toy_samples()])


def test_captions_and_bad_samples():
    s = Sample(
        "x", [Image.new("RGB", (8, 8))], [Turn("assistant", "a cat")], truth={"caption": "a dog"}
    )
    assert caption_of(s) == "a dog"
    assert caption_of(Sample("y", turns=[Turn("assistant", "<image> a cat")])) == "a cat"
    assert caption_of(Sample("z", truth={"captions": ["one", "two"]})) == "one"
    with pytest.raises(UserError, match="no caption"):
        caption_of(Sample("w", turns=[Turn("user", "hi")]))
    model = build_model("clip", CLIPConfig.preset("tiny"), seed=0)
    with pytest.raises(UserError, match="no image"):
        model.collate([Sample("v", truth={"caption": "a dog"})])


def test_registry_and_config_checks(processor):
    assert FAMILIES["clip"] == (CLIPConfig, CLIP)
    with pytest.raises(UserError, match="unknown model family"):
        build_model("nope", {})
    with pytest.raises(UserError, match="unknown setting"):
        build_model("clip", {"vision": {"widht": 3}})
    with pytest.raises(UserError, match="clip loss"):
        CLIPConfig(loss="triplet")
    from_dict = build_model(
        "clip",
        {
            "vision": {
                "image_size": 32,
                "patch_size": 8,
                "width": 32,
                "layers": 1,
                "heads": 2,
                "mlp_hidden": 64,
            },
            "text": {"width": 32, "layers": 1, "heads": 2, "mlp_hidden": 64, "vocab_size": 300},
            "embed_dim": 16,
        },
        seed=3,
    )
    again = build_model("clip", from_dict.config, seed=3)
    for (name, a), (_, b) in zip(
        from_dict.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert isinstance(from_dict.config.vision, ViTConfig) and isinstance(
        from_dict.config.text, TextConfig
    )
    too_small = build_model(
        "clip", CLIPConfig.preset("tiny", text=TextConfig.preset("tiny", vocab_size=100))
    )
    with pytest.raises(UserError, match="vocab_size"):
        too_small.processor = processor


def test_locked_text_tower_encodes_each_caption_once(processor):
    cached = tiny_clip(processor, lock_text=True)
    plain = tiny_clip(processor, lock_text=True, text_cache_size=0)
    plain.load_state_dict(cached.state_dict())
    rows_encoded = []
    cached.text_model.register_forward_hook(lambda m, args, out: rows_encoded.append(args[0].shape[0]))
    samples = toy_samples()
    batch = cached.collate(samples + samples[:2])  # two captions twice in one batch
    cached.train(), plain.train()
    for _ in range(2):
        out = cached(batch)
        torch.testing.assert_close(out["loss"], plain(batch)["loss"])
    assert rows_encoded == [4]  # four distinct captions, encoded once, in the first step only
    out["loss"].backward()
    assert cached.text_projection.weight.grad is not None  # the head still trains
    assert all(p.grad is None for p in cached.text_model.parameters())
    # Without the cache the locked tower runs without grad too, even with requires_grad back on.
    plain.text_model.requires_grad_(True)
    plain(batch)["loss"].backward()
    assert all(p.grad is None for p in plain.text_model.parameters())
    # Features cached in inference mode (visto eval) serve a later training step too: the
    # stacked features are a new, normal tensor that backward may save.
    with torch.inference_mode():
        cached.embed_texts(["a purple square"])
    purple = Sample("p", samples[0].images, truth={"caption": "a purple square"})
    cached(cached.collate([*samples, purple]))["loss"].backward()
    assert rows_encoded == [4, 1]
    # New weights make the cached features stale: loading a state dict empties the cache.
    state = {k: v + 0.1 if k.startswith("text_model.") else v for k, v in cached.state_dict().items()}
    cached.load_state_dict(state), plain.load_state_dict(state)
    torch.testing.assert_close(cached(batch)["loss"], plain(batch)["loss"])
    assert rows_encoded == [4, 1, 4]


@pytest.mark.slow
def test_lit_with_locked_minilm_text_tower(processor):
    config = CLIPConfig.preset("tiny", text=TextConfig.preset("minilm"), lock_text=True)
    model = build_model("clip", config, seed=0)
    model.processor = processor  # images only: MiniLM brings its own tokenizer
    batch = model.collate(toy_samples())
    model(batch)["loss"].backward()
    assert all(p.grad is None for p in model.text_model.parameters())
    assert model.text_projection.weight.grad is not None
    assert model.vision_model.embeddings.patch_embedding.weight.grad is not None
    assert model.embed_texts(["a red square"]).shape == (1, 32)


@pytest.mark.parametrize("family", ["clip", "llava"])  # llava: what `visto quickstart --until vision` saves
def test_vision_init_brings_a_pretrained_tower_and_keeps_the_recipes_pooling(processor, tmp_path, family):
    from visto.checkpoint import load, save_checkpoint
    from visto.models.llava import LlavaConfig

    tower_config = ViTConfig.preset("tiny", image_size=32, layers=1, pool="cls")
    if family == "clip":
        source = tiny_clip(processor, vision=tower_config)
        source_tower = source.vision_model
    else:
        texts = ["a red square"] * 5
        tok_dir = tmp_path / "tok"
        train_tokenizer(texts, vocab_size=300, loc_bins=32, min_frequency=1).save(tok_dir / "tokenizer.json")
        source = build_model("llava", LlavaConfig.preset("tiny", vision=tower_config, tokenizer_dir=str(tok_dir)))
        source_tower = source.vision_tower
    with torch.no_grad():
        for p in source_tower.parameters():
            p.add_(0.1 * torch.randn_like(p))  # as if trained: not a fresh init
    save_checkpoint(source, tmp_path / "tower")
    model = tiny_clip(processor, vision_init=str(tmp_path / "tower"),
                      vision=ViTConfig.preset("tiny", image_size=32, pool="mean"))  # fmt: skip
    assert model.config.vision_init is None and model.config.vision.layers == 1
    assert model.config.vision.pool == "mean"  # architecture from the checkpoint, pooling from the recipe
    for key, value in source_tower.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[key], value), key
    # The saved model rebuilds without the source (the path is consumed at build time).
    save_checkpoint(model, tmp_path / "clip")
    again = load(tmp_path / "clip")
    pixels = model.collate(toy_samples())["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(pixels), model.eval().encode_image(pixels))
    with pytest.raises(UserError, match="not a checkpoint"):
        tiny_clip(processor, vision_init=str(tmp_path / "nowhere"))


def test_image_tensor_without_a_processor_uses_the_configs_processor_settings():
    """A CLIP with no processor attached resizes with the processor's transform ("resize"
    mode) and normalises with its config's `processor` settings (was nn.vision.images_to_tensor
    with the vision config's mean/std)."""
    from dataclasses import replace

    config = CLIPConfig.preset("tiny")
    vision = replace(config.vision, image_size=16, patch_size=8)
    pixels = ProcessorConfig(image_size=16, resize_mode="resize", mean=(0.5,) * 3, std=(0.5,) * 3)
    model = build_model("clip", replace(config, vision=vision, processor=pixels), seed=0)
    assert model.processor is None
    img = Image.new("RGB", (50, 20), (255, 0, 0))
    x = model.image_tensor([img, img.convert("L")])
    assert x.shape == (2, 3, 16, 16)
    torch.testing.assert_close(x[0, :, 5, 5], torch.tensor([1.0, -1.0, -1.0]))
