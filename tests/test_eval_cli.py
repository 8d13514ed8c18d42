"""`visto eval` end to end: a tiny CLIP trained through the real loop, then evaluated."""

from __future__ import annotations

import json
import re

import pytest

from visto.cli import main
from visto.commands.eval import resolve_templates
from visto.config import to_dict
from visto.data.synth import WorldConfig, generate_world
from visto.errors import UserError
from visto.eval import evaluator_for
from visto.tasks.classify import TEMPLATE_SETS


def test_resolve_templates():
    assert resolve_templates(None) == TEMPLATE_SETS["ensemble"]
    both = resolve_templates(["single", "a drawing of a {}."])
    assert both == ("a photo of a {}.", "a drawing of a {}.")
    with pytest.raises(UserError, match="exactly one"):
        resolve_templates(["no slot"])


def test_unknown_family_is_a_user_error():
    with pytest.raises(UserError, match="no evaluation for model family"):
        evaluator_for("no-such-family")
    kind, evaluate = evaluator_for("clip")
    assert kind == "two_tower" and callable(evaluate)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from visto.models.clip import CLIPConfig
    from visto.train.loop import train
    from visto.train.recipe import recipe_from_dict

    root = tmp_path_factory.mktemp("evalcli")
    world = root / "world"
    generate_world(
        WorldConfig(
            n=60,
            seed=1,
            size=48,
            single_object_fraction=0.5,
            splits={"train": 0.6, "val": 0.05, "test": 0.2, "heldout": 0.15},
        ),
        world,
    )
    recipe = recipe_from_dict(
        {
            "name": "clip-eval-test",
            "model": {"family": "clip", "config": to_dict(CLIPConfig.preset("tiny"))},
            "processor": {
                "config": {"image_size": 32, "resize_mode": "resize", "vocab_size": 400},
            },
            "data": {"source": str(world), "tasks": ["caption"]},
            "optim": {"lr": 3e-3},
            "batch_size": 8,
            "max_steps": 6,
            "log_every": 2,
            "eval_every": 3,
            "eval_batches": 1,
            "num_threads": 1,
        }
    )
    run = root / "run"
    train(recipe, run, show_progress=False)
    return world, run


@pytest.mark.slow
def test_visto_eval_writes_eval_json_and_report(trained_run, capsys):
    world, run = trained_run
    code = main(["eval", "--model", str(run / "checkpoint"), "--data", str(world), "--paraphrase"])
    assert code == 0
    # --out defaults to the run directory the checkpoint sits in.
    metrics = json.loads((run / "eval.json").read_text())
    for prefix in ("", "heldout."):
        for name in ("zeroshot.shape", "zeroshot.colour", "zeroshot.class",
                     "paraphrase.zeroshot.class", "retrieval.t2i.r1", "retrieval.t2i.r5",
                     "retrieval.t2i.r10", "retrieval.i2t.r1", "retrieval.i2t.r10",
                     "cluster.purity", "cluster.nmi"):  # fmt: skip
            assert isinstance(metrics[prefix + name], float), prefix + name
            assert 0.0 <= metrics[prefix + name] <= 1.0
    report = (run / "report.md").read_text()
    pngs = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert {"zeroshot.png", "curve.png"} <= set(pngs)
    assert all((run / p).is_file() for p in pngs)
    assert "With paraphrased prompts" in report
    out = capsys.readouterr().out
    assert "zeroshot.colour" in out and "eval.json" in out


@pytest.mark.slow
def test_visto_eval_out_and_bad_input(trained_run, tmp_path, capsys):
    world, run = trained_run
    out = tmp_path / "ev"
    args = ["eval", "--model", str(run / "checkpoint"), "--data", str(world)]
    assert main([*args, "--out", str(out), "--n", "5", "--templates", "single"]) == 0
    metrics = json.loads((out / "eval.json").read_text())
    assert "zeroshot.shape" in metrics and "paraphrase.zeroshot.shape" not in metrics
    assert (out / "curve.png").is_file()  # the curve still comes from the checkpoint's run
    assert main([*args, "--out", str(out), "--templates", "nonsense"]) == 2
    assert main(["eval", "--model", str(tmp_path / "missing"), "--data", str(world)]) == 2
    assert main([*args, "--out", str(out), "--split", "nope"]) == 2
    err = capsys.readouterr().err
    assert "neither a template set" in err and "unknown split" in err
