"""Training mixes (`visto.data.synth.mixes`): what each builds from a world, how a recipe
selects one, and the guard against leaking mixes: on the real mixes' batches, through the real
processor and a tiny LLaVA, no answer's logits move when another exchange's tokens change."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from visto.data.processor import IGNORE_INDEX
from visto.data.synth import WorldConfig, generate_world, iter_records
from visto.data.synth.mixes import (
    LOOK_TYPES,
    MIXES,
    get_mix,
    mix_source,
    record_qas,
    tokenizer_texts,
)
from visto.data.tokenizer import train_tokenizer
from visto.errors import UserError
from visto.train.data import data_card, source_from_spec
from visto.train.recipe import load_recipe

LOC_BINS = 32  # the tiny presets' location bins


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    # Mostly multi-object images: every task kind has items to ask about.
    root = tmp_path_factory.mktemp("mixes") / "world"
    splits = {"train": 0.75, "val": 0.25, "test": 0.0, "heldout": 0.0}
    generate_world(WorldConfig(n=8, size=48, seed=3, max_objects=3, single_object_fraction=0.0,
                               splits=splits), root, workers=1)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(world, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer(tokenizer_texts(world, LOC_BINS), vocab_size=400, loc_bins=LOC_BINS, min_frequency=1)
    tok.save(path / "tokenizer.json")
    return path


def exchanges(sample) -> list[tuple[str, str]]:
    turns = sample.turns
    assert [t.role for t in turns] == ["user", "assistant"] * (len(turns) // 2)
    return [(turns[i].content.removeprefix("<image>\n"), turns[i + 1].content) for i in range(0, len(turns), 2)]


def test_every_mix_asks_its_tasks_of_each_image(world):
    records = list(iter_records(world, "train"))
    for name, mix in MIXES.items():
        if name == "tools":  # a system turn offers the tool first: tests/test_tool_mix.py
            continue
        if mix.prefixes is not None:  # text in front of its questions: tests/test_mix_prefixes.py
            continue
        samples = list(mix.samples(world, "train", seed=0, epoch=0, loc_bins=LOC_BINS))
        assert [s.id for s in samples] == [r["id"] for r in records], name
        for sample, record in zip(samples, records, strict=True):
            assert len(sample.images) == 1 and sample.turns[0].content.startswith("<image>\n")
            asked = exchanges(sample)
            expected = record_qas(record, LOC_BINS) if "vqa" in mix.tasks else []
            captions = [(q, a) for q, a in asked if a in record["tasks"]["captions"]]
            if name in ("look", "bind", "look+copy"):  # two (three) short questions naming objects
                short = [(qa["q"], qa["a"]) for qa in record["tasks"]["vqa"] if qa["type"] in LOOK_TYPES]
                kinds = {qa["type"] for qa in record["tasks"]["vqa"] if qa["type"] in LOOK_TYPES}
                n = min(3, len(kinds)) if name == "bind" else min(2, len(short))
                copied = set(asked) - set(short) - set(captions)  # look+copy: a box, the text
                if name == "look+copy":
                    t = record["tasks"]
                    ground = [(qa, a) for qa, a in expected if any(qa == g["q"] for g in t["ground"])]
                    ocr = [(t["ocr"]["q"], t["ocr"]["a"])] if t["ocr"] else []
                    assert copied <= set(ground) | set(ocr) and set(ocr) <= copied
                    assert len(copied) == bool(ground) + bool(ocr)
                else:
                    assert not copied
                assert len(asked) == 1 + n + len(copied)
            else:
                assert sorted(set(asked) - set(captions)) == sorted(expected), name
            assert len(captions) == ("caption" in mix.tasks), name
            # Several questions of one image in a sample: they must not see each other.
            assert sample.independent_turns == mix.independent_turns
            if len(asked) > 1:
                assert mix.independent_turns, f"mix {name} packs exchanges in one causal sequence"


def test_bind_balances_question_types_and_avoids_the_largest_object(tmp_path):
    """The `bind` mix asks colour as often as existence (the world has ~4 existence questions
    per image to ~1.7 colour ones) and, where it can, about an object that is not the largest."""
    import collections

    from visto.data.synth.mixes import _bind, _look, _named_not_largest

    root = tmp_path / "world"
    generate_world(WorldConfig(n=60, size=48, seed=5, single_object_fraction=0.0,
                               splits={"train": 1.0, "val": 0.0, "test": 0.0, "heldout": 0.0}),
                   root, workers=1)  # fmt: skip
    records = list(iter_records(root, "train"))
    counts = {}
    for exchanges_of in (_look, _bind):
        rng, seen = random.Random(0), collections.Counter()
        for _ in range(5):
            for record in records:
                kind = {(qa["q"], qa["a"]): qa for qa in record["tasks"]["vqa"]}
                for qa in (kind[e] for e in exchanges_of(record, LOC_BINS, rng) if e in kind):
                    seen[qa["type"]] += 1
                    seen["named", _named_not_largest(record, qa)] += "object" in qa
        counts[exchanges_of.__name__] = seen
    look, bind = counts["_look"], counts["_bind"]
    assert look["exist"] > 1.5 * look["colour"]  # the world's own proportions
    assert bind["colour"] > 0.7 * bind["exist"] and bind["colour"] > 1.3 * look["colour"]
    assert bind["named", True] / (bind["named", True] + bind["named", False]) > (
        look["named", True] / (look["named", True] + look["named", False]) + 0.05)


def test_boxes_are_location_tokens_outside_json(world):
    record = next(iter_records(world, "train"))
    qas = dict(record_qas(record, LOC_BINS))
    grounding = [a for q, a in qas.items() if q in {g["q"] for g in record["tasks"]["ground"]}]
    assert grounding and all(a.startswith("<loc_") and "[" not in a for a in grounding)
    assert json.loads(qas[record["tasks"]["json"]["q"]])["objects"][0]["box"]  # plain ints


def test_epochs_redraw_but_a_seed_repeats(world):
    mix = get_mix("instruct+caption")

    def turns(seed: int, epoch: int) -> list:
        return [s.turns for s in mix.samples(world, "train", seed=seed, epoch=epoch, loc_bins=LOC_BINS)]

    assert turns(0, 0) == turns(0, 0)
    assert turns(0, 0) != turns(0, 1) and turns(0, 0) != turns(1, 0)
    source = mix_source("instruct+caption", world, {"train": "train", "val": "val"}, seed=0, loc_bins=LOC_BINS)
    assert [s.turns for s in source("train")] == turns(0, 0)
    assert [s.turns for s in source("train")] == turns(0, 1)  # the next call is the next epoch


def test_a_recipe_selects_a_mix_and_the_card_records_it(world):
    recipe = load_recipe("quickstart-stage2", [f"data.source={json.dumps(str(world))}"])
    source, has_val = source_from_spec(recipe.data, recipe.seed, loc_bins=LOC_BINS)
    mix = "instruct+caption+prefixes"
    expected = get_mix(mix).samples(world, "train", seed=recipe.seed, epoch=0, loc_bins=LOC_BINS)
    assert has_val and [s.turns for s in source("train")] == [s.turns for s in expected]
    card = data_card(recipe.data)
    assert card["mix"]["name"] == mix and card["mix"]["independent_turns"] is True
    assert card["mix"]["prefixes"]["system_share"] > 0
    assert card["mix"]["tasks"] == ["vqa", "ground", "refdesc", "ocr", "json", "caption"]
    assert load_recipe("quickstart-stage1").data.mix == "look+copy"
    for family in ("llava", "blip2", "flamingo", "fuyu", "cogvlm"):
        assert load_recipe(f"compare-{family}").data.mix == "instruct+caption"


def test_bad_mix_settings_are_user_errors(world, tmp_path):
    with pytest.raises(UserError, match="unknown data.mix 'nope'; choose one of captions, look, bind, look.copy, instruct"):
        get_mix("nope")
    with pytest.raises(UserError, match="unknown data.mix 'nope'"):
        load_recipe("quickstart-stage2", ["data.mix=nope"])
    with pytest.raises(UserError, match="names its own tasks .*set data.tasks to null"):
        load_recipe("quickstart-stage2", ['data.tasks=["vqa"]'])
    (tmp_path / "data.json").write_text("[]")
    llava_json = [f"data.source={json.dumps(str(tmp_path / 'data.json'))}", "data.format=null"]
    recipe = load_recipe("quickstart-stage2", llava_json)
    with pytest.raises(UserError, match="data.mix builds samples of the synthetic world"):
        source_from_spec(recipe.data, 0, loc_bins=LOC_BINS)


# ----------------------------------------------------------------------------- the leak guard


def answer_runs(labels: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of every contiguous run of supervised tokens: one per answer."""
    runs, start = [], None
    for p, supervised in enumerate((labels != IGNORE_INDEX).tolist() + [False]):
        if supervised and start is None:
            start = p
        elif not supervised and start is not None:
            runs.append((start, p))
            start = None
    return runs


