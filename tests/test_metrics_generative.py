"""evaluate_generative end to end on a small synthetic world, with generate functions whose
figures are known: one that answers with the reference (perfect), and known wrong ones."""

from __future__ import annotations

import math

import pytest

from visto.data.sample import Sample
from visto.data.synth import WorldConfig, generate_world, iter_samples
from visto.errors import UserError
from visto.eval import EvalResult
from visto.eval import metrics as M
from visto.eval.generative import evaluate_generative, evaluate_generative_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    cfg = WorldConfig(
        n=40, size=64, seed=3, splits={"train": 0.2, "val": 0.05, "test": 0.4, "heldout": 0.35}
    )
    generate_world(cfg, root, workers=1)
    return root


@pytest.fixture(scope="module")
def test_samples(world):
    return list(iter_samples(world, "test"))


def oracle_for(samples: list[Sample]):
    """A generate function that answers each prompt with its sample's reference answer
    (for captions: the first reference), checking what it is handed on the way."""
    # A caption item is asked with its image's first caption sample, so ids map directly.
    answers = {s.id: s.turns[-1].content for s in samples}
    batches: list[int] = []

    def generate(batch: list[Sample]) -> list[str]:
        batches.append(len(batch))
        out = []
        for s in batch:
            assert s.turns[-1].role == "user" and s.images, "prompts end with the user turn"
            s.normalized()
            out.append(answers[s.id])
        return out

    generate.batches = batches
    return generate


PERFECT = {
    "count.acc": 1.0, "pope.acc": 1.0, "pope.precision": 1.0, "pope.recall": 1.0, "pope.f1": 1.0,
    "ground.acc50": 1.0, "refdesc.acc": 1.0, "ocr.exact": 1.0, "ocr.cer": 0.0, "json.valid": 1.0,
    "json.field_acc": 1.0, "detect.precision": 1.0, "detect.recall": 1.0, "detect.f1": 1.0,
    "classify.acc": 1.0, "caption.bleu4": 1.0,
}  # fmt: skip


def test_reference_answers_score_perfectly(test_samples):
    generate = oracle_for(test_samples)
    metrics, records = evaluate_generative(generate, test_samples, batch_size=7)
    assert max(generate.batches) <= 7
    for name, value in PERFECT.items():
        assert metrics[name] == pytest.approx(value), name
    vqa_types = {s.truth["qtype"] for s in test_samples if s.truth["task"] == "vqa"}
    assert {"count", "colour", "exist"} <= vqa_types
    for qtype in vqa_types:
        assert metrics[f"vqa.{qtype}"] == 1.0
    assert metrics["vqa.overall"] == 1.0
    # The world's probes are balanced, so an unbiased model says yes half the time.
    assert metrics["pope.yes_ratio"] == pytest.approx(0.5)
    # CIDEr-D of one reference caption against all three is what cider_d says directly.
    caps: dict[str, list[str]] = {}
    for s in test_samples:
        if s.truth["task"] == "caption":
            caps.setdefault(s.truth["image_id"], []).append(s.turns[-1].content)
    hyps = [M.tokenize_caption(c[0]) for c in caps.values()]
    refs = [[M.tokenize_caption(r) for r in c] for c in caps.values()]
    assert metrics["caption.cider"] == pytest.approx(M.cider_d(hyps, refs)[0])
    assert metrics["caption.cider"] > 2.0
    # One record per question (captions: one per image), every score filled in.
    assert len(records) == sum(s.truth["task"] != "caption" for s in test_samples) + len(caps)
    assert all(r["score"] is not None for r in records)
    assert {r["task"] for r in records} == {
        "caption",
        "vqa",
        "ground",
        "refdesc",
        "ocr",
        "json",
        "classify",
    }


def test_empty_answers_have_known_figures(test_samples):
    metrics, _ = evaluate_generative(lambda batch: [""] * len(batch), test_samples)
    for name in ("vqa.overall", "count.acc", "ground.acc50", "refdesc.acc", "ocr.exact",
                 "json.valid", "json.field_acc", "detect.recall", "classify.acc", "caption.bleu4",
                 "caption.cider"):  # fmt: skip
        assert metrics[name] == pytest.approx(0.0, abs=1e-9), name
    assert metrics["ocr.cer"] == 1.0  # every reference character deleted
    # POPE reads an answer without "no"/"not" as yes: always yes on balanced probes.
    assert metrics["pope.yes_ratio"] == 1.0
    assert metrics["pope.acc"] == pytest.approx(0.5)
    assert metrics["pope.recall"] == 1.0 and metrics["pope.f1"] == pytest.approx(2 / 3)
    assert math.isnan(metrics["detect.precision"])  # nothing predicted: no precision


