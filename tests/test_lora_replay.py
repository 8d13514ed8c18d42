"""Replay against forgetting (data.replay): a fine-tuning recipe mixes a share of what the
starting checkpoint was trained on (as its card records it) or of a named dataset into its
batches; the resolved recipe lists the old data as a source of data.sources, the share holds
in the stream, and bad settings are clear errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import foreign_data
from test_train_foreign_data import tiny_llava_recipe
from visto.cli import main
from visto.config import to_dict
from visto.data.synth import WorldConfig, generate_world
from visto.errors import UserError
from visto.train.data import source_from_spec
from visto.train.mixture import card_section, trained_on
from visto.train.recipe import recipe_from_dict, recipe_to_dict

SPLITS = {"train": 0.5, "val": 0.1, "test": 0.2, "heldout": 0.2}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """(root, a checkpoint `visto train` trained on a world, that world, LLaVA JSON, its images)."""
    root = tmp_path_factory.mktemp("replay")
    world = root / "world"
    generate_world(WorldConfig(n=40, seed=1, size=48, splits=SPLITS), world)
    recipe = tiny_llava_recipe(root / "recipe.json", world, tasks=["vqa", "caption"])
    assert main(["train", "--recipe", recipe, "--out", str(root / "base"), "--no-progress"]) == 0
    llava, images = foreign_data.write_llava_mix(root / "llava")
    return root, root / "base" / "checkpoint", world, llava, images


def lora_recipe(init, llava, images, replay, **extra) -> dict:
    return {
        "model": {"family": "llava", "init_from": str(init)},
        "data": {"source": str(llava), "image_root": str(images), "replay": replay},
        "lora": {"rank": 2, "targets": ["q_proj", "v_proj"]},
        "batch_size": 4, "max_steps": 2, "log_every": 1, "eval_every": None, "num_threads": 1,
        **extra,
    }  # fmt: skip


def test_the_card_records_what_the_checkpoint_was_trained_on(start):
    _, init, world, _, _ = start
    assert card_section(init, "data")["source"] == str(world)
    assert card_section(init, "nowhere") is None
    assert trained_on(init) == [{"source": str(world), "split": "train",
                                 "tasks": ["vqa", "caption"], "weight": 1.0}]  # fmt: skip


def test_replay_from_init_from_becomes_a_weighted_source(start):
    _, init, world, llava, images = start
    recipe = recipe_from_dict(lora_recipe(init, llava, images, {"share": 0.25}))
    data = recipe.data
    assert data.replay is None and data.source == "" and data.image_root is None
    new, old = data.sources
    assert (new.source, new.image_root, new.weight, new.replay) == (str(llava), str(images), 1.0, False)
    assert (old.source, old.split, old.tasks, old.replay) == (str(world), "train", ["vqa", "caption"], True)
    assert old.weight == pytest.approx(1 / 3) and old.val_split is None  # validation: the new data's
    # The resolved recipe (RUN/config.json) reads back as itself: --resume sees the same data.
    again = recipe_from_dict(json.loads(json.dumps(recipe_to_dict(recipe))))
    assert to_dict(again.data) == to_dict(data)


def test_the_share_holds_in_the_stream(start):
    _, init, _, llava, images = start
    for share in (0.25, 0.5, 0.75):
        recipe = recipe_from_dict(lora_recipe(init, llava, images, {"share": share}))
        source, _ = source_from_spec(recipe.data, 0)
        drawn = [s.source for _, s in zip(range(40), source("train"), strict=False)]
        # Within one sample of the share at every point (visto.train.mixture).
        for n in range(1, len(drawn) + 1):
            assert abs(drawn[:n].count("synth") - share * n) <= 1, (share, n)


def test_replay_keeps_a_mixtures_weights_and_reads_a_dataset_path(start, tmp_path):
    _, init, world, llava, images = start
    parquet = foreign_data.write_hf_parquet(tmp_path / "captions.parquet")
    mixture = {"sources": [{"source": str(llava), "image_root": str(images), "weight": 3},
                           {"source": str(parquet), "weight": 1}]}  # fmt: skip
    recipe = lora_recipe(init, llava, images, {"share": 0.5, "source": str(world),
                                                "tasks": ["vqa"], "split": "val"})  # fmt: skip
    recipe["data"] = {**mixture, "replay": recipe["data"]["replay"]}
    sources = recipe_from_dict(recipe).data.sources
    assert [(s.weight, s.replay) for s in sources] == [(3.0, False), (1.0, False), (4.0, True)]
    assert (sources[2].source, sources[2].tasks, sources[2].split) == (str(world), ["vqa"], "val")
    source, _ = source_from_spec(recipe_from_dict(recipe).data, 0)
    assert Counter(s.source.split(":")[0] for _, s in zip(range(16), source("train"), strict=False)) == {
        "llava": 6, "parquet": 2, "synth": 8}  # fmt: skip


@pytest.mark.parametrize(
    ("replay", "extra", "message"),
    [
        ({"share": 0}, {}, r"data.replay.share is the fraction .* in \(0, 1\)"),
        ({"share": 1.0}, {}, r"in \(0, 1\)"),
        ({"share": "half"}, {}, r"got 'half'"),
        ({"share": 0.5, "source": ""}, {}, "data.replay.source is not set"),
        ({"share": 0.5, "mix": "instruct"}, {}, "data.replay.mix applies to a dataset path"),
        ({"share": 0.5, "source": "WORLD", "mix": "nope"}, {}, "unknown data.replay.mix 'nope'"),
        ({"share": 0.5, "source": "nowhere.json"}, {}, "data.replay.source nowhere.json does not exist"),
        ({"shar": 0.5}, {}, r"unknown setting\(s\) \['shar'\]"),
    ],
)  # fmt: skip
def test_bad_replay_settings_are_clear_errors(start, replay, extra, message):
    _, init, world, llava, images = start
    if replay.get("source") == "WORLD":
        replay = {**replay, "source": str(world)}
    with pytest.raises(UserError, match=message):
        recipe_from_dict(lora_recipe(init, llava, images, replay, **extra))


def test_init_from_without_a_record_of_its_data_says_what_to_set(start, tmp_path):
    import visto
    from visto.checkpoint import save_checkpoint

    _, init, world, llava, images = start
    say = "give data.replay.source the path of that data .* or set data.replay to null"
    recipe = lora_recipe(init, llava, images, {"share": 0.5})
    recipe["model"]["init_from"] = None
    with pytest.raises(UserError, match="set model.init_from, or give data.replay.source"):
        recipe_from_dict(recipe)
    # A start that does not exist yet (a shipped recipe's default) parses; training stops
    # before it begins, saying what is missing.
    recipe["model"]["init_from"] = str(tmp_path / "gone")
    waiting = recipe_from_dict(recipe)
    assert waiting.data.replay is not None and waiting.data.sources is None
    from visto.train.loop import train

    with pytest.raises(UserError, match="but there is no checkpoint there; fix model.init_from"):
        train(waiting, tmp_path / "run-gone")
    assert not (tmp_path / "run-gone").exists()
    # A checkpoint written without a card's data section (an export, a hand-saved model).
    save_checkpoint(visto.load(init), tmp_path / "bare")
    recipe["model"]["init_from"] = str(tmp_path / "bare")
    with pytest.raises(UserError, match="records no training data .*" + say):
        recipe_from_dict(recipe)
    # A transformers directory records none either.
    assert main(["export", str(init), "--out", str(tmp_path / "hf")]) == 0
    recipe["model"]["init_from"] = str(tmp_path / "hf")
    with pytest.raises(UserError, match="a transformers directory records no training data: " + say):
        recipe_from_dict(recipe)
    # Data the card names that is no longer there.
    card = (init / "README.md").read_text().replace(str(world), str(tmp_path / "moved"))
    moved = tmp_path / "moved-ckpt"
    moved.mkdir()
    for f in init.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    (moved / "README.md").write_text(card)
    recipe["model"]["init_from"] = str(moved)
    with pytest.raises(UserError, match="moved, which does not exist here"):
        recipe_from_dict(recipe)
    # Without replay each of them fine-tunes.
    recipe["data"]["replay"] = None
    assert recipe_from_dict(recipe).data.sources is None


@pytest.mark.slow
def test_visto_train_replays_and_the_checkpoint_records_it(start, capsys):
    root, init, world, llava, images = start
    path = root / "lora.json"
    path.write_text(json.dumps(lora_recipe(init, llava, images, None)))
    run = root / "tuned"
    args = ["train", "--recipe", str(path), "--out", str(run), "--no-progress",
            "--set", "data.replay.share=0.5"]  # fmt: skip
    assert main(args) == 0
    saved = json.loads((run / "config.json").read_text())["data"]
    assert saved["replay"] is None
    assert [(s["source"], s["weight"], s["replay"]) for s in saved["sources"]] == [
        (str(llava), 1.0, False), (str(world), 1.0, True)]  # fmt: skip
    # The tuned checkpoint's card names both, so that fine-tuning it again with replay
    # replays the first fine-tune's data and the world, by their weights.
    assert [s["source"] for s in trained_on(run / "checkpoint")] == [str(llava), str(world)]
    again = lora_recipe(run / "checkpoint", llava, images, {"share": 0.5})
    assert [(s.source, s.weight, s.replay) for s in recipe_from_dict(again).data.sources] == [
        (str(llava), 1.0, False), (str(llava), 0.5, True), (str(world), 0.5, True)]  # fmt: skip
    # A resumed run keeps the resolved data; asking for replay again is refused, clearly.
    assert main(["train", "--resume", str(run), "--set", "max_steps=3", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "data.replay.share=0.3", "--no-progress"]) == 2
    assert "data.replay is already resolved into data.sources" in capsys.readouterr().err


def test_a_world_mix_is_replayed_one_exchange_per_sample_unless_whole(start, tmp_path):
    """The quickstart's stage 2 trained on a mix (every task of an image in one sample); its
    replay draws the mix's tasks one exchange a sample, or the mix's samples with whole_mix."""
    import visto
    from visto.checkpoint import save_checkpoint
    from visto.data.synth.mixes import get_mix
    from visto.train.data import data_card
    from visto.train.recipe import DataSpec

    _, init, world, llava, images = start
    spec = DataSpec(source=str(world), mix="instruct+caption")
    save_checkpoint(visto.load(init), tmp_path / "stage2", card={"data": data_card(spec)})
    tasks = list(get_mix("instruct+caption").tasks)
    assert trained_on(tmp_path / "stage2", whole_mix=False)[0]["tasks"] == tasks
    assert trained_on(tmp_path / "stage2")[0]["mix"] == "instruct+caption"
    recipe = lora_recipe(tmp_path / "stage2", llava, images, {"share": 0.5})
    old = recipe_from_dict(recipe).data.sources[1]
    assert (old.mix, old.tasks, old.replay) == (None, tasks, True)
    recipe["data"]["replay"]["whole_mix"] = True
    old = recipe_from_dict(recipe).data.sources[1]
    assert (old.mix, old.tasks) == ("instruct+caption", None)
    # Drawn: one exchange per old sample, of the mix's tasks.
    source, _ = source_from_spec(recipe_from_dict(lora_recipe(tmp_path / "stage2", llava, images,
                                                              {"share": 0.5})).data, 0)  # fmt: skip
    old_samples = [s for _, s in zip(range(40), source("train"), strict=False) if s.source == "synth"]
    assert len(old_samples) == 20
    assert all(len([t for t in s.turns if t.role == "assistant"]) == 1 for s in old_samples)