def leaking_answers(model, batch: dict, row: int) -> list[int]:
    """The exchanges of `row` whose answer logits change when every other exchange's tokens
    (question and answer, after the image) are replaced. Exchange k spans from the end of the
    previous answer (of the image, for the first) to the end of its own answer."""
    from visto.data.special_tokens import IMAGE_TOKEN_ID

    captured = {}
    # the last hidden states (B, T, C), which the logits are a function of: the LM head runs
    # on the scored rows only
    hook = model.language_model.model.norm.register_forward_hook(lambda m, i, out: captured.update(logits=out))
    ids = batch["input_ids"][row]
    runs = answer_runs(batch["labels"][row])
    image_end = int((ids == IMAGE_TOKEN_ID).nonzero().max()) + 1
    spans = [(image_end if k == 0 else runs[k - 1][1], end) for k, (_, end) in enumerate(runs)]
    fillers = torch.tensor([IMAGE_TOKEN_ID + 100, IMAGE_TOKEN_ID + 101])  # two ordinary ids
    leaks = []
    try:
        with torch.no_grad():
            model(batch)
            clean = captured["logits"][row]
            for k, (start, end) in enumerate(runs):
                perturbed = ids.clone()
                for j, (a, b) in enumerate(spans):
                    if j != k:
                        perturbed[a:b] = torch.where(ids[a:b] == fillers[0], fillers[1], fillers[0])
                model({**batch, "input_ids": torch.stack([perturbed if r == row else batch["input_ids"][r]
                                                          for r in range(len(batch["input_ids"]))])})  # fmt: skip
                # Logits at p - 1 predict the answer token at p.
                watched = slice(start - 1, end)
                if not torch.allclose(captured["logits"][row][watched], clean[watched], atol=1e-5):
                    leaks.append(k)
    finally:
        hook.remove()
    return leaks


