"""BLIP-2: stage-1 losses and mining, frozen towers, stage 2 through the engine, transformers parity."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from visto.checkpoint import load, save_checkpoint
from visto.data.sample import Sample, Turn
from visto.data.tokenizer import train_tokenizer
from visto.errors import UserError
from visto.models.blip2 import (
    PARAM_GROUPS,
    Blip2,
    Blip2Config,
    contrastive_ce,
    itc_similarity,
    load_hf,
    mine_hard_negatives,
)
from visto.pretrained import build_model
from visto.train.loop import train_step
from visto.train.optim import build_param_groups
from visto.train.recipe import load_recipe

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "bar")


def picture(colour: str, shape: str, size: int = 40) -> Image.Image:
    image = Image.new("RGB", (size, size), (250, 250, 250))
    w, h = (size // 2, size // 2) if shape == "square" else (size - 8, size // 5)
    image.paste(Image.new("RGB", (w, h), COLOURS[colour]), ((size - w) // 2, (size - h) // 2))
    return image


def samples(n: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        turns = [Turn("user", "<image>\nWhat is this?"), Turn("assistant", f"a {c} {s}")]
        out.append(Sample(f"{seed}-{i}", [picture(c, s)], turns))
    return out


TEXTS = ["What is this?", *(f"a {c} {s}" for c in COLOURS for s in SHAPES)] * 3


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return path


def tiny(tokenizer_dir, seed: int = 0, **overrides) -> Blip2:
    config = Blip2Config.preset("tiny", tokenizer_dir=str(tokenizer_dir), **overrides)
    return build_model("blip2", config, seed=seed)


STAGE1_FROZEN = {"vision_model": 0.0, "language_model": 0.0, "language_projection": 0.0}
STAGE2_FROZEN = {"vision_model": 0.0, "language_model": 0.0, "vision_projection": 0.0,
                 "text_projection": 0.0, "itm_head": 0.0, "temp": 0.0}  # fmt: skip


def test_registry_names_groups_and_sizes(tokenizer_dir):
    model = tiny(tokenizer_dir)
    assert isinstance(model, Blip2) and model.family == "blip2"
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == set(PARAM_GROUPS.values())
    assert model.processor.config.image_tokens == model.config.qformer.num_queries == 8
    with pytest.raises(UserError, match="image_tokens 16 but the Q-Former makes 8"):
        tiny(tokenizer_dir, processor=replace(Blip2Config.preset("tiny").processor, image_tokens=16))
    with pytest.raises(UserError, match="not a mix"):
        Blip2Config.preset("tiny", losses=["itc", "lm"])


def test_stage1_batch_and_losses(tokenizer_dir):
    model = tiny(tokenizer_dir).train()
    batch = model.collate(samples(6, seed=0))
    tok = model.processor.tokenizer
    assert batch["pixel_values"].shape == (6, 3, 32, 32)
    assert (batch["text_ids"][:, 0] == tok.bos_id).all()
    out = model(batch)
    assert {"itc", "itm", "itg", "itc_acc", "itm_acc", "loss"} <= set(out)
    torch.testing.assert_close(out["loss"].detach(), out["itc"] + out["itm"] + out["itg"])
    out["loss"].backward()
    grads = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # The decoder is not part of stage 1; everything else learns from one of the three losses.
    assert grads == {"vision_model", "qformer", "vision_projection", "text_projection", "temp", "itm_head"}
    for loss in ("itc", "itm", "itg"):  # each alone
        alone = tiny(tokenizer_dir, losses=[loss])(batch)
        assert set(alone) >= {loss, "loss"} and torch.isfinite(alone["loss"])


def test_itc_similarity_is_the_best_query():
    q = F.normalize(torch.randn(3, 5, 8), dim=-1)
    t = F.normalize(torch.randn(4, 8), dim=-1)
    sim = itc_similarity(q, t)
    assert sim.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert torch.isclose(sim[i, j], max(q[i, k] @ t[j] for k in range(5)))


def test_contrastive_ce_matches_cross_entropy_and_drops_duplicates():
    logits = torch.randn(5, 5)
    eye = torch.eye(5, dtype=torch.bool)
    torch.testing.assert_close(contrastive_ce(logits, eye), F.cross_entropy(logits, torch.arange(5)))
    torch.testing.assert_close(
        contrastive_ce(logits, eye, 0.1), F.cross_entropy(logits, torch.arange(5), label_smoothing=0.1)
    )
    duplicates = eye.clone()
    duplicates[0, 1] = duplicates[1, 0] = True  # texts 0 and 1 are the same caption
    moved = logits.clone()
    moved[0, 1] = moved[1, 0] = 50.0  # a duplicate's score does not count against the row
    assert torch.isfinite(contrastive_ce(moved, duplicates, 0.1))
    torch.testing.assert_close(contrastive_ce(moved, duplicates), contrastive_ce(logits, duplicates))


def test_hard_negative_mining_picks_the_most_similar_non_matching_pair():
    logits = torch.tensor([
        [9.0, 5.0, 1.0, 2.0],
        [4.0, 8.0, 7.0, 0.0],
        [3.0, 6.0, 9.0, 2.5],
        [0.0, 1.0, 2.0, 3.0],
    ])  # image i (rows) x text j (columns), matches on the diagonal
    eye = torch.eye(4, dtype=torch.bool)
    image_for_text, text_ok, text_for_image, image_ok = mine_hard_negatives(logits, eye, sample=False)
    assert text_for_image.tolist() == [1, 2, 1, 2]  # per row, the best off-diagonal column
    assert image_for_text.tolist() == [1, 2, 1, 2]  # per column, the best off-diagonal row
    assert text_ok.all() and image_ok.all()

    # Another positive (a duplicate caption) is never a negative; a row with only positives has none.
    positives = eye.clone()
    positives[1, 2] = positives[2, 1] = True
    positives[3, :] = True
    positives[:, 3] = True
    image_for_text, text_ok, text_for_image, image_ok = mine_hard_negatives(logits, positives, sample=False)
    assert text_for_image[:3].tolist() == [1, 0, 0] and not image_ok[3]
    assert image_for_text[:3].tolist() == [1, 0, 0] and not text_ok[3]

    # Sampling draws non-matching pairs only, the most similar most often.
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([mine_hard_negatives(logits, eye, sample=True, generator=g)[2] for _ in range(400)])
    assert not (draws == torch.arange(4)).any()
    assert draws[:, 1].mode().values.item() == 2  # row 1: 7.0 beats 4.0 and 0.0


def test_itm_gets_positives_then_mined_negatives(tokenizer_dir):
    model = tiny(tokenizer_dir, itm_negatives="hardest").eval()
    batch = model.collate(samples(5, seed=3))
    seen = {}
    original = model.itm_logits

    def spy(image, ids, mask):
        seen["ids"], seen["image"] = ids, image
        return original(image, ids, mask)

    model.itm_logits = spy
    with torch.no_grad():
        model(batch)
    B = batch["text_ids"].shape[0]
    n = seen["ids"].shape[0]
    assert B < n <= 3 * B
    torch.testing.assert_close(seen["ids"][:B], batch["text_ids"])


def test_frozen_towers_stay_bit_identical_through_a_step(tokenizer_dir):
    for losses, frozen, trained in (
        (["itc", "itm", "itg"], STAGE1_FROZEN, "qformer."),
        (["lm"], STAGE2_FROZEN, "language_projection."),
    ):
        model = tiny(tokenizer_dir, losses=losses).train()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.AdamW(build_param_groups(model, 1e-2, frozen, 0.1))
        train_step(model, optimizer, [model.collate(samples(4, seed=1))], 1.0, torch.device("cpu"))
        after = model.state_dict()
        for key in before:
            if key.startswith(tuple(frozen)):
                assert torch.equal(before[key], after[key]), key
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(trained))
        for name, p in model.named_parameters():
            if name.startswith(("vision_model.", "language_model.")):
                assert p.grad is None and not p.requires_grad, name


@torch.no_grad()
def test_engine_generation_equals_full_reforward_argmax(tokenizer_dir):
    from visto.infer.engine import Engine
    from visto.infer.sampling import SamplingParams

    model = tiny(tokenizer_dir, seed=5, losses=["lm"]).eval()
    data = samples(3, seed=4)
    engine = Engine(model, model.processor.tokenizer)
    outs = engine.generate_batch(model.prompt_batch(data), SamplingParams(max_new_tokens=4))
    for row, out in enumerate(outs):
        single = model.prompt_batch([data[row]])
        ids = single.input_ids
        assert (ids == 3).sum() == model.config.qformer.num_queries
        for token in out.token_ids:
            logits, _ = model.language_model(inputs_embeds=model.embed_inputs(ids, single.pixel_values))
            assert int(logits[0, -1].argmax()) == token
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)


def test_stage2_from_stage1_checkpoint(tokenizer_dir, tmp_path):
    stage1 = tiny(tokenizer_dir, seed=1)
    save_checkpoint(stage1, tmp_path / "s1")
    donor = tiny(tokenizer_dir, seed=2)
    donor.language_model.save_pretrained(tmp_path / "lm")
    config = Blip2Config(stage1_checkpoint=str(tmp_path / "s1"), losses=["lm"],
                         language_init=str(tmp_path / "lm"))  # fmt: skip
    model = build_model("blip2", config)
    assert model.config.stage == 2 and model.config.stage1_checkpoint is None
    assert model.config.qformer == stage1.config.qformer
    for k, v in stage1.state_dict().items():
        if k.startswith(("vision_model.", "qformer.", "itm_head.")):
            assert torch.equal(model.state_dict()[k], v), k
    for k, v in donor.language_model.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[k], v), k
    assert model.processor.tokenizer.encode("a red bar") == stage1.processor.tokenizer.encode("a red bar")
    # The saved stage-2 model needs neither source any more and gives the same loss.
    save_checkpoint(model, tmp_path / "s2")
    (tmp_path / "s1" / "model.safetensors").unlink()
    reloaded = load(tmp_path / "s2")
    batch = model.collate(samples(3, seed=9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch)["loss"], model.eval()(batch)["loss"])
    with pytest.raises(UserError, match="blip2 one"):
        from visto.models.clip import CLIPConfig

        save_checkpoint(build_model("clip", CLIPConfig.preset("tiny")), tmp_path / "clip")
        build_model("blip2", Blip2Config(stage1_checkpoint=str(tmp_path / "clip"), losses=["lm"]))


def test_each_stage_is_a_named_objective_and_forward_is_the_configs(tokenizer_dir):
    data = samples(4, seed=2)
    for losses, objective in ((["itc", "itm", "itg"], "representation"), (["lm"], "generative")):
        model = tiny(tokenizer_dir, losses=losses).eval()
        assert model.default_objective == objective
        loss_name, batches_name = Blip2.OBJECTIVES[objective]
        batch = getattr(model, batches_name)(data)
        assert set(batch) == set(model.collate(data))
        with torch.no_grad():
            torch.manual_seed(0)  # ITM draws its negatives
            named = getattr(model, loss_name)(batch)
            torch.manual_seed(0)
            default = model(batch)
        assert set(named) == set(default)
        torch.testing.assert_close(named["loss"], default["loss"])
    assert "text_ids" in tiny(tokenizer_dir).pair_batch(data)
    assert "labels" in tiny(tokenizer_dir).conversation_batch(data)


def test_the_recipe_selects_the_objective(tokenizer_dir):
    from visto.train.objective import ObjectiveLoss, loss_module, select_objective

    stage1, stage2 = tiny(tokenizer_dir), tiny(tokenizer_dir, losses=["lm"])
    assert select_objective(stage1, None) == select_objective(stage1, "representation")
    assert select_objective(stage2, "generative").loss == "generative_loss"
    with pytest.raises(UserError, match="model.config.losses .* train 'representation'"):
        select_objective(stage1, "generative")
    with pytest.raises(UserError, match="choose one of representation, generative"):
        select_objective(stage1, "stage1")
    wrapped = loss_module(stage2, select_objective(stage2, None), sharded=False)
    assert isinstance(wrapped, ObjectiveLoss) and wrapped.model is stage2
    assert set(wrapped.state_dict()) == {f"model.{k}" for k in stage2.state_dict()}


@pytest.mark.parametrize(("losses", "objective", "logged"), [
    (["itc", "itm", "itg"], "representation", {"itc", "itm", "itg", "itc_acc", "temperature"}),
    (["lm"], "generative", {"lm"}),
])  # fmt: skip
def test_visto_train_calls_the_recipes_objective(tokenizer_dir, tmp_path, monkeypatch, losses, objective, logged):
    from visto.config import to_dict
    from visto.train.loop import train
    from visto.train.recipe import recipe_from_dict

    config = to_dict(Blip2Config.preset("tiny", tokenizer_dir=str(tokenizer_dir), losses=losses))
    recipe = recipe_from_dict({
        "model": {"family": "blip2", "objective": objective, "config": config},
        "batch_size": 4, "max_steps": 2, "log_every": 1, "eval_every": 2, "eval_batches": 1,
        "num_threads": 1, "data": {"prefetch": 0},
    })  # fmt: skip

    def forward(self, batch):
        raise AssertionError("the loop calls the recipe's objective, not forward")

    monkeypatch.setattr(Blip2, "forward", forward)
    monkeypatch.setattr(Blip2, "collate", forward)
    data = {"train": samples(8, seed=1), "val": samples(4, seed=2)}
    result = train(recipe, tmp_path / "run", source=lambda split: iter(data[split]), show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {row["split"] for row in rows} == {"train", "val"}
    assert all(logged <= set(row) for row in rows)
    assert result.model.config.losses == losses


@pytest.mark.parametrize("name", ["blip2-stage1", "blip2-stage2"])
def test_shipped_recipes_train_the_right_modules(name, tokenizer_dir):
    recipe = load_recipe(name)
    assert recipe.model.family == "blip2"
    model = tiny(tokenizer_dir)
    groups = build_param_groups(model, recipe.optim.lr, recipe.optim.module_lrs, 0.0)
    trained = {n.split(".")[0] for g in groups for n in g["names"]}
    if name == "blip2-stage1":
        assert recipe.model.config["losses"] == ["itc", "itm", "itg"]
        assert recipe.model.objective == "representation"
        assert trained == {"qformer", "vision_projection", "text_projection", "temp", "itm_head"}
    else:
        assert recipe.model.config["losses"] == ["lm"]
        assert recipe.model.objective == "generative"
        assert trained == {"qformer", "language_projection"}


def test_transformers_blip2_loads_with_equal_logits(tmp_path):
    """A tiny random `Blip2ForConditionalGeneration` with a Llama text model, saved by
    transformers, gives the same logits in visto (BLIP's ViT: no pre-norm, patch bias, fused qkv)."""
    import transformers
    cfg = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, vocab_size=100, max_position_embeddings=64),
        text_config=dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True),
        num_query_tokens=8, image_token_index=3,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers' init is near zero in places: randomize everything
        for name, p in hf.named_parameters():
            is_gain = "norm" in name.lower() and name.endswith("weight")
            p.copy_(torch.randn_like(p) * (0.1 if p.ndim > 1 else 0.5) + (1.0 if is_gain else 0.0))
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    assert ours.config.qformer.num_queries == 8 and not ours.config.vision_pre_norm
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(20, 100, (2, 14))
    ids[:, :8] = 3  # the processor's 8 <image> ids, then text
    with torch.no_grad():
        expected = hf(pixel_values=pixels, input_ids=ids).logits
        got, _ = ours.language_model(inputs_embeds=ours.embed_inputs(ids, pixels))
    assert expected.abs().max() > 1
    assert (expected - got).abs().max() < 1e-4


