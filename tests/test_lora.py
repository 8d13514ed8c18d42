"""LoRA on any family: merged = unmerged, only adapters (and named prefixes) get gradients,
checkpoint round trip, training through the loop, export of the merged model to transformers."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from visto.checkpoint import load, save_checkpoint
from visto.data.sample import Sample, Turn
from visto.data.tokenizer import train_tokenizer
from visto.errors import UserError
from visto.infer.engine import Engine
from visto.infer.sampling import SamplingParams
from visto.models import build_model
from visto.models.cogvlm import CogVLMConfig
from visto.models.fuyu import FuyuConfig
from visto.models.llava import LlavaConfig
from visto.nn.lora import LoraConfig, adapter_parameters, apply_lora, has_lora, merge_lora
from visto.train.loop import train, train_step
from visto.train.optim import build_param_groups
from visto.train.recipe import recipe_from_dict

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
TEXTS = ["What colour is the square?", *COLOURS] * 3


def colour_samples(n: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c = rng.choice(list(COLOURS))
        image = Image.new("RGB", (40, 32), (250, 250, 250))
        image.paste(Image.new("RGB", (20, 16), COLOURS[c]), (10, 8))
        turns = [Turn("user", "<image>\nWhat colour is the square?"), Turn("assistant", c)]
        out.append(Sample(f"{seed}-{i}", [image], turns))
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=400, loc_bins=32, min_frequency=1).save(path / "tokenizer.json")
    return path


# family -> (config, LoRA layers to adapt): every family's decoder, and the vision tower
# (LLaVA) or the visual expert (CogVLM) beside it.
CASES = {
    "llava": (LlavaConfig, ["language_model", "vision_tower"]),
    "fuyu": (FuyuConfig, ["language_model"]),
    "cogvlm": (CogVLMConfig, ["visual_expert"]),
    # The language weights compute the text positions only (the experts are an argument of
    # the decoder, not a routing layer in its place), so their adapters merge exactly too.
    "cogvlm+language": (CogVLMConfig, ["language_model", "visual_expert"]),
}


def tiny(family: str, tokenizer_dir, seed: int = 0):
    config_cls, _ = CASES[family]
    name = family.split("+")[0]
    return build_model(name, config_cls.preset("tiny", tokenizer_dir=str(tokenizer_dir)), seed=seed)


def lora_for(family: str, **overrides) -> LoraConfig:
    targets = ["q_proj", "v_proj", "o_proj", "out_proj", "down_proj", "fc1"]
    if family.startswith("cogvlm"):
        targets = ["q_proj", "v_proj", "down_proj"]
    return LoraConfig(rank=4, alpha=8, targets=targets, modules=CASES[family][1], **overrides)


def randomize_adapters(model, seed: int = 0) -> None:
    """B starts at zero (a fresh adapter is a no-op); give it values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


def losses_and_logits(model, batch):
    with torch.no_grad():
        return model(batch)["loss"], model.prefill(model.prompt_batch(PROMPTS))[0]


PROMPTS = colour_samples(2, seed=9)


