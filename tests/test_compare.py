"""visto compare: the winner and table logic on hand-made metrics, the config's checks."""

import json
import math

import pytest

from visto.compare import (
    CompareConfig,
    markdown_tables,
    parameter_counts,
    plot_accuracy_curves,
    task_rows,
    winner,
)
from visto.errors import UserError


def test_winner_higher_lower_tie_and_missing():
    assert winner({"a": 0.5, "b": 0.75, "c": 0.25}) == ("b", 0.25)
    assert winner({"a": 0.5, "b": 0.75}, higher_is_better=False) == ("a", 0.25)
    assert winner({"a": 0.5, "b": 0.5}) == ("tie", 0.0)
    best, margin = winner({"a": 0.3, "b": math.nan})
    assert best == "a" and math.isnan(margin)
    best, margin = winner({})
    assert best is None and math.isnan(margin)


METRICS = {
    "llava": {"vqa.overall": 0.9, "vqa.colour": 1.0, "vqa.count": 0.8, "ocr.cer": 0.10,
              "heldout.vqa.overall": 0.7, "caption.cider": 1.2},
    "fuyu": {"vqa.overall": 0.6, "vqa.colour": 0.5, "vqa.count": 0.9, "ocr.cer": 0.05,
             "heldout.vqa.overall": 0.75},
}  # fmt: skip


def test_task_rows_order_winners_and_splits():
    rows = task_rows(METRICS)
    keys = [r["key"] for r in rows]
    # overall first, then the VQA types found, then the fixed tasks; held-out after the test rows
    assert keys == ["vqa.overall", "vqa.colour", "vqa.count", "ocr.cer", "caption.cider",
                    "heldout.vqa.overall"]  # fmt: skip
    by = {r["key"]: r for r in rows}
    assert by["vqa.overall"]["winner"] == "llava" and by["vqa.overall"]["margin"] == pytest.approx(0.3)
    assert by["vqa.count"]["winner"] == "fuyu"
    assert by["ocr.cer"]["winner"] == "fuyu" and not by["ocr.cer"]["higher_is_better"]
    assert by["heldout.vqa.overall"]["split"] == "held-out"
    assert by["heldout.vqa.overall"]["winner"] == "fuyu"
    # a figure only one family has: that family, no margin
    assert by["caption.cider"]["winner"] == "llava" and math.isnan(by["caption.cider"]["margin"])


def summary(**kw):
    base = {"parameters": 5_300_000, "trained_parameters": 4_500_000, "visual_tokens": 64,
            "budget_minutes": 2.0, "steps": 40, "samples_per_s": 12.5, "ttft_ms": 30.0,
            "decode_tokens_per_s": 150.0, "takes_shared_vision": True}  # fmt: skip
    return {**base, **kw}


def test_markdown_tables_bold_winner_and_cost_rows():
    rows = task_rows(METRICS)
    lines = markdown_tables(["llava", "fuyu"], rows, {"llava": summary(), "fuyu": summary(visual_tokens=72)})
    text = "\n".join(lines)
    assert "| VQA overall | **0.900** | 0.600 | llava | 0.300 |" in text
    assert "| OCR character error rate (lower is better) | 0.100 | **0.050** | fuyu | 0.050 |" in text
    assert "### Held-out colour-shape combinations" in text
    assert "| visual tokens per image | 64 | 72 |" in text
    assert "| parameters (total) | 5.30M | 5.30M |" in text
    assert "| caption CIDEr | **1.200** | – | llava | – |" in text


def test_blind_twins_stand_beside_each_family_and_do_not_decide_the_winner():
    metrics = {
        "llava": {"vqa.overall": 0.9, "blind.vqa.overall": 0.3, "json.valid": 0.5,
                  "json.constrained.valid": 1.0},
        "fuyu": {"vqa.overall": 0.6, "blind.vqa.overall": 0.95},
    }  # fmt: skip
    rows = {r["key"]: r for r in task_rows(metrics)}
    assert rows["vqa.overall"]["blind"] == {"llava": 0.3, "fuyu": 0.95}
    assert rows["vqa.overall"]["winner"] == "llava"  # on what the families see
    assert list(rows) == ["vqa.overall", "json.valid", "json.constrained.valid"]
    text = "\n".join(markdown_tables(["llava", "fuyu"], list(rows.values()),
                                     {"llava": summary(), "fuyu": summary()}))  # fmt: skip
    assert "| task | llava | llava blind | fuyu | fuyu blind | winner | by |" in text
    assert "| VQA overall | **0.900** | 0.300 | 0.600 | 0.950 | llava | 0.300 |" in text
    assert "| JSON valid (own decoding) | **0.500** | – | – | – | llava | – |" in text
    assert "| JSON valid under the grammar | **1.000** | – | – | – | llava | – |" in text


