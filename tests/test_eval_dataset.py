"""`visto eval --data FILE` on datasets other tools wrote: what the data carries decides what
is scored (VQA, boxes, long answers, captions; retrieval for a two-tower model), each
generative figure with its blind twin."""

from __future__ import annotations

import json
import math

import pytest

import foreign_data
from test_chat import ANSWER_PLAIN, train_tiny_llava  # the shared tiny run
from visto.cli import main
from visto.commands.eval import resolve_tasks
from visto.config import to_dict
from visto.data.formats import read_samples
from visto.errors import UserError
from visto.eval.dataset import (
    answer_type,
    dataset_items,
    evaluate_generative_dataset,
    exchange_task,
)
from visto.eval.generative import answer_boxes
from visto.models.clip import CLIPConfig

# ----------------------------------------------------------------------------- scoring rules


def test_a_reference_is_scored_by_its_boxes_else_its_length():
    assert exchange_task("[140, 203, 640, 828]") == "ground"
    assert exchange_task("It is at [0.14, 0.203, 0.64, 0.828].") == "ground"  # LLaVA-1.5's boxes
    assert exchange_task("[1, 2, 3, 4] and [5, 6, 7, 8]") == "boxes"
    assert exchange_task("Fire hydrant.") == "vqa"
    assert exchange_task("A red square on a grey background.") == "longform"
    assert [answer_type(a) for a in ("Yes", "two", "3", "red")] == [
        "yesno", "number", "number", "other",
    ]  # fmt: skip
    # Fractions become 0..999 (x1000, clamped); integers stay as visto writes them.
    assert answer_boxes("[0.14, 0.203, 0.64, 1.0]") == [[140, 203, 640, 999]]
    assert answer_boxes("[0, 0, 1, 1]") == [[0, 0, 1, 1]]
    assert answer_boxes("version [1.0, 1, 0, 0]") == []  # no fraction strictly inside 0..1


def colour_oracle(prompts):
    """Answers like a model that looks: the colour of the centre pixel, in the words asked."""
    answers = []
    for p in prompts:
        pixel = p.images[0].getpixel((16, 16))  # JPEG: near the colour drawn, not equal
        colour = min(foreign_data.COLOURS, key=lambda name: sum(
            (a - b) ** 2 for a, b in zip(foreign_data.COLOURS[name], pixel, strict=True)))  # fmt: skip
        question = p.turns[-1].content
        answers.append(colour if "colour" in question else f"a {colour} square on grey")
    return answers


def test_every_exchange_is_asked_after_the_turns_before_it_and_the_blind_twin_swaps(tmp_path):
    json_path, images = foreign_data.write_llava_mix(tmp_path)
    samples = list(read_samples(json_path, image_root=images))  # 8 load, 1 of them text only
    items, skipped = dataset_items(samples)
    assert skipped == {"text only (nothing to look at)": 1}
    assert [it.task for it in items[:2]] == ["vqa", "longform"]
    second = items[1].prompt
    assert [t.role for t in second.turns] == ["user", "assistant", "user"]  # the history
    assert second.turns[1].content == items[0].references[0]  # the reference, not an answer

    result = evaluate_generative_dataset(colour_oracle, samples, blind="swap", seed=0)
    m = result.metrics
    assert m["vqa.overall"] == 1.0 and m["vqa.other"] == 1.0
    assert m["longform.bleu4"] == pytest.approx(1.0) and m["longform.cider"] > 1.0
    # Swapped images: the oracle answers the other picture's colour (3 colours over 7 images).
    assert m["blind.vqa.overall"] < 1.0 and m["blind.longform.cider"] < m["longform.cider"]
    rows = result.predictions
    assert len(rows) == 14 and all(r["blind_image"] != r["id"].rsplit("-", 2)[0] for r in rows)
    assert any("text only" in note for note in result.notes)


def test_blind_twin_blanks_when_samples_have_different_image_counts(tmp_path):
    json_path, images = foreign_data.write_llava_mix(tmp_path)
    samples = list(read_samples(json_path, image_root=images))
    samples[0].images.append(samples[0].images[0])
    samples[0].turns[0].content = "<image>\n" + samples[0].turns[0].content
    result = evaluate_generative_dataset(colour_oracle, samples, blind="swap")
    assert {r["blind_image"] for r in result.predictions} == {"blank"}
    assert any("swapping needs" in note for note in result.notes)