@pytest.mark.parametrize("family", list(CASES))
def test_merged_equals_unmerged(family, tokenizer_dir):
    model = tiny(family, tokenizer_dir).eval()
    plain_keys = set(model.state_dict())
    batch = model.collate(colour_samples(3, seed=1))
    base_loss, base_logits = losses_and_logits(model, batch)
    apply_lora(model, lora_for(family))
    # A fresh adapter (B = 0) changes nothing, to fp32 rounding: an adapted vision tower runs
    # its modules, where the plain one runs the fused inference blocks (FusedEncoderBlock),
    # which sum in another order (logits 3e-7 apart; an adapted decoder alone: bit-equal).
    fresh_loss, fresh_logits = losses_and_logits(model, batch)
    torch.testing.assert_close(fresh_loss, base_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(fresh_logits, base_logits, atol=1e-6, rtol=0)
    randomize_adapters(model)
    loss, logits = losses_and_logits(model, batch)
    assert (logits - base_logits).abs().max() > 1e-3  # the adapters do act
    merge_lora(model)
    assert not has_lora(model) and set(model.state_dict()) == plain_keys
    merged_loss, merged_logits = losses_and_logits(model, batch)
    torch.testing.assert_close(merged_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_loss, loss, atol=1e-5, rtol=1e-5)


def test_only_adapters_and_named_prefixes_get_gradients(tokenizer_dir):
    model = tiny("llava", tokenizer_dir).train()
    apply_lora(model, lora_for("llava", trainable=["multi_modal_projector"]))
    randomize_adapters(model)  # so that lora_A gets a gradient too (B = 0 blocks it)
    model(model.collate(colour_samples(2, seed=2)))["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = set(adapter_parameters(model)) | {
        n for n, _ in model.named_parameters() if n.startswith("multi_modal_projector.")
    }
    assert with_grad == expected
    assert any(".vision_tower." in f".{n}" for n in with_grad)  # the vision tower's adapters too
    # The optimizer the loop builds holds exactly those parameters.
    model.zero_grad()
    groups = build_param_groups(model, 1e-3, {}, 0.1)
    assert {n for g in groups for n in g["names"]} == expected


def test_checkpoint_round_trip_with_adapters(tokenizer_dir, tmp_path):
    model = tiny("llava", tokenizer_dir).eval()
    apply_lora(model, lora_for("llava", dropout=0.1))
    randomize_adapters(model)
    batch = model.collate(colour_samples(2, seed=3))
    loss, logits = losses_and_logits(model, batch)
    save_checkpoint(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["lora"]["modules"] == ["language_model", "vision_tower"]
    again = load(tmp_path / "ckpt")
    assert has_lora(again) and set(again.state_dict()) == set(model.state_dict())
    again_loss, again_logits = losses_and_logits(again, batch)
    assert torch.equal(again_loss, loss) and torch.equal(again_logits, logits)
    # Engine generation runs on the unmerged model (through its own prefill/decode_step: see
    # test_engine_fast_path_sees_adapters) and equals the merged one on the fast path.
    params = SamplingParams(max_new_tokens=4)
    unmerged = Engine(again, again.processor.tokenizer, eos_token_ids=[], fast=False).generate_batch(model.prompt_batch(PROMPTS), params)
    merge_lora(again)
    merged = Engine(again, again.processor.tokenizer, eos_token_ids=[]).generate_batch(model.prompt_batch(PROMPTS), params)
    assert [o.token_ids for o in unmerged] == [o.token_ids for o in merged]
    # A merged model saves as a plain checkpoint again.
    save_checkpoint(again, tmp_path / "merged")
    assert "lora" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert not has_lora(load(tmp_path / "merged"))


def test_bad_settings_are_user_errors(tokenizer_dir):
    with pytest.raises(UserError, match="rank"):
        LoraConfig(rank=0)
    model = tiny("cogvlm", tokenizer_dir)
    with pytest.raises(UserError, match="not modules of this model"):
        apply_lora(model, LoraConfig(modules=["decoder"]))
    with pytest.raises(UserError, match="match no Linear"):
        apply_lora(model, LoraConfig(targets=["qkv"], modules=["visual_expert"]))
    apply_lora(model, LoraConfig(modules=["visual_expert"]))
    with pytest.raises(UserError, match="already has LoRA"):
        apply_lora(model, LoraConfig(modules=["visual_expert"]))


def test_trains_through_the_loop_from_a_lora_checkpoint(tokenizer_dir, tmp_path):
    """`model.init_from` a checkpoint saved with adapters: the loop trains the adapters only,
    and the run's checkpoint keeps them (re-applied on load)."""
    model = tiny("llava", tokenizer_dir)
    apply_lora(model, lora_for("llava"))
    save_checkpoint(model, tmp_path / "start")
    recipe = recipe_from_dict({
        "model": {"init_from": str(tmp_path / "start")},
        "optim": {"lr": 1e-2},
        "batch_size": 4, "max_steps": 4, "log_every": 2, "eval_every": None, "eval_batches": 1,
        "num_threads": 1, "seed": 0,
    })
    data = {"train": colour_samples(16, seed=0), "val": colour_samples(4, seed=1)}
    train(recipe, tmp_path / "run", source=lambda role: data[role], show_progress=False)
    before = load(tmp_path / "start").state_dict()
    after_model = load(tmp_path / "run" / "checkpoint")
    after = after_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(adapter_parameters(after_model))


def test_recipe_lora_section_trains_adapters_only(tokenizer_dir, tmp_path):
    """A recipe's `lora` section puts adapters on a plain model before the optimizer is built."""
    save_checkpoint(tiny("llava", tokenizer_dir), tmp_path / "start")
    recipe = recipe_from_dict({
        "model": {"init_from": str(tmp_path / "start")},
        "lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"],
                 "modules": ["language_model"]},
        "optim": {"lr": 1e-2},
        "batch_size": 4, "max_steps": 3, "log_every": 1, "eval_every": None, "eval_batches": 1,
        "num_threads": 1, "seed": 0,
    })  # fmt: skip
    data = {"train": colour_samples(16, seed=0), "val": colour_samples(4, seed=1)}
    train(recipe, tmp_path / "run", source=lambda role: data[role], show_progress=False)
    trained = load(tmp_path / "run" / "checkpoint")
    assert has_lora(trained)
    start = load(tmp_path / "start").state_dict()
    after = {k.replace(".base_layer", ""): v for k, v in trained.state_dict().items()}
    adapters = {k for k in after if ".lora_" in k}
    assert all(torch.equal(start[k], after[k]) for k in start), "base weights must stay frozen"
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in adapters if "lora_B" in k)


