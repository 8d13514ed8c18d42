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
import torch

from visto.data.processor import IGNORE_INDEX, Processor
from visto.data.sample import Turn
from visto.data.synth import WorldConfig, generate_world, iter_records
from visto.data.synth.mixes import MIXES, get_mix, tokenizer_texts
from visto.data.synth.tool_mix import (
    OCR_ARGUMENTS,
    OCR_QUESTIONS,
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


def exchanges(sample) -> list[list[Turn]]:
    """The sample's exchanges after the system turn: a tool result and the answer after it
    belong to the call before them."""
    out: list[list[Turn]] = []
    for k in range(1, len(sample.turns), 2):
        pair = list(sample.turns[k : k + 2])
        if out and pair[0].content.startswith(TOOL_RESPONSE_START):
            out[-1] += pair
        else:
            out.append(pair)
    return out


def test_reading_questions_go_through_the_tool_and_the_rest_are_answered(world):
    records = {r["id"]: r for r in iter_records(world, "train")}
    samples = [s for s in TOOLS_MIX.samples(world, "train", seed=0, epoch=0, loc_bins=LOC_BINS)
               if s.turns[0].role == "system"]  # with the tool (untooled: its own test)  # fmt: skip
    with_text = [i for i, r in records.items() if reading_questions(r)]
    assert set(with_text) <= {s.id for s in samples} and len(with_text) > len(records) // 2
    for sample in samples:
        record = records[sample.id]
        assert sample.turns[0] == Turn("system", tools_text([OCR_TOOL]))
        assert sample.independent_turns  # packed: the processor keeps them apart
        assert sample.turns[1].content.startswith("<image>\n")
        assert sum(t.content.count("<image>") for t in sample.turns) == 1
        asked = exchanges(sample)
        asked[0][0] = Turn("user", asked[0][0].content.removeprefix("<image>\n"))
        tool = [x for x in asked if len(x) == 4]
        direct = [x for x in asked if len(x) == 2]
        assert asked == tool + direct  # reading first: they are kept when max_length cuts
        # each reading question, the OCR question in all three wordings, through the tool
        assert [(q.content, a.content) for q, _, _, a in tool] == reading_questions(
            record, all_wordings=True
        )
        assert {q.content for q, *_ in tool} >= set(OCR_QUESTIONS)
        result = f"{TOOL_RESPONSE_START}{compact_json(ocr_result(record['truth']['texts']))}</tool_response>"
        for _, call, response, _ in tool:
            assert call == Turn("assistant", tool_call_text("ocr", OCR_ARGUMENTS))
            assert response == Turn("user", result)
        expected = direct_questions(record, LOC_BINS)
        assert len(direct) == min(TOOLS_MIX.direct_per_image, len(expected))
        for q, a in direct:
            assert (q.content, a.content) in expected
            assert all(t["text"] not in a.content for t in record["truth"]["texts"])
    again = [s.turns for s in TOOLS_MIX.samples(world, "train", seed=0, epoch=0, loc_bins=LOC_BINS)
             if s.turns[0].role == "system"]  # fmt: skip
    assert again == [s.turns for s in samples]
    assert again != [
        s.turns for s in TOOLS_MIX.samples(world, "train", seed=0, epoch=1, loc_bins=LOC_BINS)
    ]


def test_images_without_text_come_at_their_share(tmp_path):
    generate_world(WorldConfig(n=40, size=48, seed=5, max_objects=2, text_probability=0.5,
                               splits=TRAIN_ONLY), tmp_path, workers=1)  # fmt: skip
    records = list(iter_records(tmp_path, "train"))
    with_text = [r["id"] for r in records if reading_questions(r)]
    assert 0 < len(with_text) < len(records)

    def kept(share: float) -> list[str]:
        mix = dataclasses.replace(TOOLS_MIX, textless_share=share, untooled_share=0.0)
        return [s.id for s in mix.samples(tmp_path, "train", seed=0, epoch=0, loc_bins=LOC_BINS)]

    assert kept(0.0) == with_text and len(kept(1.0)) == len(records)
    assert set(with_text) < set(kept(0.5)) < set(kept(1.0))
    # no text: no call, only direct questions
    textless = next(s for s in TOOLS_MIX.samples(tmp_path, "train", seed=0, epoch=0, loc_bins=LOC_BINS)
                    if s.id not in with_text)  # fmt: skip
    assert all(len(x) == 2 for x in exchanges(textless))


def test_a_share_of_the_images_with_text_is_also_asked_without_the_tool(world):
    # the tool-trained model forgot to answer reading questions without the tool (t17b: OCR
    # exact 0.289 with no tool offered, 0.908 before): some samples keep them, answered directly
    records = {r["id"]: r for r in iter_records(world, "train")}
    with_text = [i for i, r in records.items() if reading_questions(r)]

    def samples(share: float, epoch: int = 0) -> list:
        mix = dataclasses.replace(TOOLS_MIX, untooled_share=share)
        return list(mix.samples(world, "train", seed=0, epoch=epoch, loc_bins=LOC_BINS))

    assert 0 < TOOLS_MIX.untooled_share < 1
    assert not [s for s in samples(0.0) if s.id.endswith("-direct")]
    untooled = [s for s in samples(1.0) if s.id.endswith("-direct")]
    assert [s.id.removesuffix("-direct") for s in untooled] == with_text
    # the tool samples are the same whatever the share
    assert [s.turns for s in samples(1.0) if s.turns[0].role == "system"] == [s.turns for s in samples(0.0)]
    for sample in untooled:
        record = records[sample.id.removesuffix("-direct")]
        assert sample.independent_turns and all(t.role != "system" for t in sample.turns)
        assert not any(TOOL_RESPONSE_START in t.content or "<tool_call>" in t.content for t in sample.turns)
        assert sample.turns[0].content.startswith("<image>\n")
        asked = [(q.content.removeprefix("<image>\n"), a.content) for q, a in zip(sample.turns[::2], sample.turns[1::2], strict=True)]
        reading = reading_questions(record)
        assert asked[: len(reading)] == reading  # answered directly, with the world's answers
        assert len(asked) - len(reading) == min(TOOLS_MIX.direct_per_image, len(direct_questions(record, LOC_BINS)))
    some = {s.id for s in samples(0.5) if s.id.endswith("-direct")}
    assert 0 < len(some) < len(with_text)
    assert some == {s.id for s in samples(0.5) if s.id.endswith("-direct")}  # seeded


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
    sample = next(TOOLS_MIX.samples(world, "train", seed=0, epoch=0, loc_bins=LOC_BINS))
    expected = []
    for exchange in exchanges(sample):
        if len(exchange) == 4:  # question, call, result, answer
            expected += [exchange[1].content + "<|end|>", exchange[3].content + "<|end|>"]
        else:
            expected.append(exchange[1].content + "<|end|>")
    assert supervised_text(processor, sample) == expected
    encoded = processor.encode(sample, train=True)
    assert not encoded.truncated
    # the tool's result and the offer are in the input, with no loss on them
    result = next(t.content for t in sample.turns if t.content.startswith(TOOL_RESPONSE_START))
    result_ids = processor.tokenizer.encode(result)
    ids = encoded.input_ids.tolist()
    starts = [i for i in range(len(ids)) if ids[i : i + len(result_ids)] == result_ids]
    assert len(starts) == sum(len(x) == 4 for x in exchanges(sample)) > 1
    for at in starts:
        assert set(encoded.labels[at : at + len(result_ids)].tolist()) == {IGNORE_INDEX}


def test_packing_keeps_each_tool_exchange_whole_as_if_asked_alone(world, processor):
    """Each segment of a packed sample is its exchange (a tool exchange: question, call,
    result, answer) encoded alone behind the offer and the image: same ids, labels and
    positions."""
    sample = next(TOOLS_MIX.samples(world, "train", seed=0, epoch=0, loc_bins=LOC_BINS))
    packed = processor.encode(sample, train=True)
    seg = packed.segment_ids
    asked = exchanges(sample)
    assert seg is not None and int(seg.max()) == len(asked)
    for k, exchange in enumerate(asked, start=1):
        question = exchange[0].content
        if not question.startswith("<image>"):
            question = "<image>\n" + question
        alone = processor.encode(dataclasses.replace(
            sample, turns=[sample.turns[0], Turn("user", question), *exchange[1:]],
            independent_turns=False), train=True)  # fmt: skip
        rows = torch.cat([(seg == 0).nonzero().flatten(), (seg == k).nonzero().flatten()])
        assert torch.equal(packed.input_ids[rows], alone.input_ids), k
        assert torch.equal(packed.labels[rows], alone.labels), k
        assert packed.position_ids[rows].tolist() == list(range(len(alone.input_ids)))


def test_an_answer_after_the_tool_sees_its_call_and_result_and_no_other_exchange(world, processor):
    """Through a real model: perturbing the tokens of every other exchange leaves each
    exchange's logits unchanged, while perturbing its own call or its own result moves the
    answer's."""
    from visto.models import build_model
    from visto.models.llava import LlavaConfig

    config = LlavaConfig.preset("tiny")
    config = dataclasses.replace(
        config, decoder=dataclasses.replace(config.decoder, max_position_embeddings=1024)
    )
    model = build_model("llava", config, seed=0).eval()
    model.processor = processor
    sample = next(TOOLS_MIX.samples(world, "train", seed=0, epoch=0, loc_bins=LOC_BINS))
    batch = model.collate([sample])
    ids, seg, labels = batch["input_ids"][0], batch["segment_ids"][0], batch["labels"][0]

    captured = {}
    model.language_model.model.norm.register_forward_hook(lambda m, i, out: captured.update(out=out))

    def logits(new_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            model({**batch, "input_ids": new_ids[None]})
        return captured["out"][0]

    def flipped(positions: torch.Tensor) -> torch.Tensor:
        out = ids.clone()  # two ordinary ids swapped in: a different token everywhere
        out[positions] = torch.where(ids[positions] == 5, 6, 5)
        return out

    clean = logits(ids)
    n_tool = sum(len(x) == 4 for x in exchanges(sample))
    assert n_tool > 1
    for k in range(1, int(seg.max()) + 1):
        mine = (seg == k).nonzero().flatten()
        others = ((seg != k) & (seg != 0)).nonzero().flatten()
        assert torch.allclose(logits(flipped(others))[mine], clean[mine], atol=1e-5), k
        if k > n_tool:
            continue
        # the tool exchange: call (labelled), result (not), answer (labelled)
        learned = mine[labels[mine] != IGNORE_INDEX].tolist()
        gaps = [i for i in range(1, len(learned)) if learned[i] != learned[i - 1] + 1]
        assert len(gaps) == 1, "a call, then an answer"
        call = torch.tensor(learned[: gaps[0]])
        answer = torch.tensor(learned[gaps[0] :])
        result = torch.arange(int(call[-1]) + 2, int(answer[0]) - 2)  # inside <|user|>..<|end|>
        assert processor.decode(ids[result]).startswith(TOOL_RESPONSE_START)
        before = answer - 1  # the logits that predict the answer's tokens
        for part in (call[:-1], result):
            assert not torch.allclose(logits(flipped(part))[before], clean[before], atol=1e-5)


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
