"""The `tools` training mix (visto.data.synth.tool_mix): reading questions answered through an
ocr call, the rest directly, the tool offered in every sample; labels on the call and the
answer, never on the tool's result; and, end to end, the llava-tools recipe trains a tiny
LLaVA on it whose own call the tool loop of `visto chat --tools` runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from visto.data.processor import IGNORE_INDEX, Processor
from visto.data.sample import Turn
from visto.data.synth import WorldConfig, generate_world, iter_records
from visto.data.synth.mixes import MIXES, get_mix, tokenizer_texts
from visto.data.synth.tool_mix import (
    OCR_ARGUMENTS,
    OCR_TOOL,
    TOOLS_MIX,
    direct_questions,
    ocr_result,
    reading_questions,
)
from visto.data.tokenizer import train_tokenizer
from visto.data.tool_calls import (
    TOOL_RESPONSE_START,
    compact_json,
    tool_call_text,
    tool_result_turn,
    tools_text,
)

LOC_BINS = 32  # the tiny presets' location bins
TRAIN_ONLY = {"train": 1.0, "val": 0.0, "test": 0.0, "heldout": 0.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    # every image with text and objects: both kinds of question on each
    root = tmp_path_factory.mktemp("toolmix") / "world"
    generate_world(WorldConfig(n=24, size=48, seed=3, max_objects=3, single_object_fraction=0.0,
                               text_probability=1.0, splits={**TRAIN_ONLY, "train": 0.75, "val": 0.25}),
                   root, workers=1)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def processor(world) -> Processor:
    from visto.models.llava import LlavaConfig

    texts = [
        *tokenizer_texts(world, LOC_BINS),
        tools_text([OCR_TOOL]),
        tool_call_text("ocr", OCR_ARGUMENTS),
    ]
    config = dataclasses.replace(LlavaConfig.preset("tiny").processor, max_length=None)
    return Processor(
        config, train_tokenizer(texts, vocab_size=400, loc_bins=LOC_BINS, min_frequency=1)
    )


def test_the_mix_offers_the_ocr_tool_exactly_as_the_tool_defines_it():
    from visto.tools.ocr import ocr_tool

    assert OCR_TOOL == ocr_tool.openai()  # the model learns this text: a drift breaks it
    assert MIXES["tools"] is TOOLS_MIX and get_mix("tools").card()["tools"] == ["ocr"]


def test_reading_questions_go_through_the_tool_and_the_rest_are_answered(world):
    records = {r["id"]: r for r in iter_records(world, "train")}
    samples = list(TOOLS_MIX.samples(world, "train", seed=0, epoch=0, loc_bins=LOC_BINS))
    assert [s.id for s in samples] == list(records)
    kinds = set()
    for sample in samples:
        record = records[sample.id]
        system, question, *rest = sample.turns
        assert system == Turn("system", tools_text([OCR_TOOL])) and not sample.independent_turns
        assert question.role == "user" and question.content.startswith("<image>\n")
        asked = question.content.removeprefix("<image>\n")
        if len(rest) == 3:  # call, result, answer
            call, result, answer = rest
            assert (asked, answer.content) in reading_questions(record)
            assert call == Turn("assistant", tool_call_text("ocr", OCR_ARGUMENTS))
            assert result == Turn(
                "user",
                f"{TOOL_RESPONSE_START}{compact_json(ocr_result(record['truth']['texts']))}</tool_response>",
            )
            kinds.add("tool")
        else:
            [answer] = rest
            assert (asked, answer.content) in direct_questions(record, LOC_BINS)
            assert all(t["text"] not in answer.content for t in record["truth"]["texts"])
            kinds.add("direct")
    assert kinds == {"tool", "direct"}
    again = [s.turns for s in TOOLS_MIX.samples(world, "train", seed=0, epoch=0, loc_bins=LOC_BINS)]
    assert again == [s.turns for s in samples]
    assert again != [
        s.turns for s in TOOLS_MIX.samples(world, "train", seed=0, epoch=1, loc_bins=LOC_BINS)
    ]


def test_ocr_result_reads_rows_top_to_bottom_and_left_to_right():
    texts = [{"text": "LOW", "box": [5, 40, 30, 50]}, {"text": "B", "box": [60, 11, 70, 20]},
             {"text": "A", "box": [10, 10, 20, 20]}, {"text": "TOP", "box": [0, 0, 20, 6]}]  # fmt: skip
    assert ocr_result(texts) == {"text": "TOP\nA\nB\nLOW"}
    assert ocr_result([]) == {"text": ""}


def test_the_result_format_is_the_real_tools(tmp_path):
    """On a world image the real PP-OCR tool returns what the mix writes from ground truth."""
    pytest.importorskip("rapidocr_onnxruntime")
    from visto.data.images import open_image
    from visto.tools.ocr import run_ocr

    generate_world(WorldConfig(n=3, size=128, seed=1, text_probability=1.0, max_texts=2,
                               splits=TRAIN_ONLY), tmp_path, workers=1)  # fmt: skip
    records = [r for r in iter_records(tmp_path, "train") if len(r["truth"]["texts"]) == 2]
    assert records, "the seed gives an image with two texts"
    record = records[0]
    assert run_ocr(open_image(tmp_path / record["image"]), **OCR_ARGUMENTS) == ocr_result(
        record["truth"]["texts"]
    )


def supervised_text(processor: Processor, sample) -> list[str]:
    """The decoded runs of labelled tokens: one per answer."""
    labels = processor.encode(sample, train=True).labels.tolist()
    runs, run = [], []
    for token in [*labels, IGNORE_INDEX]:
        if token != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs.append(processor.tokenizer.decode(run, skip_special=False))
            run = []
    return runs


def test_labels_cover_the_call_and_the_answer_not_the_tool_result(world, processor):
    samples = list(TOOLS_MIX.samples(world, "train", seed=0, epoch=0, loc_bins=LOC_BINS))
    tool = next(s for s in samples if len(s.turns) == 5)
    call, result, answer = (t.content for t in tool.turns[2:])
    assert supervised_text(processor, tool) == [call + "<|end|>", answer + "<|end|>"]
    encoded = processor.encode(tool, train=True)
    assert not encoded.truncated
    # the tool's result and the offer are in the input, with no loss on them
    result_ids = processor.tokenizer.encode(result)
    ids = encoded.input_ids.tolist()
    at = next(i for i in range(len(ids)) if ids[i : i + len(result_ids)] == result_ids)
    assert set(encoded.labels[at : at + len(result_ids)].tolist()) == {IGNORE_INDEX}
    direct = next(s for s in samples if len(s.turns) == 3)
    assert supervised_text(processor, direct) == [direct.turns[2].content + "<|end|>"]


@pytest.mark.slow
def test_the_recipe_trains_on_the_mix_and_the_tool_loop_runs_the_models_call(
    world, processor, tmp_path
):
    """llava-tools from a tiny LLaVA on the tiny world; the trained model, asked a reading
    question with the ocr tool offered (auto), calls it: the loop of `visto chat --tools`
    runs the real OCR tool on the image and the model answers after its result."""
    import torch

    from visto.checkpoint import load, save_checkpoint
    from visto.commands._chat_tools import ToolLoop
    from visto.data.images import open_image
    from visto.infer import SamplingParams
    from visto.models import build_model
    from visto.models.llava import LlavaConfig
    from visto.tasks.runner import Chat
    from visto.train.loop import train
    from visto.train.recipe import load_recipe

    config = LlavaConfig.preset("tiny")
    config = dataclasses.replace(
        config, decoder=dataclasses.replace(config.decoder, max_position_embeddings=1024)
    )
    model = build_model("llava", config, seed=0)
    model.processor = processor
    start = save_checkpoint(model, tmp_path / "start")
    recipe = load_recipe("llava-tools", [
        f"model.init_from={json.dumps(str(start))}", f"data.source={json.dumps(str(world))}",
        "max_steps=120", "batch_size=4", "optim.lr=0.003", "schedule.warmup_steps=5",
        "log_every=20", "checkpoint_every=null"])  # fmt: skip
    assert recipe.data.mix == "tools"
    result = train(recipe, tmp_path / "run", show_progress=False)
    assert result.step == 120
    curve = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [m["loss"] for m in curve if m.get("split") == "train"]
    assert losses[-1] < 0.5 * losses[0]
    card = (tmp_path / "run" / "checkpoint" / "README.md").read_text()
    assert '"name": "tools"' in card and '"tools": [\n' in card

    trained = load(tmp_path / "run" / "checkpoint")
    record = next(r for r in iter_records(world, "val") if reading_questions(r))
    question, _ = reading_questions(record)[0]
    image = open_image(world / record["image"])
    loop = ToolLoop.build(trained, "ocr", "auto")
    chat = Chat(trained, [image], tools=loop.tools.openai())
    with torch.inference_mode():
        reply, runs = loop.answer(chat, question, argparse.Namespace(task=None, stream=False, json=True),
                                  SamplingParams(max_new_tokens=80), [image])  # fmt: skip
    assert [(r["name"], json.loads(r["arguments"]), r["ok"]) for r in runs[:1]] == [
        ("ocr", OCR_ARGUMENTS, True)
    ]
    assert set(runs[0]["result"]) == {"text"}  # the real tool's result, fed back
    # the conversation the model answered in: offer, question, its call, the result, its answer
    assert [t.role for t in chat.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.turns[2].content == tool_call_text("ocr", OCR_ARGUMENTS)
    assert chat.turns[3] == tool_result_turn(compact_json(runs[0]["result"]))
    assert chat.turns[4].content == reply.raw and len(runs) == 1
