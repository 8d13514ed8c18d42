"""`visto chat` end to end on a tiny LLaVA trained (through the real loop) to answer every
question with one box, so that answers are deterministic and hold a box to draw."""

from __future__ import annotations

import dataclasses
import io
import json
import sys

import pytest
from PIL import Image

from visto.cli import main
from visto.config import to_dict
from visto.data.sample import Turn
from visto.data.synth import WorldConfig, generate_world, iter_records, iter_samples

ANSWER = "<loc_4><loc_6><loc_20><loc_26>"  # 32 location bins -> [140, 203, 640, 828]
ANSWER_PLAIN = "[140, 203, 640, 828]"


def train_tiny_llava(root):
    """(world dir, run dir): a 40-image world and a tiny LLaVA that learned ANSWER."""
    from visto.models.llava import LlavaConfig
    from visto.train.loop import train
    from visto.train.recipe import recipe_from_dict

    world = root / "world"
    splits = {"train": 0.5, "val": 0.1, "test": 0.2, "heldout": 0.2}
    generate_world(WorldConfig(n=40, seed=1, size=48, splits=splits), world)
    samples = [
        dataclasses.replace(s, turns=[s.turns[0], Turn("assistant", ANSWER)])
        for s in iter_samples(world, "train", tasks=["ground", "vqa"])
    ]
    recipe = recipe_from_dict({
        "model": {"family": "llava", "config": to_dict(LlavaConfig.preset("tiny"))},
        "processor": {"config": {"image_size": 32, "image_tokens": 16, "image_delimiters": False,
                                 "vocab_size": 400, "loc_bins": 32}},
        "data": {"source": str(world), "val_split": None},
        "optim": {"lr": 3e-3}, "batch_size": 8, "max_steps": 30, "log_every": 5,
        "eval_every": None, "num_threads": 1, "seed": 0,
    })  # fmt: skip
    run = root / "run"
    train(recipe, run, source=lambda role: samples if role == "train" else [], show_progress=False)
    return world, run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    world, run = train_tiny_llava(tmp_path_factory.mktemp("chat"))
    record = next(iter_records(world, "test"))
    return run / "checkpoint", world / record["image"]


