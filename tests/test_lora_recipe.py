"""What the shipped llava-lora recipe trains on a model of the quickstart's layout
(`quickstart.llava_config`: a connector with a question focus, a pointer, object tokens):
rank-16 adapters on the decoder and nothing else, the connector left as the start had it
(lora.trainable: []). Measured on the quickstart's final model with half of each batch
replayed, four training seeds: training the connector too lost relation questions (0.966 ->
0.83-0.92, against 0.94-0.95 frozen; 44 / 10 questions frozen against trained, p 3e-6) for a
larger gain on new questions; counting did not move either way (bench/README.md, "Freezing
the connector in LoRA fine-tuning"). `lora.trainable=["multi_modal_projector"]` trains it
again. Checked through `visto.train` for a few steps."""

from __future__ import annotations

import torch

from test_export_quickstart import quickstart_model
from test_lora import colour_samples
from visto.checkpoint import load, save_checkpoint
from visto.data.tokenizer import train_tokenizer
from visto.nn.lora import has_lora
from visto.train.loop import train
from visto.train.recipe import load_recipe

CONNECTOR = "multi_modal_projector"


def train_the_recipe(tmp_path, *settings: str):
    """The shipped recipe but for its data, budget and finish (a lr high enough that 3 steps
    move whatever the optimizer holds), from a fresh model of the quickstart's layout: the
    recipe, the start's parameters and the trained ones (adapter layers' base weights under
    their original names)."""
    tok = tmp_path / "tok"
    tok.mkdir()
    texts = ["What colour?", "red", "blue", "Describe it.", "a red square"] * 4
    train_tokenizer(texts, vocab_size=400, loc_bins=32, min_frequency=1).save(tok / "tokenizer.json")
    model = quickstart_model(tok, tmp_path / "qtok")
    parts = {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith(CONNECTOR + ".")}
    assert {"focus", "pointer", "feature"} <= parts  # the quickstart's connector
    save_checkpoint(model, tmp_path / "start")
    recipe = load_recipe("llava-lora", [
        f"model.init_from={tmp_path / 'start'}", "data.source=unused", "data.image_root=null",
        "data.replay=null", "finish=null", "max_steps=3", "batch_size=4", "log_every=1",
        "num_threads=1", "optim.lr=0.01", *settings,
    ])  # fmt: skip
    data = {"train": colour_samples(16, seed=0), "val": colour_samples(4, seed=1)}
    train(recipe, tmp_path / "run", source=lambda role: data[role], show_progress=False)
    trained = load(tmp_path / "run" / "checkpoint")
    assert has_lora(trained)
    # Parameters (buffers such as the focus's word lookup are filled on first use).
    start = dict(load(tmp_path / "start").named_parameters())
    after = {k.replace(".base_layer", ""): v for k, v in trained.named_parameters()}
    return recipe, start, after


def test_the_shipped_recipe_trains_adapters_and_leaves_the_connector_as_it_was(tmp_path):
    recipe, start, after = train_the_recipe(tmp_path)
    assert recipe.lora is not None and recipe.lora.trainable == []
    changed = sorted(k for k in start if not torch.equal(start[k], after[k]))
    assert changed == [], f"the recipe changed {changed[:5]}"
    moved = [k for k in after if ".lora_B" in k and after[k].abs().sum() > 0]
    assert moved and all(k.startswith("language_model.") for k in moved)


def test_training_the_connector_is_one_setting_and_then_it_moves(tmp_path):
    """`lora.trainable=["multi_modal_projector"]` (the default before) trains it again, e.g.
    for a transformers LLaVA's MLP projector on images unlike its own; nothing else moves."""
    recipe, start, after = train_the_recipe(tmp_path, f'lora.trainable=["{CONNECTOR}"]')
    assert recipe.lora is not None and recipe.lora.trainable == [CONNECTOR]
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed and all(k.startswith(CONNECTOR + ".") for k in changed), sorted(changed)[:5]
    assert {"focus", "pointer"} <= {k.split(".")[1] for k in changed}
