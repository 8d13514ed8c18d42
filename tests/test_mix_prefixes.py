"""The quickstart's stage-2 mix puts text in front of its questions (data.synth.prefixes): a
system turn or instruction lines in front of one question, in a share of the samples, short
and long, the answers unchanged."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from visto.data.synth import WorldConfig, generate_world, iter_records
from visto.data.synth.mixes import get_mix, record_qas
from visto.data.synth.prefixes import PromptMix, estimate_tokens, prose, schema_instructions
from visto.data.synth.vocab import COLOURS, SHAPES
from visto.quickstart import QuickstartConfig
from visto.train.recipe import load_recipe

LOC_BINS = 32


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prefixes") / "world"
    splits = {"train": 0.75, "val": 0.25, "test": 0.0, "heldout": 0.0}
    generate_world(WorldConfig(n=8, size=48, seed=3, max_objects=3, single_object_fraction=0.0,
                               splits=splits), root, workers=1)  # fmt: skip
    return root


def stage2_mix():
    return get_mix(load_recipe("quickstart-stage2", []).data.mix)


def test_the_quickstart_stage2_mix_carries_system_turns_and_instruction_lines(world):
    mix = stage2_mix()
    recipe = load_recipe("quickstart-stage2", [])
    assert mix.name == QuickstartConfig().stage2_mix and mix.prefixes is not None
    assert recipe.processor.max_length == QuickstartConfig().stage2_max_length == mix.prefixes.long_length
    assert recipe.data.shuffle_buffer == 1 and recipe.batch_size == mix.prefixes.block  # blocks are batches
    systems, users, samples = [], [], 0
    for epoch in range(60):
        for sample in mix.samples(world, "train", seed=0, epoch=epoch, loc_bins=LOC_BINS):
            samples += 1
            if sample.turns[0].role == "system":
                systems.append(sample.turns[0].content)
            users += [t.content for t in sample.turns if t.role == "user" and "\n\n" in t.content]
    assert 0.15 < len(systems) / samples < 0.45
    assert 0.1 < len(users) / samples < 0.35
    assert min(map(len, systems)) <= 40 and max(map(len, systems)) >= 900  # short and long
    assert any("JSON schema" in s for s in systems) and any("JSON schema" in u for u in users)


def test_long_texts_come_in_blocks_and_fit_their_lengths(world, tmp_path):
    # a block of `block` samples (a batch) is long or not as a whole, so few batches are wide
    mix = dataclasses.replace(stage2_mix(), prefixes=dataclasses.replace(stage2_mix().prefixes, block=2))
    blocks: dict = {}
    for epoch in range(40):
        for k, sample in enumerate(mix.samples(world, "train", seed=0, epoch=epoch, loc_bins=LOC_BINS)):
            text = sample.turns[0].content if sample.turns[0].role == "system" else ""
            text += "".join(t.content for t in sample.turns if t.role == "user" and "\n\n" in t.content)
            blocks.setdefault((epoch, k // 2), []).append(len(text) > 500)
    kinds = [tuple(v) for v in blocks.values() if len(v) == 2]
    assert (True, True) in kinds and (False, False) in kinds
    assert sum(v == (True, True) for v in kinds) / len(kinds) < 0.3
    assert all(v[0] == v[1] for v in kinds)
    # a long text stays within its estimated length (the quickstart's tokenizer: bench/README.md)
    prefixes = PromptMix()
    rng = random.Random(0)
    for _ in range(50):
        assert estimate_tokens(prefixes.long_text(rng), prefixes.prefix_ratio) <= prefixes.long_tokens * 1.1


def test_the_answers_and_questions_are_those_of_the_mix_without_prefixes(world):
    mix = stage2_mix()
    records = {r["id"]: r for r in iter_records(world, "train")}
    prefixed = 0
    for epoch in range(10):
        for sample in mix.samples(world, "train", seed=0, epoch=epoch, loc_bins=LOC_BINS):
            record = records[sample.id]
            turns = sample.turns[1:] if sample.turns[0].role == "system" else sample.turns
            assert [t.role for t in turns] == ["user", "assistant"] * (len(turns) // 2)
            assert turns[0].content.startswith("<image>\n") and sample.independent_turns
            asked = []
            for q, a in zip(turns[::2], turns[1::2], strict=True):
                text = q.content.removeprefix("<image>\n")
                prefixed += "\n\n" in text
                asked.append((text.rsplit("\n\n", 1)[-1], a.content))
            # the exchanges that fit (PromptMix.fit), each question with its own answer
            captions = [qa for qa in asked if qa[1] in record["tasks"]["captions"]]
            assert len(captions) <= 1 and asked
            assert set(asked) - set(captions) <= set(record_qas(record, LOC_BINS))
    assert prefixed


def test_prefix_texts_name_none_of_the_worlds_words_and_reach_their_lengths():
    rng = random.Random(0)
    mix = PromptMix()
    texts = [mix.short_text(rng) for _ in range(200)] + [mix.long_text(rng) for _ in range(100)]
    assert max(len(t) for t in texts) <= mix.long_tokens / mix.prefix_ratio
    texts += [schema_instructions(rng) for _ in range(30)]
    words = {w.lower() for w in (*COLOURS, *SHAPES)}
    for text in texts:
        said = {w.strip(".,:;\"'`{}[]()?!").lower() for w in text.split()}
        assert not said & words, text
    assert len(prose(rng, 1400)) >= 1400
