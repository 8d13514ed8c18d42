"""How the generative eval asks its questions: short answers batched apart from long (JSON)
ones, by task, the answers back in the questions' order; and a prompt with the same images
and turns as one already asked (the blind twin's, mostly) not asked again, with the figures
and records of asking everything."""

from __future__ import annotations

import hashlib

import pytest

from visto.data.synth import WorldConfig, generate_world, iter_samples
from visto.eval.generative import (
    LONG_ANSWER_TASKS,
    Answered,
    batch_order,
    build_items,
    evaluate_generative,
    generate_grouped,
)


@pytest.fixture(scope="module")
def test_samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    cfg = WorldConfig(n=30, size=64, seed=5, splits={"train": 0.2, "val": 0.1, "test": 0.7, "heldout": 0.0})
    generate_world(cfg, root, workers=1)
    return list(iter_samples(root, "test", limit=8))


def seeing_model(samples):
    """Answers from what it is shown: the reference of the shown image's question where that
    image was asked it, else a digest of pixels and question (a function of images and turns
    alone, as a greedy model is). Records every batch it is handed."""
    image_of = {s.images[0].tobytes(): s.truth["image_id"] for s in samples}
    answers = {(s.truth["image_id"], s.turns[-2].content): s.turns[-1].content for s in samples}
    batches: list[list] = []

    def generate(batch):
        batches.append(list(batch))
        out = []
        for s in batch:
            image = s.images[0].tobytes()
            known = answers.get((image_of.get(image), s.turns[-1].content))
            out.append(known if known is not None else
                       hashlib.sha1(image + s.turns[-1].content.encode()).hexdigest()[:8])  # fmt: skip
        return out

    generate.batches = batches
    return generate


def test_short_and_long_answers_are_batched_apart_and_come_back_in_order(test_samples):
    items, _ = build_items(test_samples)
    groups = batch_order(items)
    assert sorted(k for g in groups for k in g) == list(range(len(items)))
    assert len(groups) == 2 and all(items[k].task in LONG_ANSWER_TASKS for k in groups[1])
    assert all(items[k].task not in LONG_ANSWER_TASKS for k in groups[0])
    keys = [(items[k].task, items[k].qtype or "") for k in groups[0]]
    assert keys == sorted(keys)  # by task and question type, file order within one
    generate = seeing_model(test_samples)
    metrics, records = evaluate_generative(generate, test_samples, batch_size=16, reuse=False)
    for batch in generate.batches:  # no batch mixes a JSON question with short answers
        assert len({s.truth["task"] in LONG_ANSWER_TASKS for s in batch}) == 1
        assert len(batch) <= 16
    assert metrics["vqa.overall"] == 1.0 and metrics["json.field_acc"] == 1.0
    assert [r["prediction"] for r in records] == [it.references[0] for it in items]
    # a subset of indices: answers keyed by index
    prompts = [it.prompt for it in items]
    got = generate_grouped(seeing_model(test_samples), prompts, [[5, 1], [3]], 2)
    assert got == {5: items[5].references[0], 1: items[1].references[0], 3: items[3].references[0]}


@pytest.mark.parametrize("blind", ["swap", "blank"])
def test_the_blind_twin_reuses_answers_to_the_same_image_and_question(test_samples, blind):
    json_model = seeing_model(test_samples)
    logged: list[str] = []
    constrained = seeing_model(test_samples)
    metrics, records = evaluate_generative(json_model, test_samples, blind=blind, batch_size=16,
                                           constrained_generate=constrained, log=logged.append)  # fmt: skip
    plain, plain_constrained = seeing_model(test_samples), seeing_model(test_samples)
    metrics0, records0 = evaluate_generative(plain, test_samples, blind=blind, batch_size=16,
                                             constrained_generate=plain_constrained, reuse=False)  # fmt: skip
    assert metrics == metrics0 and records == records0  # the same figures and answers
    items, _ = build_items(test_samples)
    n_json = sum(it.task == "json" for it in items)
    asked = sum(len(b) for b in json_model.batches)
    assert sum(len(b) for b in plain.batches) == 2 * len(items)
    # The seeing pass asks everything; the blind twin only what the image it shows was not
    # asked: with swapped images, each JSON question in the phrasing the shown image had; with
    # a blank one, each phrasing once (the same grey image and turns for all).
    phrasings = {it.prompt.turns[-1].content for it in items if it.task == "json"}
    assert len(phrasings) > 1
    assert len(items) < asked < 2 * len(items)
    asked_constrained = sum(len(b) for b in constrained.batches)
    if blind == "swap":
        assert n_json < asked_constrained < 2 * n_json
    else:
        assert asked_constrained == n_json + len(phrasings)
    blind_logs = [m for m in logged if "hidden" in m]
    assert blind_logs and all("asked before: the same images and turns" in m for m in blind_logs)
    assert int(blind_logs[0].split()[1]) == asked - len(items)  # the count a progress bar reads


def test_answered_keys_on_pixels_and_turns_not_on_ids(test_samples):
    import dataclasses

    from PIL import Image

    answered = Answered()
    s = test_samples[0]
    same = dataclasses.replace(s, id="other", truth={}, images=[s.images[0].copy()])
    assert answered.key(s, "own") == answered.key(same, "own") != answered.key(s, "constrained")
    moved = dataclasses.replace(s, images=[Image.new(s.images[0].mode, s.images[0].size)])
    assert answered.key(moved, "own") != answered.key(s, "own")
    asked = dataclasses.replace(s, turns=s.turns[:-1] + [dataclasses.replace(s.turns[-1], content="Other?")])
    assert answered.key(asked, "own") != answered.key(s, "own")