@pytest.mark.parametrize("mix", ["instruct", "instruct+caption", "look", "look+copy"])
def test_no_answer_of_a_real_mix_sees_another_exchange(mix, world, tokenizer_dir):
    from visto.models.llava import Llava, LlavaConfig

    config = LlavaConfig.preset("tiny", tokenizer_dir=str(tokenizer_dir))
    model = Llava(config).eval()
    samples = list(get_mix(mix).samples(world, "train", seed=0, epoch=0, loc_bins=LOC_BINS))[:2]
    batch = model.collate(samples)
    for row in range(len(samples)):
        # exchanges to hide from each other: many in the instruct mixes, three in look (four
        # or five in look+copy)
        assert len(answer_runs(batch["labels"][row])) >= {"look": 3, "look+copy": 4}.get(mix, 5)
        assert leaking_answers(model, batch, row) == [], f"{mix}: answers read another exchange"

    # The guard is not vacuous: the same exchanges as one plain conversation leak.
    plain = model.collate([dataclasses.replace(s, independent_turns=False) for s in samples])
    leaks = leaking_answers(model, plain, 0)
    assert len(leaks) == len(answer_runs(plain["labels"][0])) - 1  # every answer but the first


def test_every_compare_family_packs_the_real_mix_without_leaks(world, tokenizer_dir):
    """Each family's collate carries the segments of the real compare mix, and its loss on
    the packed sample is the loss of the exchanges asked one by one."""
    from visto.models import build_model
    from visto.models.blip2 import Blip2Config
    from visto.models.cogvlm import CogVLMConfig
    from visto.models.flamingo import FlamingoConfig
    from visto.models.fuyu import FuyuConfig
    from visto.models.llava import LlavaConfig

    families = {"llava": (LlavaConfig, {}), "fuyu": (FuyuConfig, {}), "cogvlm": (CogVLMConfig, {}),
                "flamingo": (FlamingoConfig, {}), "blip2": (Blip2Config, {"losses": ["lm"]})}  # fmt: skip
    random.seed(0)
    for family, (config_cls, overrides) in families.items():
        config = config_cls.preset("tiny", tokenizer_dir=str(tokenizer_dir), **overrides)
        model = build_model(family, config, seed=0).eval()
        loc_bins = model.processor.config.loc_bins
        sample = next(get_mix("instruct+caption").samples(world, "train", seed=0, epoch=0, loc_bins=loc_bins))
        packed = model.collate([sample])
        assert packed["segment_ids"] is not None, family
        alone = [dataclasses.replace(sample, turns=sample.turns[2 * k : 2 * k + 2], independent_turns=False)
                 for k in range(len(sample.turns) // 2)]  # fmt: skip
        alone = [dataclasses.replace(s, turns=[dataclasses.replace(s.turns[0], content="<image>\n"
                 + s.turns[0].content.removeprefix("<image>\n")), s.turns[1]]) for s in alone]  # fmt: skip
        with torch.no_grad():
            packed_loss = model(packed)["loss"]
            alone_loss = model(model.collate(alone))["loss"]
        torch.testing.assert_close(packed_loss, alone_loss, atol=1e-5, rtol=1e-5, msg=family)


def test_a_training_run_on_a_mix_records_it_in_the_card(world, tokenizer_dir, tmp_path):
    """`visto train` with data.mix: the loop builds the mix with the model's location bins,
    and the checkpoint card and run config record the mix that was really used."""
    from visto.config import to_dict
    from visto.models.llava import LlavaConfig
    from visto.train.loop import train
    from visto.train.recipe import recipe_from_dict

    config = to_dict(LlavaConfig.preset("tiny", tokenizer_dir=str(tokenizer_dir)))
    recipe = recipe_from_dict({
        "model": {"family": "llava", "config": config},
        "data": {"source": str(world), "format": "synth", "mix": "instruct"},
        "batch_size": 2, "max_steps": 2, "log_every": 1, "eval_every": None, "eval_batches": 1,
    })  # fmt: skip
    result = train(recipe, tmp_path / "run", show_progress=False)
    assert result.step == 2 and result.steps_cut == 0
    card = (tmp_path / "run" / "checkpoint" / "README.md").read_text()
    data = json.loads(card.split("## data\n", 1)[1].split("```json\n", 1)[1].split("```", 1)[0])
    assert data["mix"] == {**get_mix("instruct").card(), "tasks": ["vqa", "ground", "refdesc", "ocr", "json"]}
    assert data["mix"]["independent_turns"] is True
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["mix"] == "instruct"


def test_json_boxes_rewrite_the_matched_boxes_of_json_answers_in_training_only(world, tmp_path):
    """data.json_boxes: the boxes a detector found replace the truth's box numbers in JSON
    answers where they match one to one (IoU >= 0.5), in the truth's object order; an object no
    box matches keeps its own; validation answers stay the truth's."""
    from visto.data.synth.tasks import with_json_boxes
    from visto.utils.boxes import box_iou

    record = next(r for r in iter_records(world, "train") if len(r["truth"]["objects"]) >= 2)
    objects = record["truth"]["objects"]
    near = [v + 7 for v in objects[0]["box_norm"]]  # overlaps object 0, nothing else as well
    assert box_iou(near, objects[0]["box_norm"]) >= 0.5
    far = [0, 0, 3, 3]  # matches nothing
    rewritten = with_json_boxes(record, [far, near])
    before, after = (json.loads(r["tasks"]["json"]["a"]) for r in (record, rewritten))
    changed = [(b["box"], a["box"]) for b, a in zip(before["objects"], after["objects"], strict=True)
               if b["box"] != a["box"]]  # fmt: skip
    assert changed == [(objects[0]["box_norm"], near)]
    for b, a in zip(before["objects"], after["objects"], strict=True):  # only box numbers change
        assert {k: v for k, v in b.items() if k != "box"} == {k: v for k, v in a.items() if k != "box"}
    assert (before["counts"], before["text"]) == (after["counts"], after["text"])
    assert with_json_boxes(record, [far]) is record  # nothing matched: the record as it was
    assert record["tasks"]["json"]["a"] == json.dumps(before, separators=(",", ":"))  # not mutated

    # Through a recipe: the training role's JSON answers carry the file's boxes, val's the truth's.
    path = tmp_path / "boxes.jsonl"
    train_ids = [r["id"] for r in iter_records(world, "train")]
    path.write_text("".join(json.dumps({"id": i, "boxes": [near]}) + "\n" for i in train_ids))
    recipe = load_recipe("quickstart-stage2", [f"data.source={json.dumps(str(world))}",
                                               f"data.json_boxes={json.dumps(str(path))}",
                                               'data.mix="instruct+caption"'])  # fmt: skip
    source, _ = source_from_spec(recipe.data, recipe.seed, loc_bins=LOC_BINS)
    json_q = {r["tasks"]["json"]["q"] for r in iter_records(world, "train")} | {
        r["tasks"]["json"]["q"] for r in iter_records(world, "val")}
    for sample in source("train"):
        if sample.id == record["id"]:
            answer = next(a for q, a in exchanges(sample) if q in json_q)
            assert answer == rewritten["tasks"]["json"]["a"]
    val = {r["id"]: r for r in iter_records(world, "val")}
    for sample in source("val"):
        answer = next(a for q, a in exchanges(sample) if q in json_q)
        assert answer == val[sample.id]["tasks"]["json"]["a"]
    assert data_card(recipe.data)["json_boxes"] == str(path)  # the card says which boxes


def test_bad_json_boxes_are_user_errors(world, tmp_path):
    from visto.data.synth.mixes import read_json_boxes

    with pytest.raises(UserError, match="does not exist"):
        read_json_boxes(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "boxes": [[1, 2, 3, 4]]}\n{"id": "b"}\n')
    with pytest.raises(UserError, match=r"not a JSON-lines file of .*\"boxes\""):
        read_json_boxes(bad)
    with pytest.raises(UserError, match="data.json_boxes rewrites the JSON answers of a world mix"):
        load_recipe("quickstart-stage2", ["data.mix=null", f"data.json_boxes={json.dumps(str(bad))}"])