def test_plot_one_line_per_family(tmp_path):
    summaries = {
        "llava": summary(probe_curve=[{"step": 20, "minutes": 0.5, "vqa": 0.3}, {"step": 40, "minutes": 1.0, "vqa": 0.6}]),
        "fuyu": summary(probe_curve=[{"step": 28, "minutes": 0.5, "vqa": 0.2}]),
    }
    path = plot_accuracy_curves(summaries, tmp_path / "plots" / "acc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parameter_counts_follow_module_lrs():
    from torch import nn

    model = nn.ModuleDict({"vision_tower": nn.Linear(4, 4), "head": nn.Linear(4, 2)})
    total, trained = parameter_counts(model, {"vision_tower": 0.0}, 1e-3)
    assert (total, trained) == (20 + 10, 10)


def test_config_rejects_bad_settings(tmp_path):
    with pytest.raises(UserError, match="unknown family 'nope'"):
        CompareConfig(families=["llava", "nope"]).validate()
    with pytest.raises(UserError, match="twice"):
        CompareConfig(families=["llava", "llava"]).validate()
    with pytest.raises(UserError, match="unknown task"):
        CompareConfig(tasks=["vqa", "poetry"]).validate()
    with pytest.raises(UserError, match="minutes must be positive"):
        CompareConfig(minutes=0).validate()
    with pytest.raises(UserError, match="--steps must be at least 1"):
        CompareConfig(steps=0).validate()
    with pytest.raises(UserError, match="--vision-steps must be at least 1"):
        CompareConfig(vision_steps=0).validate()
    with pytest.raises(UserError, match="not a synthetic world"):
        CompareConfig(data=str(tmp_path)).validate()
    # clip has no compare recipe: it is not generative
    with pytest.raises(UserError, match="no compare-clip.json"):
        CompareConfig(families=["clip"]).validate()


def test_family_budgets_are_steps_with_the_tower_credited_at_each_family_pace():
    from visto.compare import (
        FAMILY_REFERENCE_MINUTES,
        VISION_STEPS_PER_REFERENCE_MINUTE,
        family_budget,
    )

    cfg = CompareConfig(vision_steps=2 * VISION_STEPS_PER_REFERENCE_MINUTE)  # 2 reference minutes
    assert family_budget(cfg, 400, takes_tower=True) == (400, FAMILY_REFERENCE_MINUTES)
    # 400 steps in 8 minutes: 50 a minute, so 2 minutes of tower time are 100 more steps
    assert family_budget(cfg, 400, takes_tower=False) == (500, FAMILY_REFERENCE_MINUTES + 2)
    no_credit = CompareConfig(vision_steps=cfg.vision_steps, credit_vision_time=False)
    assert family_budget(no_credit, 400, takes_tower=False) == (400, FAMILY_REFERENCE_MINUTES)
    # --steps holds every family to one count; the credit keeps its reference pace
    fixed = CompareConfig(steps=40, vision_steps=cfg.vision_steps)
    assert family_budget(fixed, 400, takes_tower=True)[0] == 40
    assert family_budget(fixed, 400, takes_tower=False)[0] == 140


def test_every_compare_recipe_builds_its_family():
    """The recipes load, name their family, and freeze only prefixes the model has."""
    from visto.compare import DEFAULT_FAMILIES
    from visto.train.recipe import load_recipe

    for family in DEFAULT_FAMILIES:
        recipe = load_recipe(f"compare-{family}")
        assert recipe.model.family == family
        cfg = recipe.model.config
        assert cfg["processor"]["image_size"] == 128 and recipe.batch_size == 16
        # A step budget (8 reference minutes), no clock: the same seed, the same model anywhere.
        assert recipe.max_steps < 10_000 and recipe.max_minutes is None
        assert recipe.data.mix == "instruct+caption"
        assert json.dumps(cfg)  # plain JSON settings


def test_training_rate_weights_windows_by_their_samples():
    from visto.compare import training_rate

    rows = [{"step": 5, "samples_per_s": 10.0}, {"step": 10, "samples_per_s": 40.0}]
    # 80 samples in 8 s, then 80 in 2 s: 160 / 10
    assert training_rate(rows, 16) == pytest.approx(16.0)
    assert math.isnan(training_rate([], 16))
