"""The JSON answer a region connector writes from its detections (connectors/script.py), and
the pointer's script column that copies it token by token (connectors/pointer.py, copy_json):
the same words and tokens as the world's answer, a cursor that follows the answer written
(and finds its place again after a token of its own), and a LLaVA that writes a JSON answer
with a colour it never wrote in training, on every generation path."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from visto.connectors.named import KINDS, VALUES
from visto.connectors.pointer import advance_cursor, script_cursors, script_token
from visto.connectors.projector import ProjectorConfig
from visto.connectors.regions import COLOUR_NAMES, SHAPE_NAMES
from visto.connectors.script import detected_json
from visto.data.synth.tasks import json_target
from visto.data.tokenizer import train_tokenizer, with_focus_token
from visto.errors import UserError
from visto.models.llava import LlavaConfig
from visto.pretrained import build_model


def attributes_of(shape: str, colour: str, size: str) -> torch.Tensor:
    out, at = torch.zeros(VALUES), 0
    for kind, value in (("shape", shape), ("colour", colour), ("size", size)):
        out[at + KINDS[kind].index(value)] = 1.0
        at += len(KINDS[kind])
    return out


def test_detections_write_the_worlds_json_answer():
    truth = {
        "objects": [
            {"shape": "star", "colour": "red", "size": "large", "box": [70, 10, 120, 60], "box_norm": [545, 78, 936, 468]},
            {"shape": "circle", "colour": "blue", "size": "small", "box": [5, 40, 30, 65], "box_norm": [39, 312, 234, 507]},
        ],
        "counts": {"circle": 1, "star": 1},
        "texts": [{"text": "MOON"}, {"text": "42"}],
    }  # fmt: skip
    answer = json.dumps(json_target(truth), separators=(",", ":"))
    attributes = torch.stack([attributes_of("star", "red", "large"), attributes_of("circle", "blue", "small"),
                              attributes_of("cross", "green", "medium")])  # fmt: skip
    boxes = torch.tensor([o["box_norm"] for o in truth["objects"]] + [[0, 0, 10, 10]]) / 999
    present = torch.tensor([True, True, False])  # the third slot is empty: not written
    assert detected_json(attributes, boxes, present, ["MOON", "42"]) == answer
    assert json.loads(answer)["objects"][0]["shape"] == "circle"  # left to right, as the world lists them
    nothing = detected_json(attributes, boxes, torch.zeros(3, dtype=torch.bool), [])
    assert json.loads(nothing) == {"objects": [], "counts": {}, "text": []}


def test_the_cursor_follows_the_answer_and_finds_its_place_after_a_token_of_its_own():
    script = torch.tensor([[10, 11, 12, 13, 14, 2, -1]])  # 2: the end token
    # written: <|assistant|> (99), 10, 11, then 50 51 where the script has 12 (a number of
    # another length), then 13 (found again), 14, end
    written = torch.tensor([[99, 10, 11, 50, 51, 13, 14, 2]])
    cursors = script_cursors(script, written, torch.ones_like(written, dtype=torch.bool))
    assert cursors.tolist() == [[0, 1, 2, 2, 2, 4, 5, 6]]
    offered = script_token(script.expand(8, -1), cursors[0])
    assert offered.tolist() == [10, 11, 12, 12, 12, 14, 2, -1]  # past the end: nothing
    # a token nowhere ahead within the window leaves the cursor; -1 (padding) never moves it
    assert advance_cursor(script, torch.tensor([1]), torch.tensor([77])).tolist() == [1]
    assert advance_cursor(script, torch.tensor([5]), torch.tensor([-1])).tolist() == [5]
    # padding positions of an answer (real False) leave the cursor where it is
    real = torch.tensor([[True, True, False, True]])
    assert script_cursors(script, torch.tensor([[99, 10, 11, 11]]), real).tolist() == [[0, 1, 1, 2]]


def test_config_refuses_copy_json_without_a_pointer_and_the_default_paths_switch_it_on():
    with pytest.raises(UserError, match="copy_json needs pointer"):
        ProjectorConfig(kind="regions", slots=2, focus=True, copy_json=True)
    from visto.quickstart import QuickstartConfig, llava_config
    from visto.train.recipe import load_recipe

    assert llava_config(QuickstartConfig(), vocab_size=1024).projector.copy_json  # quickstart
    assert not llava_config(QuickstartConfig(pointer=False), vocab_size=1024).projector.copy_json
    assert load_recipe("compare-llava").model.config["projector"]["copy_json"]  # compare's LLaVA
    assert not ProjectorConfig().copy_json  # checkpoints from before the setting


QUESTION = "Describe the image as JSON with the keys objects, counts and text."
COLOURS = {(200, 30, 30): "red", (30, 30, 200): "blue", (30, 200, 30): "green"}


def star_json(colour: str) -> str:
    truth = {"objects": [{"shape": "star", "colour": colour, "size": "medium", "box": [100, 100, 500, 500],
                          "box_norm": [100, 100, 500, 500]}], "counts": {"star": 1}, "texts": []}  # fmt: skip
    return json.dumps(json_target(truth), separators=(",", ":"))


def test_llava_writes_a_json_answer_with_a_colour_it_never_wrote_in_training(tmp_path):
    """copy_json end to end: trained (the pointer head only) to answer the JSON question on
    images whose detector sees a red or a blue star, the model writes the whole JSON answer of
    a green star, a colour it never wrote, by copying the connector's script; the engine's
    fast path, its generic path, continuous batching and a reloaded checkpoint agree."""
    from visto.checkpoint import load, save_checkpoint
    from visto.data.processor import Processor
    from visto.data.sample import Sample, Turn
    from visto.infer.continuous import ContinuousBatch
    from visto.infer.engine import Engine
    from visto.infer.sampling import SamplingParams

    texts = [star_json(c) for c in COLOURS.values()] * 5 + [QUESTION] * 5 + list(COLOUR_NAMES) + list(SHAPE_NAMES)
    tok = with_focus_token(train_tokenizer(texts, vocab_size=400, loc_bins=32, min_frequency=1))
    projector = ProjectorConfig(kind="regions", slots=2, focus=True, pointer=True, copy_json=True)
    config = LlavaConfig.preset("tiny", projector=projector)
    config.processor.image_tokens, config.processor.focus_tokens, config.processor.loc_bins = 2, 4, 32
    config.processor.vocab_size = config.decoder.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = build_model("llava", config, seed=0)
    model.processor = Processor(config.processor, tok)
    images = {c: Image.new("RGB", (32, 32), c) for c in COLOURS}

    def ask(c, answer=None):
        turns = [Turn("user", f"<image>\n{QUESTION}")] + ([Turn("assistant", answer)] if answer else [])
        return Sample("s", [images[c]], turns)

    with torch.no_grad():
        seen = {c: model.patch_features(model.collate([ask(c)])["pixel_values"])[0] for c in COLOURS}

    def heads(features):  # a detector that sees one medium star of the image's colour
        B, N, _ = features.shape
        out = {"centre": torch.full((B, N), -10.0), "centre_shape": torch.zeros(B, N, 8), "colour": torch.zeros(B, N, 9),
               "size": torch.zeros(B, N, 4), "box": torch.full((B, N, 4), 0.5)}  # fmt: skip
        for b in range(B):
            c = min(seen, key=lambda c: float((seen[c] - features[b]).abs().sum()))
            out["centre"][b, 0] = 10.0
            out["centre_shape"][b, 0, 1 + SHAPE_NAMES.index("star")] = 10.0
            out["colour"][b, 0, 1 + COLOUR_NAMES.index(COLOURS[c])] = 10.0
            out["size"][b, 0, 1 + 1] = 10.0
            out["box"][b, 0] = torch.tensor([100, 100, 500, 500]) / 999
        return out

    model.multi_modal_projector.heads.forward = heads
    batch = model.collate([ask((200, 30, 30), star_json("red")), ask((30, 30, 200), star_json("blue"))])
    from visto.losses import answer_loss

    # the loss on the scored positions only (Llava.forward) is the loss over every position
    assert torch.allclose(model(batch)["loss"], answer_loss(model.answer_logits(batch), batch["labels"])["loss"])
    opt = torch.optim.AdamW(model.pointer.parameters(), lr=3e-2)
    for _ in range(40):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["token_acc"] == 1.0 and model.pointer.script_key.grad is not None
    model.eval()
    budget = SamplingParams(max_new_tokens=80, temperature=0.0)
    prompts = model.prompt_batch([ask(c) for c in COLOURS])
    fast = Engine(model, tok).generate_batch(prompts, budget)
    assert [c.text for c in fast] == [star_json(c) for c in COLOURS.values()]  # green too
    generic = Engine(model, tok, fast=False).generate_batch(prompts, budget)
    assert [c.token_ids for c in generic] == [c.token_ids for c in fast]
    # rows that join a running batch carry their own cursors
    running = ContinuousBatch(Engine(model, tok))
    first = running.add(model.prompt_batch([ask((200, 30, 30))]), [budget])
    for _ in range(3):
        running.step()
    second = running.add(model.prompt_batch([ask((30, 200, 30))]), [budget])
    while running.busy:
        running.step()
    assert [first[0].completion.token_ids, second[0].completion.token_ids] == [fast[0].token_ids, fast[2].token_ids]
    # without the script column, the same weights do not write the green star's answer
    key = model.pointer.script_key
    model.pointer.script_key = None
    green = model.prompt_batch([ask((30, 200, 30))])
    assert Engine(model, tok).generate_batch(green, budget)[0].text != star_json("green")
    model.pointer.script_key = key

    save_checkpoint(model, tmp_path / "ckpt")
    again = load(tmp_path / "ckpt")
    assert again.config.projector.copy_json and again.pointer.script_key is not None
    again.multi_modal_projector.heads.forward = heads
    assert [c.token_ids for c in Engine(again, tok).generate_batch(prompts, budget)] == [c.token_ids for c in fast]
