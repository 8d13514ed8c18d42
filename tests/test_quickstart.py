"""The quickstart pipeline: its data helpers (fast) and the whole run on a tiny budget (slow)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import visto
from visto.connectors.script import world_boxes
from visto.data.synth import iter_records
from visto.data.synth.mixes import record_qas
from visto.data.synth.vocab import SHAPES as SHAPE_NAMES
from visto.data.tokenizer import boxes_to_loc, parse_boxes
from visto.errors import UserError
from visto.quickstart import QuickstartConfig, run_quickstart
from visto.train.dense import CHARS, record_targets


def _record() -> dict:
    # Two objects on a 64 px image (8 px patches -> 8x8 grid) and one word.
    objects = [
        {"shape": "square", "colour": "red", "size": "large", "box": [0, 0, 32, 32]},
        {"shape": "star", "colour": "blue", "size": "small", "box": [40, 40, 56, 56]},
    ]
    texts = [{"text": "CAT", "box": [8, 48, 32, 56]}]
    truth = {"width": 64, "height": 64, "objects": objects, "texts": texts}
    return {"truth": truth}


def test_dense_targets_follow_the_mask_boxes_and_text():
    record = _record()
    mask = np.zeros((64, 64), np.uint8)
    mask[0:32, 0:32] = 1
    mask[40:56, 40:56] = 2
    t = record_targets(record, mask, grid=8)
    shape = t["shape"].reshape(8, 8)
    assert (shape[:4, :4] == 1 + SHAPE_NAMES.index("square")).all()
    assert (shape[5:7, 5:7] == 1 + SHAPE_NAMES.index("star")).all()
    assert shape[7, 0] == 0 and shape[0, 7] == 0  # background
    # Centres: (16, 16) -> patch (2, 2); (48, 48) -> patch (6, 6); boxes as fractions there.
    assert set(np.flatnonzero(t["centre"])) == {2 * 8 + 2, 6 * 8 + 6}
    assert np.allclose(t["box"][2 * 8 + 2], [0, 0, 0.5, 0.5])
    # The per-class centre map names each centre's shape and nothing else.
    classed = {k: SHAPE_NAMES[v - 1] for k, v in enumerate(t["centre_shape"]) if v}
    assert classed == {2 * 8 + 2: "square", 6 * 8 + 6: "star"}
    # "CAT" spans x 8..32 on row 6 (y 48..56), 8 px a letter: patches (6, 1..3) read C, A, T
    # at both quarter points.
    read = ["".join(CHARS[k - 1] for k in t["chars"][6 * 8 + col]) for col in (1, 2, 3)]
    assert read == ["CC", "AA", "TT"]
    assert t["chars"][0].tolist() == [0, 0]


def test_boxes_become_location_tokens_outside_json_only():
    text = "Where? [100, 200, 300, 999]"
    loc = boxes_to_loc(text, 100)
    assert loc == "Where? <loc_10><loc_20><loc_30><loc_99>"
    assert parse_boxes(loc, 100) == [[104, 204, 304, 994]]  # the middle of each bin
    record = {
        "tasks": {
            "vqa": [{"q": "How many?", "a": "2"}],
            "ground": [{"q": "Find the star.", "a": "[1, 2, 3, 4]"}],
            "refdesc": [{"q": "What is at [1, 2, 3, 4]?", "a": "a red star"}],
            "ocr": None,
            "json": {"q": "JSON?", "a": '{"objects":[{"box":[1,2,3,4]}]}'},
        }
    }
    qas = dict(record_qas(record, 100))
    assert qas["Find the star."] == "<loc_0><loc_0><loc_0><loc_0>"
    assert "What is at <loc_0><loc_0><loc_0><loc_0>?" in qas
    assert json.loads(qas["JSON?"])["objects"][0]["box"] == [1, 2, 3, 4]


def test_json_grammar_accepts_the_worlds_answers_and_nothing_after_them():
    pytest.importorskip("xgrammar")
    import torch

    from visto.data.synth import WorldConfig, make_image
    from visto.data.tokenizer import train_tokenizer
    from visto.infer.constrain import Grammars
    from visto.tasks.runner import world_json_schema

    records = [make_image(WorldConfig(n=32, size=64), i, "train")[2] for i in range(32)]
    answers = [r["tasks"]["json"]["a"] for r in records]
    tok = train_tokenizer(answers * 4, 500, loc_bins=10)
    grammars = Grammars(tok, tok.vocab_size, [tok.end_id])
    compiled = grammars.compile_json(world_json_schema())
    for answer in answers:
        constraint, generated = grammars.constraint(compiled), []
        for token in tok.encode(answer):
            logits = constraint(generated, torch.zeros(tok.vocab_size))
            assert logits[token] == 0, f"{tok.decode([token])!r} refused in {answer}"
            generated.append(token)
        allowed = torch.isfinite(constraint(generated, torch.zeros(tok.vocab_size)))
        assert allowed.nonzero().flatten().tolist() == [tok.end_id]


def card_section(checkpoint: Path, title: str) -> dict:
    """A section of a checkpoint's README.md card: a JSON block, or a name | value table."""
    body = (checkpoint / "README.md").read_text().split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    if "```json" in body:
        return json.loads(body.split("```json\n", 1)[1].split("```", 1)[0])
    rows = [line.strip("|").split("|") for line in body.splitlines() if line.startswith("| ")]
    return {k.strip(): json.loads(v) for k, v in rows[1:]}


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_reuses_stages(tmp_path: Path):
    cfg = QuickstartConfig(
        vision_steps=20, box_tokens=True, text_slots=2, read_slots=4, reader_steps=5, stage1_steps=6, stage2_steps=4, n=120, size=64, workers=1, threads=1,
        vision_width=32, vision_layers=1, decoder_width=64, decoder_layers=1, vocab_size=600,
        max_length=320, vision_batch=16, stage1_batch=8, stage2_batch=4, eval_images=6,
        eval_batch=32, json_max_tokens=96,
    )  # fmt: skip
    run = tmp_path / "qs"
    result = run_quickstart(cfg, run)
    # The step budgets are what ran, and every stage's record says which data it read.
    for stage, steps in (("vision", 20), ("stage1", 6), ("stage2", 4)):
        done = json.loads((run / stage / "done.json").read_text())
        assert (done["steps"], done["budget_steps"], done["steps_cut"]) == (steps, steps, 0), stage
    done = json.loads((run / "stage2" / "done.json").read_text())
    assert done["data"]["name"] == "instruct+caption+prefixes" and done["data"]["independent_turns"] is True
    data = card_section(run / "checkpoint", "data")["mix"]
    assert (data["name"], data["independent_turns"]) == ("instruct+caption+prefixes", True)
    assert data["tasks"] == ["vqa", "ground", "refdesc", "ocr", "json", "caption"]
    assert card_section(run / "stage1" / "checkpoint", "data")["mix"]["name"] == "look+copy"
    # Stage 2's JSON answers write the boxes the frozen detector finds (copy_json's script
    # boxes): one row per training image, and the card names the file.
    boxes = [json.loads(line) for line in (run / "stage2-boxes" / "train.jsonl").read_text().splitlines()]
    assert [b["id"] for b in boxes] == [r["id"] for r in iter_records(run / "world", "train")]
    assert all(0 <= v <= 999 for b in boxes for box in b["boxes"] for v in box)
    assert card_section(run / "checkpoint", "data")["json_boxes"] == str(run / "stage2-boxes" / "train.jsonl")
    first = next(iter_records(run / "world", "train"))
    model = visto.load(run / "stage1" / "checkpoint")
    pixels, _ = model.processor.pixel_values([Image.open(run / "world" / first["image"])])
    with torch.no_grad():
        objects = model.multi_modal_projector.objects(model.patch_features(pixels),
                                                      model.language_model.model.embed_tokens)  # fmt: skip
    assert boxes[0]["boxes"] == world_boxes(objects.boxes[0], objects.present[0])
    report = (run / "report.md").read_text()
    assert "training budget in steps: vision 20, stage1 6, stage2 4 (no time cap)" in report
    for name in ("config.json", "eval.json", "report.md", "metrics.jsonl", "predictions.jsonl",
                 "plots/curves.png", "plots/figures.png", "checkpoint/model.safetensors",
                 "checkpoint/tokenizer.json", "world/show.png", "vision/checkpoint/config.json",
                 "stage1/report.md", "stage2/report.md"):  # fmt: skip
        assert (run / name).is_file(), name
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics == result.metrics
    for key in ("vqa.overall", "count.acc", "ground.acc50", "ocr.exact", "pope.f1", "json.valid",
                "json.field_acc", "json.constrained.valid", "json.constrained.field_acc"):  # fmt: skip
        assert 0.0 <= metrics[key] <= 1.0, key
        assert 0.0 <= metrics["heldout." + key] <= 1.0, key
        # The blind twin (images swapped within the split) and the gain from looking.
        assert 0.0 <= metrics["blind." + key] <= 1.0, key
        assert 0.0 <= metrics["blind.heldout." + key] <= 1.0, key
        gain = metrics[key] - metrics["blind." + key]
        assert metrics["gain." + key] == pytest.approx(gain, abs=2e-6), key
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"vision", "stage1", "stage2"}
    # The default connector is object tokens, detected by the dense heads of the vision
    # stage: the final model holds those very heads (frozen through both LLaVA stages).
    from safetensors.torch import load_file

    final, vision = (load_file(run / d / "model.safetensors") for d in ("checkpoint", "vision/checkpoint"))
    heads = [k for k in final if k.startswith("multi_modal_projector.heads.")]
    assert heads and all(torch.equal(final[k], vision[k]) for k in heads)
    assert json.loads((run / "checkpoint" / "config.json").read_text())["config"]["projector"]["kind"] == "regions"
    assert "VQA overall" in (run / "report.md").read_text()
    assert "| figure | test | blind | gain | held-out pairs |" in (run / "report.md").read_text()
    assert json.loads((run / "eval_done.json").read_text())["settings"]["blind"] == "swap"
    assert set(result.seconds) == {"data", "vision", "stage1", "stage2", "eval"}

    # A second run with the same settings reuses every stage; a new eval setting reruns eval only.
    stamp = (run / "stage2" / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    again = run_quickstart(cfg, run)
    assert again.metrics == metrics
    assert (run / "stage2" / "checkpoint" / "model.safetensors").stat().st_mtime_ns == stamp
    cfg.eval_images = 3
    run_quickstart(cfg, run)
    assert (run / "stage2" / "checkpoint" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((run / "eval_done.json").read_text())["settings"]["eval_images"] == 3


@pytest.mark.slow
def test_a_minutes_cap_that_cuts_says_how_many_steps(tmp_path: Path):
    from rich.console import Console

    cfg = QuickstartConfig(
        vision_steps=100_000, stage1_steps=100_000, minutes=0.02, n=60, size=64, workers=1,
        threads=1, vision_width=32, vision_layers=1, decoder_width=64, decoder_layers=1,
        vocab_size=600, max_length=320, vision_batch=16, stage1_batch=8,
    )  # fmt: skip
    console = Console(record=True, width=200)
    run_quickstart(cfg, tmp_path / "qs", console=console, until="stage1")
    out = console.export_text()
    for stage in ("vision", "stage1"):
        done = json.loads((tmp_path / "qs" / stage / "done.json").read_text())
        assert done["budget_steps"] == 100_000 and done["steps"] >= 1
        assert done["steps_cut"] == 100_000 - done["steps"] and done["minutes_cap"] > 0
        assert f"{stage}: the --minutes cap" in out and f"{done['steps_cut']} steps cut" in out
    training = card_section(tmp_path / "qs" / "stage1" / "checkpoint", "training")
    assert training["steps_cut"] == 100_000 - training["steps"]


def test_quickstart_budgets_match_the_stage_recipes():
    """`visto train --recipe quickstart-stageN` trains what the quickstart's stage N does."""
    from visto.train.recipe import load_recipe

    cfg = QuickstartConfig()
    for stage, steps, batch, lr in (("stage1", cfg.stage1_steps, cfg.stage1_batch, cfg.stage1_lr),
                                    ("stage2", cfg.stage2_steps, cfg.stage2_batch, cfg.stage2_lr)):  # fmt: skip
        recipe = load_recipe(f"quickstart-{stage}")
        assert (recipe.max_steps, recipe.batch_size, recipe.optim.lr) == (steps, batch, lr), stage
        assert recipe.max_minutes is None, stage  # steps are the budget; minutes only a cap
    assert cfg.minutes is None


def test_bad_budgets_are_user_errors(tmp_path, capsys):
    from visto.cli import main

    with pytest.raises(UserError, match="--stage2-steps must be at least 1"):
        QuickstartConfig(stage2_steps=0).validate()
    with pytest.raises(UserError, match="--minutes must be positive"):
        QuickstartConfig(minutes=0).validate()
    assert main(["quickstart", "--out", str(tmp_path / "q"), "--vision-steps", "0"]) == 2
    assert "--vision-steps must be at least 1, got 0" in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path / "c"), "--steps", "-3"]) == 2
    assert "--steps must be at least 1, got -3" in capsys.readouterr().err
    assert main(["quickstart", "--out", str(tmp_path / "q"), "--stage1-mix", "nope"]) == 2
    assert ("--stage1-mix must be one of captions, look, bind, look+copy, instruct, instruct+caption, "
            "instruct+caption+prefixes, tools, "
            "got 'nope'") in capsys.readouterr().err
    # Read slots are <focus> slots after the box's: without the focus (or its box slots) a
    # quickstart has none, whatever --read-slots says (the default is 8).
    from visto.quickstart import focus_slots, read_slots

    assert read_slots(QuickstartConfig(focus=False).validate()) == 0
    assert focus_slots(QuickstartConfig(focus_slots=0).validate()) == 0
    assert focus_slots(QuickstartConfig().validate()) == 12
    assert main(["quickstart", "--out", str(tmp_path / "q"), "--read-slots", "-1"]) == 2
    assert "--read-slots must be 0 or more, got -1" in capsys.readouterr().err


