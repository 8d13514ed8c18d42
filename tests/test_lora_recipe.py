"""What the shipped llava-lora recipe trains on a model of the quickstart's layout
(`quickstart.llava_config`: a connector with a question focus, a pointer, object tokens):
rank-16 adapters on the decoder and the connector at a tenth of the lr (lora.trainable
["multi_modal_projector"], optim.module_lrs 1e-4 against optim.lr 1e-3), nothing else.
Measured on the quickstart's final model with half of each batch replayed (bench/README.md,
"The connector at a lower lr"): at 100 steps, 8 seeds, the same new questions as frozen or at
the full lr and the fewest old ones forgotten (48 of 9,600; frozen 60, full lr 165); at 200
steps, 8 seeds, more new questions than frozen (307 against 269 of 1,600, 52 / 14 head to
head) with about as few forgotten (32 against 24; 15 / 21 head to head, p 0.4). `lora.trainable=[]` freezes the connector (the default before),
`optim.module_lrs={}` trains it at the full lr. Checked through `visto.train` for a few
steps."""

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


def max_change(start, after, prefix):
    return max((after[k] - start[k]).abs().max().item() for k in start if k.startswith(prefix))


def test_the_shipped_recipe_trains_the_connector_at_a_tenth_of_the_lr(tmp_path):
    shipped = load_recipe("llava-lora")
    assert shipped.lora is not None and shipped.lora.trainable == [CONNECTOR]
    assert shipped.optim.module_lrs == {CONNECTOR: shipped.optim.lr / 10}
    # The test's lr 0.01 for the rest; the connector keeps its own 1e-4 (absolute): 3 AdamW
    # steps move each of its weights by about 1e-4 each at most, the adapters by ~1e-2.
    recipe, start, after = train_the_recipe(tmp_path)
    assert recipe.optim.module_lrs == {CONNECTOR: 1e-4}
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed and all(k.startswith(CONNECTOR + ".") for k in changed), sorted(changed)[:5]
    assert {"focus", "pointer"} <= {k.split(".")[1] for k in changed}
    assert 0 < max_change(start, after, CONNECTOR) < 1e-3
    moved = [k for k in after if ".lora_B" in k and after[k].abs().sum() > 0]
    assert moved and all(k.startswith("language_model.") for k in moved)
    assert max(after[k].abs().max().item() for k in moved) > 5e-3


def test_freezing_the_connector_is_one_setting(tmp_path):
    """`lora.trainable=[]` (the default before) leaves the connector as the start had it;
    only the adapters move."""
    recipe, start, after = train_the_recipe(tmp_path, "lora.trainable=[]")
    assert recipe.lora is not None and recipe.lora.trainable == []
    changed = sorted(k for k in start if not torch.equal(start[k], after[k]))
    assert changed == [], f"the recipe changed {changed[:5]}"
    moved = [k for k in after if ".lora_B" in k and after[k].abs().sum() > 0]
    assert moved and all(k.startswith("language_model.") for k in moved)


def test_the_connector_at_the_full_lr_is_one_setting_and_moves_more(tmp_path):
    """`optim.module_lrs={}` trains the connector at optim.lr, e.g. for a transformers LLaVA's
    MLP projector on images unlike its own; nothing else moves."""
    recipe, start, after = train_the_recipe(tmp_path, "optim.module_lrs={}")
    assert recipe.lora is not None and recipe.lora.trainable == [CONNECTOR]
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed and all(k.startswith(CONNECTOR + ".") for k in changed), sorted(changed)[:5]
    assert max_change(start, after, CONNECTOR) > 3e-3
