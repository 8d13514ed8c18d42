"""LLaVA: splice, label mask, frozen stages, training through the loop, engine, pretrained parts."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from visto.checkpoint import load, save_checkpoint
from visto.connectors.projector import ProjectorConfig
from visto.data.processor import IGNORE_INDEX, Processor
from visto.data.sample import Sample, Turn
from visto.data.special_tokens import IMAGE_TOKEN_ID
from visto.data.tokenizer import train_tokenizer
from visto.errors import UserError
from visto.models.llava import PARAM_GROUPS, Llava, LlavaConfig
from visto.pretrained import build_model
from visto.train.loop import train, train_step
from visto.train.optim import build_param_groups
from visto.train.recipe import load_recipe, recipe_from_dict

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


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


def conversation() -> Sample:
    """Two images, three user turns (one without an image), a system turn, three answers."""
    return Sample(
        "conv",
        [square("red"), square("blue")],
        [
            Turn("system", "Answer briefly."),
            Turn("user", "<image>\nWhat colour is the square?"),
            Turn("assistant", "red"),
            Turn("user", "And this one? <image>"),
            Turn("assistant", "blue"),
            Turn("user", "Which came first?"),
            Turn("assistant", "the red square"),
        ],
    )


TEXTS = [
    "What colour is the square?", "And this one?", "Which came first?", "the red square",
    "Answer briefly.", *COLOURS,
] * 3


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return path


def tiny(tokenizer_dir, seed: int = 0, **overrides) -> Llava:
    config = LlavaConfig.preset("tiny", tokenizer_dir=str(tokenizer_dir), **overrides)
    return build_model("llava", config, seed=seed)


def test_registry_names_and_groups(tokenizer_dir):
    model = tiny(tokenizer_dir)
    assert isinstance(model, Llava) and model.family == "llava"
    prefixes = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert prefixes == set(PARAM_GROUPS.values())
    assert model.processor.tokenizer.image_id == IMAGE_TOKEN_ID
    assert model.config.image_tokens == 16


def test_splice_puts_visual_tokens_at_image_positions(tokenizer_dir):
    model = tiny(tokenizer_dir).eval()
    batch = model.collate([conversation(), colour_samples(1, seed=1)[0]])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum() == 3 * 16
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["image_sample_index"])
        features = model.image_features(batch["pixel_values"])  # (3, 16, C)
        plain = model.language_model.embed(batch["input_ids"])
    is_image = batch["input_ids"] == IMAGE_TOKEN_ID
    torch.testing.assert_close(embeds[0][is_image[0]], features[:2].reshape(32, -1))  # in order
    torch.testing.assert_close(embeds[1][is_image[1]], features[2])
    torch.testing.assert_close(embeds[~is_image], plain[~is_image])


def test_count_mismatch_fails_with_a_clear_message(tokenizer_dir):
    model = tiny(tokenizer_dir)
    batch = model.collate(colour_samples(2, seed=0))
    with pytest.raises(AssertionError, match="<image> ids but 1 images"):
        model.embed_inputs(batch["input_ids"], batch["pixel_values"][:1])
    with pytest.raises(AssertionError, match="per row"):
        model.embed_inputs(batch["input_ids"], batch["pixel_values"], torch.tensor([0, 0]))
    with pytest.raises(UserError, match="image_tokens is 16 but each image gives 4"):
        tiny(tokenizer_dir, projector=ProjectorConfig(kind="pixel_shuffle"))


def test_label_mask_reaches_the_loss(tokenizer_dir):
    """Across a multi-turn, two-image conversation, exactly the answers (and their <|end|>)
    are predicted in the loss: the loss has gradient on those logits and no others, padding
    ids do not matter, and an answer token does."""
    model = tiny(tokenizer_dir).eval()
    samples = [conversation(), colour_samples(1, seed=2)[0]]
    batch = model.collate(samples)
    labels = batch["labels"]
    tok = model.processor.tokenizer
    answers = tok.decode(labels[0][labels[0] != IGNORE_INDEX].tolist())
    assert answers == "red<|end|>blue<|end|>the red square<|end|>"

    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["logits"] = output

    # The decoder's last hidden states (B, T, C): the LM head runs on the scored rows only.
    handle = model.language_model.model.norm.register_forward_hook(keep)
    loss = model(batch)["loss"]
    loss.backward()
    handle.remove()
    grad = captured["logits"].grad.abs().sum(dim=-1)  # (B, T)
    predicts_answer = torch.zeros_like(labels, dtype=torch.bool)
    predicts_answer[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert bool((grad[predicts_answer] > 0).all())
    assert bool((grad[~predicts_answer] == 0).all())

    with torch.no_grad():
        base = model(batch)["loss"]
        padded = dict(batch)
        pad = batch["attention_mask"] == 0
        assert pad.any()  # the short sample is padded
        padded["input_ids"] = batch["input_ids"].masked_fill(pad, 42)
        assert torch.equal(model(padded)["loss"], base)
        changed = dict(batch)
        ids, new_labels = batch["input_ids"].clone(), labels.clone()
        t = int(predicts_answer[0].nonzero()[0]) + 1  # the first answer token
        ids[0, t] = new_labels[0, t] = tok.encode("green")[0]
        changed["input_ids"], changed["labels"] = ids, new_labels
        assert not torch.allclose(model(changed)["loss"], base)


def test_frozen_modules_get_no_gradient_and_stay_identical(tokenizer_dir):
    model = tiny(tokenizer_dir).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = build_param_groups(model, 1e-2, {"vision_tower": 0.0, "language_model": 0.0}, 0.1)
    optimizer = torch.optim.AdamW(groups)
    batch = model.collate(colour_samples(4, seed=0))
    train_step(model, optimizer, [batch], grad_clip=1.0, device=torch.device("cpu"))
    for name, p in model.named_parameters():
        if name.startswith(("vision_tower.", "language_model.")):
            assert not p.requires_grad and p.grad is None, name
            assert p not in optimizer.state
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("multi_modal_projector.") for k in changed)


@pytest.mark.slow
def test_tiny_llava_trains_through_the_loop_and_generates(tokenizer_dir, tmp_path):
    recipe = recipe_from_dict({
        "model": {"family": "llava", "config": {
            "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 4,
                       "mlp_hidden": 64},
            "vision_feature_layer": -1,
            "decoder": {"vocab_size": 400, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                        "num_kv_heads": 2, "intermediate_size": 128},
            "processor": {"image_size": 32, "image_tokens": 16, "image_delimiters": False,
                          "vocab_size": 400, "loc_bins": 32},
            "tokenizer_dir": str(tokenizer_dir),
        }},
        "optim": {"lr": 3e-3},
        "batch_size": 8, "max_steps": 30, "log_every": 5, "eval_every": None,
        "eval_batches": 1, "num_threads": 2, "seed": 0,
    })
    data = {"train": colour_samples(64, seed=0), "val": colour_samples(8, seed=1)}
    result = train(recipe, tmp_path / "run", source=lambda role: data[role], show_progress=False)
    rows = [r for r in _rows(tmp_path / "run") if r["split"] == "train"]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], [r["loss"] for r in rows]
    assert "token_acc" in result.val_metrics

    # The checkpoint opens with its processor and gives the same logits.
    model = load(tmp_path / "run" / "checkpoint")
    batch = model.collate(data["val"][:4])
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["loss"], result.model.eval()(batch)["loss"])

    # The engine drives it like a plain decoder: greedy tokens equal a full re-forward's argmax.
    from visto.infer.engine import Engine
    from visto.infer.sampling import SamplingParams

    engine = Engine(model, model.processor.tokenizer)
    prompts = model.prompt_batch(data["val"][:3])
    outs = engine.generate_batch(prompts, SamplingParams(max_new_tokens=3, temperature=0.0))
    for row, out in enumerate(outs):
        single = model.prompt_batch([data["val"][row]])
        ids = single.input_ids
        for token in out.token_ids:
            with torch.no_grad():
                embeds = model.embed_inputs(ids, single.pixel_values)
                logits, _ = model.language_model(inputs_embeds=embeds)
            assert int(logits[0, -1].argmax()) == token
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)


def _rows(run):
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretrained_parts_are_loaded_then_forgotten(tokenizer_dir, tmp_path):
    from visto.models.clip import CLIPConfig

    clip = build_model("clip", CLIPConfig.preset("tiny"), seed=3)
    save_checkpoint(clip, tmp_path / "clip")
    donor = tiny(tokenizer_dir, seed=4)
    donor.language_model.save_pretrained(tmp_path / "lm")
    model = tiny(tokenizer_dir, vision_init=str(tmp_path / "clip"), language_init=str(tmp_path / "lm"))
    assert model.config.vision_init is None and model.config.language_init is None
    for k, v in clip.vision_model.state_dict().items():
        assert torch.equal(model.vision_tower.state_dict()[k], v), k
    for k, v in donor.language_model.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[k], v), k
    save_checkpoint(model, tmp_path / "llava")
    (tmp_path / "clip" / "model.safetensors").unlink()  # the saved LLaVA no longer needs it
    assert isinstance(load(tmp_path / "llava"), Llava)


def test_tokenizer_from_corpus_and_missing_tokenizer(tmp_path):
    from visto.data.formats import write_samples

    write_samples(colour_samples(20, seed=0), tmp_path / "data", "llava")
    model = build_model("llava", LlavaConfig.preset("tiny", tokenizer_corpus=str(tmp_path / "data")))
    assert isinstance(model.processor, Processor)
    assert model.processor.tokenizer.encode("red") != []
    with pytest.raises(UserError, match="no tokenizer"):
        _ = build_model("llava", LlavaConfig.preset("tiny")).processor


@pytest.mark.parametrize("name", ["llava-stage1", "llava-stage2"])
def test_shipped_recipes_resolve(name, tokenizer_dir):
    recipe = load_recipe(name)
    assert recipe.model.family == "llava" or recipe.model.init_from
    model = tiny(tokenizer_dir)
    groups = build_param_groups(model, recipe.optim.lr, recipe.optim.module_lrs, 0.0)
    trained = {n.split(".")[0] for g in groups for n in g["names"]}
    assert "multi_modal_projector" in trained
    if name == "llava-stage1":
        assert trained == {"multi_modal_projector"}
    else:
        assert "language_model" in trained


@pytest.mark.slow
def test_two_stage_recipes_run_through_visto_train(tmp_path):
    """Stage 1 (projector only, vision from a CLIP checkpoint) then stage 2 from stage 1's
    checkpoint, on a tiny synthetic world, through the `visto train` command."""
    import json

    from visto.cli import main
    from visto.data.synth import WorldConfig, generate_world
    from visto.models.clip import CLIPConfig

    world = tmp_path / "world"
    generate_world(WorldConfig(n=24, size=48, seed=0), world)
    clip = build_model("clip", CLIPConfig.preset("tiny"), seed=0)
    save_checkpoint(clip, tmp_path / "clip")
    tiny_cfg = LlavaConfig.preset("tiny")
    common = ["--no-progress", "--set", "batch_size=4", "--set", "max_steps=3",
              "--set", "eval_batches=1", "--set", "num_threads=1", "--set", f"data.source={world}"]
    stage1 = [
        "train", "--recipe", "llava-stage1", "--out", str(tmp_path / "s1"), *common,
        "--set", f"model.config.vision_init={tmp_path / 'clip'}",
        "--set", f"model.config.tokenizer_corpus={world}",
        "--set", "model.config.vision_feature_layer=-1",
        "--set", "model.config.decoder=" + json.dumps({**tiny_cfg.decoder.__dict__, "vocab_size": 1024}),
        "--set", "model.config.processor=" + json.dumps(
            {"image_size": 32, "image_tokens": 16, "image_delimiters": False, "vocab_size": 1024}
        ),
    ]
    assert main(stage1) == 0
    first = load(tmp_path / "s1" / "checkpoint")
    for k, v in clip.vision_model.state_dict().items():  # frozen: still CLIP's tower
        assert torch.equal(first.vision_tower.state_dict()[k], v), k
    stage2 = ["train", "--recipe", "llava-stage2", "--out", str(tmp_path / "s2"), *common,
              "--set", f"model.init_from={tmp_path / 's1' / 'checkpoint'}"]
    assert main(stage2) == 0
    second = load(tmp_path / "s2" / "checkpoint")
    assert torch.equal(second.vision_tower.embeddings.patch_embedding.weight,
                       first.vision_tower.embeddings.patch_embedding.weight)
    assert not torch.equal(second.language_model.model.embed_tokens.weight,
                           first.language_model.model.embed_tokens.weight)
    rows = _rows(tmp_path / "s2")
    assert any(r["split"] == "val" and "token_acc" in r for r in rows)