def test_a_stage_stopped_by_ctrl_c_is_not_marked_done(tmp_path: Path, monkeypatch):
    """Ctrl-C during a LLaVA stage: the loop saves a checkpoint and returns `stopped_early`;
    the quickstart neither marks the stage done nor prints a --minutes cut (it used to format
    a cap of None), and the interrupt goes on to the command, so the next run trains it again."""
    from rich.console import Console

    import visto.train.loop as loop
    from visto.quickstart import run_llava_stage
    from visto.train.loop import TrainResult

    def stopped(recipe, run_dir, **_):
        run_dir.mkdir(parents=True)
        return TrainResult(run_dir, 3, None, {}, {}, stopped_early=True)

    monkeypatch.setattr(loop, "train", stopped)
    cfg = QuickstartConfig(stage1_steps=10, detector_json_boxes=False)
    console = Console(record=True, width=200)
    with pytest.raises(KeyboardInterrupt):
        run_llava_stage("stage1", cfg, tmp_path, tmp_path / "world", tmp_path / "init", console, fresh=True)
    assert not (tmp_path / "stage1" / "done.json").exists()
    out = console.export_text()
    assert "stage1: stopped by Ctrl-C at step 3; not marked done" in out and "--minutes" not in out


def _tiny(**options) -> QuickstartConfig:
    sizes = dict(
        n=60, size=64, workers=1, threads=1, vision_width=32, vision_layers=1, decoder_width=64,
        decoder_layers=1, vocab_size=600, max_length=320, vision_batch=16, stage1_batch=8,
        stage2_batch=4, reader_steps=5, read_slots=4,
    )  # fmt: skip
    return QuickstartConfig(**{**sizes, **options})


