"""Several datasets mixed by weight in one recipe (data.sources): the shares hold at every
point of the stream, an epoch reads every dataset through, the batches are the seed's, and
`visto train` trains on a mixture of files other tools wrote."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import foreign_data
from test_train_foreign_data import tiny_llava_recipe
from visto.cli import main
from visto.data.sample import Sample
from visto.errors import UserError
from visto.train.data import BatchStream, source_from_spec
from visto.train.mixture import interleave_by_weight
from visto.train.recipe import recipe_from_dict


def named(prefix: str, n: int):
    return lambda: [Sample(f"{prefix}{i}") for i in range(n)]


def test_each_draw_keeps_every_source_within_one_sample_of_its_share():
    ids = [s.id for s in interleave_by_weight([named("a", 30), named("b", 4)], [3, 1], ["a", "b"])]
    counts = Counter()
    for n, sample_id in enumerate(ids, start=1):
        counts[sample_id[0]] += 1
        assert abs(counts["a"] - 0.75 * n) <= 1 and abs(counts["b"] - 0.25 * n) <= 1
    assert ids[:8] == ["a0", "a1", "b0", "a2", "a3", "a4", "b1", "a5"]
    # The epoch ends once both are read through: all 30 of a, b's 4 about twice and a half.
    assert {f"a{i}" for i in range(30)} <= set(ids) and counts["b"] == 10
    assert ids == [s.id for s in interleave_by_weight([named("a", 30), named("b", 4)], [3, 1],
                                                      ["a", "b"])]  # fmt: skip


def test_an_empty_source_is_named():
    with pytest.raises(UserError, match=r"data.sources\[1\] \(empty.json\) has no samples"):
        list(interleave_by_weight([named("a", 3), named("b", 0)], [1, 1],
                                  ["data.sources[0] (a)", "data.sources[1] (empty.json)"]))  # fmt: skip


@pytest.fixture()
def two_files(tmp_path):
    """(llava JSON, its image folder, parquet): 8 and 8 loadable samples."""
    llava, images = foreign_data.write_llava_mix(tmp_path / "llava")
    parquet = foreign_data.write_hf_parquet(tmp_path / "captions.parquet")
    return llava, images, parquet


def mixture(llava, images, parquet, weights=(3, 1), val=None) -> dict:
    first = {"source": str(llava), "image_root": str(images), "weight": weights[0]}
    if val:
        first["val_source"] = str(val)
    return {"sources": [first, {"source": str(parquet), "weight": weights[1]}]}


def stream(recipe_data: dict, seed: int, state=None) -> BatchStream:
    recipe = recipe_from_dict({"model": {"family": "llava"}, "data": recipe_data, "seed": seed})
    source, _ = source_from_spec(recipe.data, seed)
    return BatchStream(source, "train", lambda batch: [(s.source, s.id) for s in batch], 4,
                       seed=seed, shuffle_buffer=64, state=state)  # fmt: skip


def test_files_mix_by_weight_and_the_seed_fixes_the_batches(two_files):
    data = mixture(*two_files)
    recipe = recipe_from_dict({"model": {"family": "llava"}, "data": data})
    epoch = [s.source.split(":")[0] for s in source_from_spec(recipe.data, 0)[0]("train")]
    assert Counter(epoch[:32]) == {"llava": 24, "parquet": 8}  # 3 : 1, 8 samples each
    batches = stream(data, seed=0)
    taken = [next(batches) for _ in range(8)]  # 32 samples, over an epoch's end
    again = stream(data, seed=0)
    assert [next(again) for _ in range(8)] == taken  # the same seed, the same batches
    other = stream(data, seed=1)
    assert [next(other) for _ in range(8)] != taken  # another seed, another order
    # Resumed from its position, a stream goes on with the batches the first one gave.
    resumed = stream(data, seed=0, state={"epoch": 0, "taken": 12})
    assert [next(resumed) for _ in range(5)] == taken[3:]


def test_validation_mixes_the_sources_that_have_some(two_files):
    llava, images, parquet = two_files
    recipe = recipe_from_dict({"model": {"family": "llava"},
                               "data": mixture(llava, images, parquet, val=llava)})  # fmt: skip
    source, has_val = source_from_spec(recipe.data, 0)
    assert has_val and {s.source.split(":")[0] for s in source("val")} == {"llava"}
    recipe = recipe_from_dict({"model": {"family": "llava"}, "data": mixture(*two_files)})
    assert source_from_spec(recipe.data, 0)[1] is False


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"source": "x.json", "sources": [{"source": "a.json"}]},
         "data.source belong in each source"),
        ({"sources": [{"source": "a.json", "weight": 0}]}, r"data.sources\[0\].weight must be a positive"),
        ({"sources": [{"weight": 1}]}, r"data.sources\[0\].source is not set"),
        ({"sources": []}, "data.sources is empty"),
        ({"sources": [{"source": "a.json", "wieght": 2}]}, r"unknown setting\(s\) \['wieght'\]"),
        ({"sources": [{"source": "w", "mix": "nope"}]}, r"unknown data.sources\[0\].mix 'nope'"),
    ],
)  # fmt: skip
def test_bad_mixtures_are_clear_errors(data, message):
    with pytest.raises(UserError, match=message):
        recipe_from_dict({"model": {"family": "llava"}, "data": data})


@pytest.mark.slow
def test_visto_train_on_a_weighted_mixture_of_foreign_files(two_files, tmp_path, capsys):
    recipe_path = tiny_llava_recipe(tmp_path / "recipe.json", "")
    recipe = json.loads(open(recipe_path).read())
    recipe["data"] = mixture(*two_files)
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    run = tmp_path / "run"
    assert main(["train", "--recipe", recipe_path, "--out", str(run), "--no-progress"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert [s["weight"] for s in config["data"]["sources"]] == [3.0, 1.0]
    card = (run / "checkpoint" / "README.md").read_text()
    assert "captions.parquet" in card and "mix.json" in card
    # The CLI's one-dataset flags do not silently apply to a mixture.
    args = ["train", "--recipe", recipe_path, "--out", str(tmp_path / "r2"), "--image-root", "x"]
    assert main(args) == 2
    assert "data.image_root belong in each source" in capsys.readouterr().err