def test_load_hf_refuses_what_it_cannot_read(tmp_path):
    import json

    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2", "image_token_index": 50000,
        "vision_config": {}, "qformer_config": {}, "text_config": {}}))  # fmt: skip
    with pytest.raises(UserError, match="image_token_index"):
        load_hf(tmp_path)
    with pytest.raises(UserError, match="config.json missing"):
        load_hf(tmp_path / "nowhere")


@pytest.mark.slow
def test_two_stage_recipes_run_through_visto_train(tmp_path):
    """Stage 1 (ITC+ITM+ITG, vision from a CLIP checkpoint) then stage 2 from its checkpoint,
    on a tiny synthetic world, through `visto train`; frozen parts unchanged; the engine runs."""
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
    tiny_cfg = Blip2Config.preset("tiny")
    common = ["--no-progress", "--set", "batch_size=4", "--set", "max_steps=3",
              "--set", "eval_batches=1", "--set", "num_threads=1", "--set", f"data.source={world}"]
    stage1 = [
        "train", "--recipe", "blip2-stage1", "--out", str(tmp_path / "s1"), *common,
        "--set", f"model.config.vision_init={tmp_path / 'clip'}",
        "--set", f"model.config.tokenizer_corpus={world}",
        "--set", "model.config.qformer=" + json.dumps({**tiny_cfg.qformer.__dict__, "vocab_size": 1024}),
        "--set", "model.config.decoder=" + json.dumps({**tiny_cfg.decoder.__dict__, "vocab_size": 1024}),
        "--set", "model.config.processor=" + json.dumps(
            {"image_size": 32, "image_tokens": 8, "image_delimiters": False, "resize_mode": "resize",
             "vocab_size": 1024}
        ),
        "--set", "model.config.embed_dim=16",
    ]
    assert main(stage1) == 0
    first = load(tmp_path / "s1" / "checkpoint")
    for k, v in clip.vision_model.state_dict().items():
        assert torch.equal(first.vision_model.state_dict()[k], v), k
    rows = [json.loads(x) for x in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert all(k in rows[0] for k in ("itc", "itm", "itg"))
    stage2 = ["train", "--recipe", "blip2-stage2", "--out", str(tmp_path / "s2"), *common,
              "--set", f"model.config.stage1_checkpoint={tmp_path / 's1' / 'checkpoint'}"]
    assert main(stage2) == 0
    second = load(tmp_path / "s2" / "checkpoint")
    assert second.config.stage == 2
    for k, v in first.language_model.state_dict().items():
        assert torch.equal(second.language_model.state_dict()[k], v), k
    assert not torch.equal(second.language_projection.weight, first.language_projection.weight)
    engine = Engine(second, second.processor.tokenizer)
    from visto.data.formats import read_samples

    prompts = list(read_samples(world, "synth", split="val", tasks=["vqa"]))[:2]
    outs = engine.generate_batch(second.prompt_batch(prompts), SamplingParams(max_new_tokens=3))
    assert all(len(o.token_ids) >= 1 for o in outs)
