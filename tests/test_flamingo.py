"""Flamingo: closed gates = the frozen LM exactly, per-image media mask, frozen parts, cached
decoding, the engine with several images, checkpoints, recipes."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
from PIL import Image

from visto.checkpoint import load, save_checkpoint
from visto.data.processor import ProcessorConfig
from visto.data.sample import Sample, Turn
from visto.data.special_tokens import IMAGE_TOKEN_ID
from visto.data.tokenizer import train_tokenizer
from visto.errors import UserError
from visto.models.flamingo import PARAM_GROUPS, Flamingo, FlamingoConfig
from visto.nn.language import Conditioning
from visto.pretrained import build_model
from visto.train.loop import train_step
from visto.train.optim import build_param_groups
from visto.train.recipe import load_recipe

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
TEXTS = ["What colour is the square?", "And this one?", "Which came first?", "the red square",
         "Answer briefly.", *COLOURS] * 3


def square(colour: str, size: int = 40) -> Image.Image:
    image = Image.new("RGB", (size, size), (250, 250, 250))
    image.paste(Image.new("RGB", (size // 2, size // 2), COLOURS[colour]), (size // 4, size // 4))
    return image


def colour_samples(n: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c = rng.choice(list(COLOURS))
        turns = [Turn("user", "<image>\nWhat colour is the square?"), Turn("assistant", c)]
        out.append(Sample(f"{seed}-{i}", [square(c)], turns))
    return out


def interleaved(first: str, second: str, third: str) -> Sample:
    """Three images, text after each: the Flamingo layout."""
    return Sample("three", [square(first), square(second), square(third)], [
        Turn("user", "<image>\nWhat colour is the square? <image>\nAnd this one? red"),
        Turn("assistant", "blue"),
        Turn("user", "<image>\nWhich came first?"),
        Turn("assistant", "the red square"),
    ])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return path


def tiny(tokenizer_dir, seed: int = 0, open_gates: bool = False, **overrides) -> Flamingo:
    config = FlamingoConfig.preset("tiny", tokenizer_dir=str(tokenizer_dir), **overrides)
    model = build_model("flamingo", config, seed=seed).eval()
    if open_gates:  # as after training: the visual path contributes
        with torch.no_grad():
            for block in model.gated_cross_attn_layers:
                block.alpha_cross_attn.fill_(1.0)
                block.alpha_dense.fill_(0.5)
    return model


def lm_logits(model: Flamingo, batch: dict) -> torch.Tensor:
    logits, _ = model.language_model(
        batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    )
    return logits


def test_registry_groups_and_one_marker_per_image(tokenizer_dir):
    model = tiny(tokenizer_dir)
    assert isinstance(model, Flamingo) and model.PARAM_GROUPS is PARAM_GROUPS
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == set(PARAM_GROUPS.values())
    batch = model.collate([interleaved("red", "blue", "green")])
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == 3
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    with pytest.raises(UserError, match="image_tokens must be 1"):
        FlamingoConfig.preset("tiny", processor=ProcessorConfig(image_size=32, image_tokens=16))


def test_closed_gates_give_the_frozen_decoders_logits_exactly(tokenizer_dir):
    model = tiny(tokenizer_dir, cross_attn_every=1, gate="vector")
    samples = [interleaved("red", "blue", "green"), colour_samples(1, seed=0)[0],
               Sample("text", [], [Turn("user", "Answer briefly."), Turn("assistant", "red")])]
    batch = model.collate(samples)
    real = batch["attention_mask"].bool()  # padding's logits are not defined: the plain
    # decoder runs its real tokens only (nn/attention.py, PackedLayout), Flamingo keeps the pad
    with torch.no_grad():
        assert torch.equal(model.logits(batch)[real], lm_logits(model, batch)[real])
        # ... and not once a gate opens.
        model.gated_cross_attn_layers[0].alpha_dense.fill_(0.1)
        assert not torch.allclose(model.logits(batch)[real], lm_logits(model, batch)[real])


def _first_block_output(model: Flamingo, batch: dict) -> torch.Tensor:
    """What the first gated block adds to the token embeddings, before any self-attention
    mixes positions: a token's cross-attention sees only its media."""
    ids = batch["input_ids"]
    visual = model.row_visual_tokens(ids, batch["pixel_values"], batch["image_sample_index"])
    x = model.language_model.embed(ids)
    return model.gated_cross_attn_layers[0](x, model.media(ids, visual)) - x