def test_stage1_options_change_stages_1_and_2_not_the_vision_stage():
    off, on = QuickstartConfig(question_pointer=False, copy_verdicts=False), QuickstartConfig()
    assert on.question_pointer and on.copy_verdicts  # the default since runs/qp19
    for stage in ("data", "vision"):
        assert on.stage_settings(stage) == off.stage_settings(stage), stage
    for stage in ("stage1", "stage2", "eval"):
        assert on.stage_settings(stage) != off.stage_settings(stage), stage
        # off leaves the stamp as runs stamped before the options existed have it
        assert not {"question_pointer", "copy_verdicts"} & set(off.stage_settings(stage)), stage
        assert on.stage_settings(stage)["question_pointer"] is True, stage


def test_stage1_starts_from_the_vision_checkpoint_with_the_options(tmp_path: Path, monkeypatch):
    """--question-pointer and --copy-verdicts reach the model stage 1 trains: a copy of the
    vision stage's checkpoint (built without them) with their parameters added and every
    weight it holds kept; off, stage 1 starts from the vision checkpoint itself."""
    from rich.console import Console

    import visto.train.loop as loop
    from visto.checkpoint import save_checkpoint
    from visto.data.processor import Processor
    from visto.data.tokenizer import with_focus_token
    from visto.models.llava import Llava
    from visto.quickstart import llava_config, run_llava_stage
    from visto.train.loop import TrainResult

    started: list = []

    def train(recipe, run_dir, **_):
        started.append(recipe.model.init_from)
        run_dir.mkdir(parents=True)
        return TrainResult(run_dir, 2, None, {}, {})

    monkeypatch.setattr(loop, "train", train)
    config = llava_config(_tiny(), 600)
    texts = ["Is there a large red star left of the blue circle? yes", "How many squares? 2"] * 20
    tokenizer = with_focus_token(Processor.train(texts, replace(config.processor, focus_tokens=0)).tokenizer)
    cfg = _tiny(stage1_steps=2, vocab_size=tokenizer.vocab_size, question_pointer=False, copy_verdicts=False)
    torch.manual_seed(0)
    vision = Llava(llava_config(cfg, tokenizer.vocab_size))
    vision.processor = Processor(vision.config.processor, tokenizer)
    save_checkpoint(vision, tmp_path / "vision" / "checkpoint")
    console = Console(record=True, width=200)

    run_llava_stage("stage1", cfg, tmp_path, tmp_path / "world", tmp_path / "vision" / "checkpoint", console, fresh=True)
    assert started[-1] == str(tmp_path / "vision" / "checkpoint")
    assert not (tmp_path / "stage1-init").exists()

    on = replace(cfg, question_pointer=True, copy_verdicts=True)
    run_llava_stage("stage1", on, tmp_path, tmp_path / "world", tmp_path / "vision" / "checkpoint", console, fresh=False)
    assert started[-1] == str(tmp_path / "stage1-init")
    model = visto.load(started[-1])
    projector = model.config.projector
    assert projector.question_pointer and projector.copy_verdicts
    connector = model.multi_modal_projector
    assert connector.focus.question_pointer and connector.focus.copy_verdicts
    assert connector.pointer.question is not None and not connector.pointer.question.any()  # W_u starts at 0
    before, after = vision.state_dict(), model.state_dict()
    assert set(after) - set(before) == {"multi_modal_projector.pointer.question"}
    keys = "multi_modal_projector.pointer.keys"
    assert len(after[keys]) == len(before[keys]) + 2  # the verdict run and its end slot
    assert torch.equal(after[keys][: len(before[keys])], before[keys])
    for name, value in before.items():
        if name != keys:
            assert torch.equal(after[name], value), name
    # Turned off again, stage 1 starts from the vision checkpoint and the copy is gone.
    run_llava_stage("stage1", cfg, tmp_path, tmp_path / "world", tmp_path / "vision" / "checkpoint", console, fresh=False)
    assert started[-1] == str(tmp_path / "vision" / "checkpoint") and not (tmp_path / "stage1-init").exists()


@pytest.mark.slow
def test_stage1_options_reuse_the_vision_stage(tmp_path: Path):
    run = tmp_path / "qs"
    run_quickstart(_tiny(vision_steps=10, stage1_steps=2, question_pointer=False, copy_verdicts=False), run, until="stage1")
    stamp = (run / "vision" / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    first = (run / "stage1" / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    run_quickstart(_tiny(vision_steps=10, stage1_steps=2, question_pointer=True, copy_verdicts=True), run, until="stage1")
    assert (run / "vision" / "checkpoint" / "model.safetensors").stat().st_mtime_ns == stamp
    assert (run / "stage1" / "checkpoint" / "model.safetensors").stat().st_mtime_ns != first
    config = json.loads((run / "stage1" / "checkpoint" / "config.json").read_text())["config"]["projector"]
    assert config["question_pointer"] is True and config["copy_verdicts"] is True