def test_always_no_scores_the_share_of_no_answers(test_samples):
    metrics, records = evaluate_generative(lambda batch: ["No."] * len(batch), test_samples)
    vqa = [s for s in test_samples if s.truth["task"] == "vqa"]
    for qtype in ("exist", "relation"):
        answers = [s.turns[-1].content for s in vqa if s.truth["qtype"] == qtype]
        assert metrics[f"vqa.{qtype}"] == pytest.approx(answers.count("no") / len(answers))
    assert metrics["pope.yes_ratio"] == 0.0 and metrics["pope.recall"] == 0.0
    assert math.isnan(metrics["pope.precision"])  # never said yes
    # "No." parses as the count 0: right exactly where the answer is "0".
    counts = [s for s in vqa if s.truth["qtype"] == "count"]
    assert metrics["count.acc"] == pytest.approx(
        sum(s.turns[-1].content == "0" for s in counts) / len(counts)
    )


def test_world_run_adds_heldout_figures(world):
    everything = list(iter_samples(world, "test")) + list(iter_samples(world, "heldout"))
    result = evaluate_generative_world(oracle_for(everything), world, n=5, batch_size=32)
    assert isinstance(result, EvalResult)
    assert result.metrics["vqa.overall"] == 1.0 and result.metrics["heldout.vqa.overall"] == 1.0
    assert result.metrics["heldout.ground.acc50"] == 1.0
    assert {p["split"] for p in result.predictions} == {"test", "heldout"}
    assert all(isinstance(v, float) for v in result.metrics.values())


def test_samples_without_task_truth_are_skipped():
    logged: list[str] = []
    metrics, records = evaluate_generative(
        lambda batch: ["x"] * len(batch), [Sample("a", [], [])], log=logged.append
    )
    assert metrics == {} and records == [] and "skipped 1" in logged[0]


def test_reportable_metrics_counts_never_yes_pope_as_zero_on_both_splits():
    from visto.eval.generative import reportable_metrics

    nan = float("nan")
    metrics = {"pope.f1": nan, "pope.precision": nan, "heldout.pope.f1": nan, "pope.recall": nan,
               "vqa.overall": 0.1234567}  # fmt: skip
    assert reportable_metrics(metrics) == {
        "heldout.pope.f1": 0.0, "pope.f1": 0.0, "pope.precision": 0.0, "vqa.overall": 0.123457,
    }  # fmt: skip


# ----------------------------------------------------------------------------- blind twins


def looking_oracle(samples: list[Sample]):
    """A generate function that answers from the image it is shown: the reference answer of
    that image's question (so a swapped image gets the other image's answer, and a blank
    one gets nothing). The perfect seeing model, whose blind twin must fall."""
    image_of = {s.images[0].tobytes(): s.truth["image_id"] for s in samples}  # by its pixels
    answers = {(s.truth["image_id"], s.turns[-2].content): s.turns[-1].content for s in samples}

    def generate(batch: list[Sample]) -> list[str]:
        seen = [image_of.get(s.images[0].tobytes()) for s in batch]
        return [answers.get((k, s.turns[-1].content), "") for k, s in zip(seen, batch, strict=True)]

    return generate


def test_derangement_moves_every_index_and_is_seeded():
    from visto.eval.generative import derangement

    for n in range(2, 40):
        order = derangement(n, seed=n)
        assert sorted(order) == list(range(n)) and all(order[i] != i for i in range(n))
    assert derangement(50, 0) == derangement(50, 0) != derangement(50, 1)
    with pytest.raises(UserError, match="at least 2 images"):
        derangement(1)


def test_blind_prompts_swap_images_for_another_of_the_set_or_blank(test_samples):
    from visto.eval.generative import blind_prompts, image_key

    prompts = [s for s in test_samples if s.truth["task"] == "vqa"]
    hidden, shown = blind_prompts(prompts, "swap", seed=0)
    assert [p.turns for p in hidden] == [p.turns for p in prompts]  # same questions
    partner: dict[str, str] = {}
    for p, h, key in zip(prompts, hidden, shown, strict=True):
        assert key != image_key(p) and h.images[0] is not p.images[0]
        assert partner.setdefault(image_key(p), key) == key  # one partner per image
    assert sorted(partner.values()) == sorted(partner)  # a permutation of the images
    assert blind_prompts(prompts, "swap", seed=0)[1] == shown  # seeded
    blank, shown = blind_prompts(prompts[:3], "blank")
    assert shown == ["blank"] * 3
    assert all(b.images[0].size == p.images[0].size for b, p in zip(blank, prompts, strict=False))
    assert blank[0].images[0].getcolors() == [(64 * 64, (128, 128, 128))]  # one grey
    with pytest.raises(UserError, match="blind mode"):
        blind_prompts(prompts, "closed-eyes")