def test_a_token_reads_only_the_image_immediately_before_it(tokenizer_dir):
    model = tiny(tokenizer_dir, seed=1, open_gates=True)
    base = model.collate([interleaved("red", "blue", "green")])
    ids = base["input_ids"][0]
    marks = (ids == IMAGE_TOKEN_ID).nonzero().flatten().tolist()  # the three <image> markers
    before, between, after = slice(0, marks[0]), slice(marks[1] + 1, marks[2]), slice(marks[2] + 1, None)

    def changed(image: int) -> torch.Tensor:
        """Positions whose first-block output changes when image `image` changes."""
        colours = ["red", "blue", "green"]
        colours[image] = "yellow"
        other = model.collate([interleaved(*colours)])
        with torch.no_grad():
            diff = (_first_block_output(model, other) - _first_block_output(model, base)).abs()
        return diff[0].amax(dim=-1) > 1e-6  # (T,)

    for image in range(3):
        moved = changed(image)
        start = marks[image]
        end = marks[image + 1] if image + 1 < 3 else len(ids)
        assert moved[start:end].all(), f"tokens after image {image} must read it"
        assert not moved[:start].any() and not moved[end:].any(), f"image {image} leaks"
    with torch.no_grad():
        out = _first_block_output(model, base)[0]
    assert (out[before] != 0).any()  # the feed-forward applies to every token ...
    with torch.no_grad():
        model.gated_cross_attn_layers[0].alpha_dense.zero_()
        out = _first_block_output(model, base)[0]
    assert torch.equal(out[before], torch.zeros_like(out[before]))  # ... cross-attention not
    assert (out[between] != 0).any() and (out[after] != 0).any()