def test_fewer_steps_train_step_moves_only_adapters(tokenizer_dir):
    model = tiny("fuyu", tokenizer_dir).train()
    apply_lora(model, lora_for("fuyu"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(build_param_groups(model, 1e-2, {}, 0.1), lr=1e-2)
    batch = model.collate(colour_samples(4, seed=4))
    train_step(model, opt, [batch], 1.0, torch.device("cpu"))
    now = dict(model.named_parameters())
    assert frozen and all(torch.equal(now[n], v) for n, v in frozen.items())


def test_merged_llava_exports_to_transformers(tokenizer_dir, tmp_path):
    import transformers

    from visto.models.llava import export_hf

    model = tiny("llava", tokenizer_dir).eval()
    apply_lora(model, lora_for("llava"))
    randomize_adapters(model)
    batch = model.collate(colour_samples(2, seed=5))
    with torch.no_grad():
        ours, _ = model.language_model(
            inputs_embeds=model.embed_inputs(batch["input_ids"], batch["pixel_values"]),
            attention_mask=batch["attention_mask"],
        )
    export_hf(model, tmp_path / "hf")  # merges a copy on the way out
    assert has_lora(model), "exporting must not merge the caller's model"
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        theirs = hf(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits
    real = batch["attention_mask"].bool()
    assert (ours[real] - theirs[real]).abs().max() < 1e-4


def test_engine_fast_path_sees_adapters(tokenizer_dir):
    model = tiny("llava", tokenizer_dir).eval()
    apply_lora(model, lora_for("llava"))
    randomize_adapters(model)
    params = SamplingParams(max_new_tokens=4)
    prompts = model.prompt_batch(PROMPTS)
    fast = Engine(model, model.processor.tokenizer, eos_token_ids=[]).generate_batch(prompts, params)
    slow = Engine(model, model.processor.tokenizer, eos_token_ids=[], fast=False).generate_batch(prompts, params)
    assert [o.token_ids for o in fast] == [o.token_ids for o in slow]