def chat(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["chat", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_chat_prints_the_answer_and_its_box(tiny_run, capsys, tmp_path, monkeypatch):
    ckpt, image = tiny_run
    monkeypatch.chdir(tmp_path)
    code, out, _ = chat(capsys, "--model", str(ckpt), str(image), "How many circles are there?")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == ANSWER_PLAIN
    # 48 px image: pixels = round(v * 48 / 999).
    assert f"box 1: {ANSWER_PLAIN} (0..999), pixels [7, 10, 31, 40] of 48x48" in lines
    # Default place of the drawn boxes: IMAGE_STEM-boxes.png in the current directory.
    assert f"boxes drawn on: {tmp_path / (image.stem + '-boxes.png')}" in lines


def test_sampling_flags_are_seeded_and_streaming_gives_the_same_text(tiny_run, capsys):
    import visto
    from visto.infer import SamplingParams
    from visto.tasks.runner import Chat

    ckpt, image = tiny_run
    model, pixels = visto.load(ckpt), Image.open(image).convert("RGB")
    question = "What colour is the star?"
    # A hot sample of the one answer the model knows: find a seed whose draw says something.
    for seed in range(40):
        params = SamplingParams(max_new_tokens=6, temperature=1.5, top_k=50, top_p=0.95, seed=seed)
        expected = Chat(model, [pixels]).ask(question, params=params)
        if expected.text:
            break
    assert expected.text
    args = ["--model", str(ckpt), str(image), question, "--out",
            str(image.parent.parent / "unused.png"), "--temperature", "1.5", "--top-k", "50",
            "--top-p", "0.95", "--max-tokens", "6", "--seed", str(seed)]  # fmt: skip
    code, out, _ = chat(capsys, *args)
    assert code == 0 and out.splitlines()[0] == expected.text
    code, streamed, _ = chat(capsys, *args, "--stream")
    assert code == 0 and streamed.splitlines()[0] == expected.text


def test_ground_writes_a_png_with_the_box(tiny_run, capsys, tmp_path):
    ckpt, image = tiny_run
    png = tmp_path / "boxed.png"
    code, out, _ = chat(capsys, "--model", str(ckpt), str(image), "red circle", "--task", "ground",
                        "--out", str(png))  # fmt: skip
    assert code == 0 and f"boxes drawn on: {png}" in out
    drawn = Image.open(png).convert("RGB")
    # Drawn enlarged (48 px -> 288 px) so the box and its label are readable.
    assert drawn.size == (288, 288)
    plain = Image.open(image).convert("RGB").resize((288, 288), Image.Resampling.NEAREST)
    # The box [140, 203, 640, 828] of 999 -> x 40..185, y 59..239 at 288 px: its left edge
    # is drawn, the middle of the image far from the label is untouched.
    assert drawn.getpixel((40, 150)) != plain.getpixel((40, 150))
    assert drawn.getpixel((250, 270)) == plain.getpixel((250, 270))


def test_json_output_parses(tiny_run, capsys, tmp_path):
    ckpt, image = tiny_run
    png = tmp_path / "b.png"
    code, out, _ = chat(capsys, "--model", str(ckpt), str(image), "red circle", "--task", "ground",
                        "--json", "--out", str(png))  # fmt: skip
    assert code == 0
    reply = json.loads(out)
    assert reply["answer"] == ANSWER_PLAIN and reply["task"] == "ground"
    assert reply["boxes"] == [{"box": [140, 203, 640, 828], "box_pixels": [7, 10, 31, 40]}]
    assert reply["parsed"] == reply["boxes"]
    assert reply["boxed_image"] == str(png) and reply["image_size"] == [48, 48]
    assert reply["finish_reason"] == "stop" and reply["completion_tokens"] == 5


def test_interactive_answers_piped_turns_in_one_conversation(tiny_run, capsys, tmp_path,
                                                             monkeypatch):  # fmt: skip
    ckpt, image = tiny_run
    monkeypatch.setattr(sys, "stdin", io.StringIO("How many stars?\n\nAnd squares?\n/reset\nOK?\n"))
    code, out, _ = chat(capsys, "--model", str(ckpt), str(image), "--interactive", "--json",
                        "--out", str(tmp_path / "i.png"))  # fmt: skip
    assert code == 0
    replies = [json.loads(line) for line in out.splitlines()]
    assert [r["question"] for r in replies] == ["How many stars?", "And squares?", "OK?"]
    assert all(r["answer"] == ANSWER_PLAIN for r in replies)
    # The second turn reads the first question and answer; /reset starts over.
    first, second, after_reset = (r["prompt_tokens"] for r in replies)
    assert second > first and after_reset < second
    assert [r["boxed_image"] for r in replies] == [
        str(tmp_path / "i.png"), str(tmp_path / "i-2.png"), str(tmp_path / "i-3.png")]  # fmt: skip


def test_several_images_and_few_shot_demos_lengthen_the_prompt(tiny_run, capsys, tmp_path):
    ckpt, image = tiny_run
    base = ["--model", str(ckpt), "--json", "--out", str(tmp_path / "x.png")]
    prompts = {}
    for name, args in {
        "one": [str(image), "How many stars?"],
        "two": [str(image), str(image), "How many stars?"],
        "demo": [str(image), "stars", "--task", "count", "--demo", str(image), "stars", "2"],
    }.items():
        code, out, _ = chat(capsys, *base, *args)
        assert code == 0, name
        prompts[name] = json.loads(out)["prompt_tokens"]
    image_tokens = 16  # the tiny preset's visual tokens per image
    assert prompts["two"] == prompts["one"] + image_tokens + 1  # one more <image> run and "\n"
    assert prompts["demo"] > prompts["one"] + image_tokens


def test_bad_inputs_are_clear_errors(tiny_run, capsys, tmp_path):
    ckpt, image = tiny_run
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    cases = [
        ([str(tmp_path / "missing.png"), "What is this?"], "image file not found"),
        ([str(tmp_path / "missing.png")], "image file not found"),
        ([str(text_file), "What is this?"], "not a readable image"),
        ([str(tmp_path), "What is this?"], "is not a file"),
        ([str(image)], "ask a question"),
        ([str(image), "q", "--stream", "--json"], "do not mix"),
        ([str(image), str(image), "q", "--demo", str(image), "q", "a"], "one IMAGE"),
    ]
    for args, message in cases:
        code, out, err = chat(capsys, "--model", str(ckpt), *args)
        assert code == 2, args
        assert message in err and "Traceback" not in err, (args, err)
    code, _, err = chat(capsys, "--model", str(tmp_path / "nope"), str(image), "q")
    assert code == 2 and "no checkpoint" in err