def test_a_looking_model_loses_its_figures_blind_and_a_prior_does_not(test_samples):
    from visto.eval.generative import with_gains

    metrics, records = evaluate_generative(
        looking_oracle(test_samples), test_samples, blind="swap", seed=0
    )
    assert metrics["vqa.overall"] == 1.0 and metrics["ground.acc50"] == 1.0
    assert metrics["blind.vqa.overall"] < 0.8 and metrics["blind.ground.acc50"] < 0.5
    gains = with_gains(metrics)
    assert gains["gain.vqa.overall"] == pytest.approx(1.0 - metrics["blind.vqa.overall"])
    assert set(gains) == set(metrics) | {"gain." + k[6:] for k in metrics if k.startswith("blind.")}
    assert all(r["blind_image"] != r["id"].split("-")[0] for r in records)
    assert all("blind_prediction" in r and "blind_score" in r for r in records)
    # The same answers whatever the image (a prior): the blind twin scores the same.
    # It answers by the sample's id, which no model sees: its answers are no function of the
    # images and turns, so none is reused for the same image and question (reuse=False).
    prior = oracle_for(test_samples)  # answers by question id, never looks
    metrics, _ = evaluate_generative(prior, test_samples, blind="swap", reuse=False)
    assert metrics["blind.vqa.overall"] == metrics["vqa.overall"] == 1.0
    blank, _ = evaluate_generative(looking_oracle(test_samples), test_samples, blind="blank")
    assert blank["blind.vqa.overall"] == 0.0  # nothing to read off a grey image


def test_json_is_scored_as_the_model_wrote_it_and_again_under_the_grammar(test_samples):
    json_samples = [s for s in test_samples if s.truth["task"] == "json"]
    reference = {s.id: s.turns[-1].content for s in json_samples}
    # The model's own JSON is cut short; the grammar-constrained pass gets the reference.
    own = lambda batch: [reference[s.id][:-5] for s in batch]  # noqa: E731
    constrained = lambda batch: [reference[s.id] for s in batch]  # noqa: E731
    logged: list[str] = []
    metrics, records = evaluate_generative(
        own, json_samples, constrained_generate=constrained, log=logged.append
    )
    assert metrics["json.valid"] == 0.0 and metrics["json.field_acc"] == 0.0
    assert metrics["json.constrained.valid"] == 1.0 and metrics["json.constrained.field_acc"] == 1.0
    assert all(r["constrained_score"] == 1.0 and r["score"] == 0.0 for r in records)
    assert [m.split()[1] for m in logged] == [str(len(json_samples))] * 2  # two passes
    metrics, records = evaluate_generative(own, json_samples)  # no grammar: no such figures
    assert "json.constrained.valid" not in metrics and "constrained_prediction" not in records[0]


def test_world_run_has_a_blind_twin_by_default_and_blank_for_one_image(world):
    everything = list(iter_samples(world, "test")) + list(iter_samples(world, "heldout"))
    result = evaluate_generative_world(looking_oracle(everything), world, n=5, tasks=["vqa"])
    assert result.metrics["vqa.overall"] == 1.0 and result.metrics["heldout.vqa.overall"] == 1.0
    assert result.metrics["blind.vqa.overall"] < 1.0
    assert result.metrics["blind.heldout.vqa.overall"] < 1.0
    assert any("another image of the same split" in n for n in result.notes)
    one = evaluate_generative_world(looking_oracle(everything), world, n=1, tasks=["vqa"])
    assert any("blank grey image" in n for n in one.notes)  # nothing to swap with
    assert one.metrics["blind.vqa.overall"] == 0.0
    off = evaluate_generative_world(
        looking_oracle(everything), world, n=2, tasks=["vqa"], blind=None
    )
    assert not any(k.startswith("blind.") for k in off.metrics)
    with pytest.raises(UserError, match="blind mode"):
        evaluate_generative_world(looking_oracle(everything), world, n=2, blind="peek")


def test_reportable_metrics_adds_gains_and_zeroes_the_blind_never_yes_pope():
    from visto.eval.generative import reportable_metrics

    nan = float("nan")
    metrics = {"pope.f1": 0.8, "blind.pope.f1": nan, "vqa.overall": 0.9, "blind.vqa.overall": 0.4,
               "blind.heldout.vqa.overall": 0.5, "heldout.vqa.overall": 0.75}  # fmt: skip
    assert reportable_metrics(metrics) == {
        "blind.heldout.vqa.overall": 0.5, "blind.pope.f1": 0.0, "blind.vqa.overall": 0.4,
        "gain.heldout.vqa.overall": 0.25, "gain.pope.f1": 0.8, "gain.vqa.overall": 0.5,
        "heldout.vqa.overall": 0.75, "pope.f1": 0.8, "vqa.overall": 0.9,
    }  # fmt: skip