# ----------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """(world, checkpoint): a tiny LLaVA that answers every question with ANSWER_PLAIN."""
    world, run = train_tiny_llava(tmp_path_factory.mktemp("evaldata"))
    return world, run / "checkpoint"


def eval_json(out) -> dict:
    return json.loads((out / "eval.json").read_text())


def box_questions(world, tmp_path):
    """A LLaVA JSON (written as LLaVA-1.5's RefCOCO data is: 0..1 boxes) on two of the tiny
    world's images, asking its grounding questions: the first reference is the tiny model's
    own box, the second another one; then a short and a long answer."""
    from visto.data.synth import iter_samples

    questions = iter_samples(world, "test", tasks=["ground"])
    first = next(questions)
    second = next(q for q in questions if q.truth["image_id"] != first.truth["image_id"])
    for sample in (first, second):
        sample.images[0].save(tmp_path / f"{sample.truth['image_id']}.png")
    a, b = (f"{s.truth['image_id']}.png" for s in (first, second))
    records = [
        {"id": "hit", "image": a, "conversations": [
            {"from": "human", "value": first.turns[0].content},
            {"from": "gpt", "value": "[0.14, 0.203, 0.64, 0.828]"},
            {"from": "human", "value": "How many squares?"}, {"from": "gpt", "value": "1"}]},
        {"id": "miss", "image": b, "conversations": [
            {"from": "human", "value": second.turns[0].content},
            {"from": "gpt", "value": "[0.0, 0.0, 0.1, 0.1]"},
            {"from": "human", "value": "Describe it."},
            {"from": "gpt", "value": "One red square on a plain grey background."}]},
    ]  # fmt: skip
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.slow
def test_visto_eval_on_llava_json_scores_boxes_vqa_and_long_answers(tiny_llava, tmp_path):
    world, ckpt = tiny_llava
    out = tmp_path / "ev"
    args = ["eval", "--model", str(ckpt), "--data", str(box_questions(world, tmp_path)),
            "--out", str(out), "--max-tokens", "8", "--examples", "4"]  # fmt: skip
    assert main(args) == 0
    m = eval_json(out)
    assert m["ground.acc50"] == 0.5  # its one box hits the first reference, misses the second
    assert m["vqa.overall"] == 0.0 and m["vqa.number"] == 0.0
    assert {"longform.bleu4", "longform.cider", "blind.ground.acc50", "gain.vqa.overall"} <= set(m)
    assert m["blind.ground.acc50"] == 0.5  # the model answers without looking: no gain
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    ground = {r["id"]: r for r in rows if r["task"] == "ground"}
    assert ground["hit-ground-0"]["prediction"] == ANSWER_PLAIN
    assert ground["hit-ground-0"]["score"] == pytest.approx(1.0)
    report = (out / "report.md").read_text()
    assert "boxes.json" in report and "## Example predictions" in report
    assert (out / "examples.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["webdataset", "parquet", "llava", "coco"])
def test_visto_eval_on_each_foreign_dataset(tiny_llava, tmp_path, kind, capsys):
    _, ckpt = tiny_llava
    flags: list[str] = []
    if kind == "webdataset":
        data = foreign_data.write_webdataset(tmp_path / "wds").parent
    elif kind == "parquet":
        data = foreign_data.write_hf_parquet(tmp_path / "train.parquet")
    elif kind == "llava":
        data, folder = foreign_data.write_llava_mix(tmp_path)
        flags = ["--image-root", str(folder)]
    else:
        data, folder = foreign_data.write_coco_captions(tmp_path)
        flags = ["--image-root", str(folder)]
    out = tmp_path / "ev"
    args = ["eval", "--model", str(ckpt), "--data", str(data), "--out", str(out),
            "--max-tokens", "4", "--examples", "0", *flags]  # fmt: skip
    assert main(args) == 0
    m = eval_json(out)
    if kind == "llava":
        wanted = {"vqa.overall", "vqa.other", "longform.bleu4", "longform.cider"}
    else:  # caption records: every caption of an image is a reference
        wanted = {"caption.bleu4", "caption.cider"}
    assert wanted <= set(m) and {"blind." + k for k in wanted} <= set(m)
    assert all(math.isfinite(v) for v in m.values())
    report = (out / "report.md").read_text()
    assert "skipped 1" in report  # the corrupt record, reported by the reader
    rows = (out / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == (14 if kind == "llava" else 8)


@pytest.mark.slow
def test_a_world_exported_as_llava_json_scores_as_the_world(tiny_llava, tmp_path):
    world, ckpt = tiny_llava
    exported = tmp_path / "test-llava"
    assert main(["data", "export", str(world), "--split", "test", "--format", "llava",
                 "--out", str(exported), "--tasks", "vqa", "ground"]) == 0  # fmt: skip
    common = ["--model", str(ckpt), "--max-tokens", "8", "--examples", "0", "--tasks", "vqa",
              "ground"]  # fmt: skip
    assert main(["eval", *common, "--data", str(world), "--out", str(tmp_path / "w")]) == 0
    data = exported / "data.json"
    assert main(["eval", *common, "--data", str(data), "--out", str(tmp_path / "f")]) == 0
    on_world, on_file = eval_json(tmp_path / "w"), eval_json(tmp_path / "f")
    seen = {k: v for k, v in on_world.items() if "heldout." not in k}
    assert "vqa.count" in seen and "pope.f1" in seen and "blind.ground.acc50" in seen
    assert on_file == pytest.approx(seen)  # the same questions, images and blind partners


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(coco json, image folder, checkpoint): a tiny CLIP trained on COCO captions by CLI."""
    root = tmp_path_factory.mktemp("evalclip")
    data, folder = foreign_data.write_coco_captions(root)
    recipe = {
        "model": {"family": "clip", "config": to_dict(CLIPConfig.preset("tiny"))},
        "processor": {"config": {"image_size": 32, "resize_mode": "resize", "vocab_size": 400},
                      "tokenizer_samples": 100},
        "data": {"source": str(data), "val_split": None},
        "batch_size": 4, "max_steps": 2, "log_every": 1, "eval_every": None, "num_threads": 1,
    }  # fmt: skip
    (root / "recipe.json").write_text(json.dumps(recipe))
    run = root / "run"
    args = ["train", "--recipe", str(root / "recipe.json"), "--out", str(run), "--no-progress",
            "--image-root", str(folder)]  # fmt: skip
    assert main(args) == 0
    return data, folder, run / "checkpoint"


@pytest.mark.slow
def test_a_two_tower_model_is_scored_by_retrieval_on_caption_data(tiny_clip, tmp_path):
    data, folder, ckpt = tiny_clip
    out = tmp_path / "ev"
    args = ["eval", "--model", str(ckpt), "--data", str(data), "--image-root", str(folder),
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    m = eval_json(out)
    assert set(m) == {f"retrieval.{d}.r{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)}
    assert all(0.0 <= v <= 1.0 for v in m.values()) and m["retrieval.t2i.r10"] == 1.0  # 8 images
    assert "retrieval over 8 images and 16 captions" in (out / "report.md").read_text()
    parquet = foreign_data.write_hf_parquet(tmp_path / "val.parquet")
    assert main(["eval", "--model", str(ckpt), "--data", str(parquet), "--out", str(out)]) == 0


def test_bad_dataset_flags_are_clear_errors(tiny_clip, tmp_path, capsys):
    data, folder, ckpt = tiny_clip

    def error(*args: str) -> str:
        assert main(["eval", "--model", str(ckpt), *args]) == 2
        return capsys.readouterr().err

    assert "--split picks a split of a synthetic world" in error(
        "--data", str(data), "--image-root", str(folder), "--split", "val"
    )
    assert "needs the world's class labels" in error(
        "--data", str(data), "--image-root", str(folder), "--paraphrase"
    )
    llava, images = foreign_data.write_llava_mix(tmp_path)
    assert "none of the 8 sample(s) is a caption record" in error(
        "--data", str(llava), "--image-root", str(images)
    )
    # Without the image folder nothing loads: the error says how to see why.
    assert "visto data inspect" in error("--data", str(data))
    world = tmp_path / "world"
    world.mkdir()
    (world / "world.json").write_text("{}")
    assert "--image-root read a dataset file" in error("--data", str(world), "--image-root", "x")
    assert resolve_tasks(["longform", "vqa"], on_world=False) == ["longform", "vqa"]
    with pytest.raises(UserError, match=r"unknown task\(s\) \['poetry'\]"):
        resolve_tasks(["poetry"], on_world=False)