def test_whole_model_later_images_never_reach_earlier_tokens(tokenizer_dir):
    # Through the decoder's causal self-attention, earlier images still reach later tokens
    # (the paper's point: the dependency on all previous images remains); later ones never
    # reach earlier tokens.
    model = tiny(tokenizer_dir, seed=2, open_gates=True)
    a = model.collate([interleaved("red", "blue", "green")])
    b = model.collate([interleaved("red", "blue", "yellow")])
    third = int((a["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[2])
    with torch.no_grad():
        la, lb = model.logits(a), model.logits(b)
    assert torch.equal(la[0, :third], lb[0, :third])
    assert not torch.allclose(la[0, third:], lb[0, third:])


def test_frozen_parts_stay_bit_identical_after_training_steps(tokenizer_dir):
    model = tiny(tokenizer_dir).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = build_param_groups(model, 1e-2, {"vision_model": 0.0, "language_model": 0.0}, 0.1)
    optimizer = torch.optim.AdamW(groups)
    for seed in range(2):  # the first step moves only the gates (closed gates pass no gradient on)
        batch = model.collate(colour_samples(4, seed=seed))
        train_step(model, optimizer, [batch], grad_clip=1.0, device=torch.device("cpu"))
    for name, p in model.named_parameters():
        if name.startswith(("vision_model.", "language_model.")):
            assert not p.requires_grad and p.grad is None, name
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(k.startswith(("perceiver_resampler.", "gated_cross_attn_layers.")) for k in changed)
    assert "gated_cross_attn_layers.0.alpha_cross_attn" in changed
    assert any(k.startswith("perceiver_resampler.") for k in changed)


def _full_logits(model: Flamingo, prompt, extra: list[list[int]]) -> torch.Tensor:
    """Last-position logits of an uncached forward over prompt + generated tokens (B, V)."""
    ids = torch.cat([prompt.input_ids, torch.tensor(extra, dtype=torch.long)], dim=1)
    mask = torch.cat([prompt.attention_mask, torch.ones_like(torch.tensor(extra))], dim=1)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": prompt.pixel_values,
             "image_sample_index": prompt.image_sample_index}
    with torch.no_grad():
        return model.logits(batch)[:, -1]


def test_cached_decoding_equals_uncached(tokenizer_dir):
    model = tiny(tokenizer_dir, seed=3, open_gates=True, cross_attn_every=2)
    assert len(model.gated_cross_attn_layers) == 1  # 2 decoder layers, a block before layer 0
    samples = [interleaved("red", "blue", "green"), colour_samples(1, seed=4)[0],
               Sample("text", [], [Turn("user", "Which came first?")])]
    prompt = model.prompt_batch(samples)  # left padded; rows with 3, 1 and 0 images
    projections = []  # the gated block's key projection runs at prefill, never per step
    model.gated_cross_attn_layers[0].cross_attn.k_proj.register_forward_hook(lambda *_: projections.append(1))
    logits, state = model.prefill(prompt)
    assert len(projections) == 1 and set(state.images.visual_kv) == {0}
    torch.testing.assert_close(logits, _full_logits(model, prompt, [[]] * 3), rtol=1e-5, atol=1e-5)
    projections.clear()
    tokens: list[list[int]] = [[] for _ in samples]
    for step in range(4):
        # An <image> id generated mid-answer must not shift the media either.
        next_ids = torch.tensor([IMAGE_TOKEN_ID if step == 1 else 20 + step + r for r in range(3)])
        for r in range(3):
            tokens[r].append(int(next_ids[r]))
        logits, state = model.decode_step(next_ids, state)
        assert not projections
        expected = _full_logits_generated(model, prompt, tokens)
        projections.clear()
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # select keeps rows, of the images' keys and values too
    kept = state.select(torch.tensor([2, 0])).images
    assert kept.visual.shape[0] == 2 and kept.media_index.tolist() == [0, 3]
    k, v = state.images.visual_kv[0]
    assert torch.equal(kept.visual_kv[0][0], k[[2, 0]]) and torch.equal(kept.visual_kv[0][1], v[[2, 0]])


def _full_logits_generated(model: Flamingo, prompt, tokens: list[list[int]]) -> torch.Tensor:
    """As `_full_logits`, but generated `<image>` ids open no new image (they have no pixels):
    the uncached reference replaces them in the media count by their embedding alone."""
    ids = torch.cat([prompt.input_ids, torch.tensor(tokens, dtype=torch.long)], dim=1)
    mask = torch.cat([prompt.attention_mask, torch.ones(len(tokens), len(tokens[0]), dtype=torch.long)], 1)
    visual = model.row_visual_tokens(prompt.input_ids, prompt.pixel_values, prompt.image_sample_index)
    media = model.media(ids, visual)
    # The reference media: the prompt's count, carried over the generated positions.
    prompt_media = model.media(prompt.input_ids, visual)
    t0 = prompt.input_ids.shape[1]
    media.mask[..., t0:, :] = prompt_media.mask[..., -1:, :]
    media.has_media[:, t0:] = prompt_media.has_media[:, -1:]
    with torch.no_grad():
        embeds = model.language_model.embed(ids)
        logits, _ = model.language_model(
            inputs_embeds=embeds, attention_mask=mask,
            conditioning=Conditioning(before_layer=model.cross_attention(media)),
        )
    return logits[:, -1]


def _fast_path_steps(model: Flamingo, prompt, steps: int = 4) -> None:
    """The engine's runner decodes `steps` forced tokens (one an <image> id) for rows with
    3, 1 and 0 images: every step's logits within 1e-5 of an uncached full forward through
    the gated blocks as written, the same greedy token, and no block projects per step."""
    from visto.infer.runner import DecoderRunner

    runner = DecoderRunner.for_model(model)
    assert runner is not None
    logits, state = runner.prefill(prompt)
    calls = []  # the blocks' own query projections: they run at prefill, never per step
    hooks = [b.cross_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
             for b in model.gated_cross_attn_layers]
    tokens: list[list[int]] = [[] for _ in range(prompt.input_ids.shape[0])]
    for step in range(steps):
        next_ids = torch.tensor([IMAGE_TOKEN_ID if step == 1 else 20 + step + r for r in range(len(tokens))])
        for r, token in enumerate(next_ids.tolist()):
            tokens[r].append(token)
        calls.clear()
        logits, state = runner.decode_step(next_ids, state)
        # fused: no block module runs; as written: each block's query projection once
        assert len(calls) == (0 if model.step_weights() is not None else len(hooks))
        expected = _full_logits_generated(model, prompt, tokens)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("every, gate", [(1, "float"), (2, "vector")])
def test_fast_path_decoding_with_fused_gated_steps_equals_a_full_reforward(tokenizer_dir, every, gate):
    model = tiny(tokenizer_dir, seed=3, open_gates=True, cross_attn_every=every, gate=gate)
    if gate == "vector":  # a gate per channel, each folded into its own output column
        with torch.no_grad():
            for block in model.gated_cross_attn_layers:
                alpha = block.alpha_cross_attn  # (1, 1, C)
                alpha.copy_(torch.linspace(-1.0, 1.5, alpha.numel()).view_as(alpha))
    samples = [interleaved("red", "blue", "green"), colour_samples(1, seed=4)[0],
               Sample("text", [], [Turn("user", "Which came first?")])]
    prompt = model.prompt_batch(samples)
    _fast_path_steps(model, prompt)
    assert model.step_weights() is not None
    # The fused weights follow the parameters: gates changed in place are seen at the next prompt.
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:
            block.alpha_dense.mul_(-2.0)
            block.mlp.down_proj.weight.mul_(1.5)
    _fast_path_steps(model, prompt)


def test_blocks_that_cannot_be_fused_decode_as_written(tokenizer_dir):
    """A wrapped projection (as LoRA wraps one) is not a plain nn.Linear: no fused step; the
    blocks run as written, with the same numbers."""

    class Wrapped(torch.nn.Linear):
        pass

    model = tiny(tokenizer_dir, seed=4, open_gates=True)
    samples = [interleaved("red", "blue", "green"), colour_samples(1, seed=5)[0]]
    prompt = model.prompt_batch(samples)
    _fast_path_steps(model, prompt, steps=2)
    assert model.step_weights() is not None
    block = model.gated_cross_attn_layers[0]
    wrapped = Wrapped(block.mlp.up_proj.in_features, block.mlp.up_proj.out_features, bias=False)
    wrapped.load_state_dict(block.mlp.up_proj.state_dict())
    block.mlp.up_proj = wrapped
    _fast_path_steps(model, prompt, steps=2)
    assert model.step_weights() is None


def test_engine_generates_with_several_images_like_a_full_reforward(tokenizer_dir):
    from visto.infer.engine import Engine
    from visto.infer.sampling import SamplingParams

    model = tiny(tokenizer_dir, seed=5, open_gates=True)
    samples = [interleaved("red", "blue", "green"), colour_samples(1, seed=6)[0]]
    engine = Engine(model, model.processor.tokenizer)
    outs = engine.generate_batch(model.prompt_batch(samples), SamplingParams(max_new_tokens=4, temperature=0.0))
    for row, out in enumerate(outs):
        assert out.token_ids and out.prompt_tokens > 0
        single = model.prompt_batch([samples[row]])
        generated: list[int] = []
        for token in out.token_ids:
            assert int(_full_logits(model, single, [generated]).argmax()) == token
            generated.append(token)


def test_checkpoint_and_deepcopy_keep_the_gated_wiring(tokenizer_dir, tmp_path):
    model = tiny(tokenizer_dir, seed=7, open_gates=True)
    batch = model.collate([interleaved("red", "blue", "green")])
    with torch.no_grad():
        reference = model.logits(batch)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(loaded.logits(loaded.collate([interleaved("red", "blue", "green")])), reference)
        assert torch.equal(twin.logits(batch), reference)
        twin.gated_cross_attn_layers[0].alpha_dense.fill_(0.0)  # the copy runs its own blocks
        assert not torch.equal(twin.logits(batch), reference)
        assert torch.equal(model.logits(batch), reference)


def test_pretrained_tower_is_loaded_and_the_processor_is_checked(tokenizer_dir, tmp_path):
    from visto.data.processor import Processor
    from visto.data.tokenizer import Tokenizer
    from visto.models.clip import CLIPConfig

    clip = build_model("clip", CLIPConfig.preset("tiny"), seed=3)
    save_checkpoint(clip, tmp_path / "clip")
    model = tiny(tokenizer_dir, vision_init=str(tmp_path / "clip"))
    assert model.config.vision_init is None
    for k, v in clip.vision_model.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[k], v), k
    tokenizer = Tokenizer.load(tokenizer_dir / "tokenizer.json")
    with pytest.raises(UserError, match="one <image> marker"):
        model.processor = Processor(ProcessorConfig(image_size=32, image_tokens=4, vocab_size=400,
                                                    loc_bins=32), tokenizer)


@pytest.mark.parametrize("name", ["flamingo-synth"])
def test_shipped_recipe_trains_only_the_connectors(name, tokenizer_dir):
    recipe = load_recipe(name)
    assert recipe.model.family == "flamingo"
    model = tiny(tokenizer_dir)
    groups = build_param_groups(model, recipe.optim.lr, recipe.optim.module_lrs, 0.0)
    trained = {n.split(".")[0] for g in groups for n in g["names"]}
    assert trained == {"perceiver_resampler", "gated_cross_attn_layers"}


@pytest.mark.slow
def test_recipe_runs_through_visto_train_and_generates(tmp_path):
    """flamingo-synth on a tiny synthetic world through `visto train`, vision from a CLIP
    checkpoint; the frozen towers come out unchanged and the checkpoint drives the engine."""
    import json

    from visto.cli import main
    from visto.data.synth import WorldConfig, generate_world
    from visto.infer.engine import Engine
    from visto.infer.sampling import SamplingParams
    from visto.models.clip import CLIPConfig

    world = tmp_path / "world"
    generate_world(WorldConfig(n=24, size=48, seed=0), world)
    clip = build_model("clip", CLIPConfig.preset("tiny"), seed=0)
    save_checkpoint(clip, tmp_path / "clip")
    tiny_cfg = FlamingoConfig.preset("tiny")
    args = [
        "train", "--recipe", "flamingo-synth", "--out", str(tmp_path / "run"), "--no-progress",
        "--set", "batch_size=4", "--set", "max_steps=4", "--set", "eval_batches=1",
        "--set", "num_threads=1", "--set", f"data.source={world}",
        "--set", f"model.config.vision_init={tmp_path / 'clip'}",
        "--set", f"model.config.tokenizer_corpus={world}",
        "--set", "model.config.resampler=" + json.dumps({"num_latents": 4, "depth": 1, "heads": 2}),
        "--set", "model.config.decoder=" + json.dumps({**tiny_cfg.decoder.__dict__, "vocab_size": 1024}),
        "--set", "model.config.processor=" + json.dumps(
            {"image_size": 32, "image_tokens": 1, "image_delimiters": False, "vocab_size": 1024}
        ),
    ]
    assert main(args) == 0
    model = load(tmp_path / "run" / "checkpoint")
    assert isinstance(model, Flamingo)
    for k, v in clip.vision_model.state_dict().items():  # frozen: still CLIP's tower
        assert torch.equal(model.vision_model.state_dict()[k], v), k
    assert any(float(b.alpha_cross_attn.detach().abs().max()) > 0 for b in model.gated_cross_attn_layers)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "train" for r in rows)
    from visto.data.formats import read_samples

    samples = list(itertools.islice(read_samples(world, "synth", split="val", tasks=["vqa"]), 2))
    outs = Engine(model, model.processor.tokenizer).generate_batch(
        model.prompt_batch(samples), SamplingParams(max_new_tokens=3, temperature=0.0)
    )
    assert len(outs) == 2 and all(o.token_ids for o in outs)
