"""`visto train --set processor.max_length=N` on a run that starts from a checkpoint
(model.init_from): the checkpoint's own processor (tokenizer, image settings) is kept and only
its truncation length changes, in training and in the saved checkpoint; nonsense values are
clear errors before anything trains."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from visto.checkpoint import load, save_checkpoint
from visto.cli import main
from visto.data.processor import Processor
from visto.data.synth import WorldConfig, generate_world
from visto.data.synth.mixes import tokenizer_texts
from visto.data.synth.tool_mix import OCR_ARGUMENTS, OCR_TOOL
from visto.data.tokenizer import train_tokenizer
from visto.data.tool_calls import tool_call_text, tools_text

START_MAX_LENGTH = 64  # shorter than any sample of the tools mix


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny world with text, and a tiny LLaVA checkpoint whose processor cuts at 64 tokens."""
    from visto.models import build_model
    from visto.models.llava import LlavaConfig

    root = tmp_path_factory.mktemp("procmax")
    world = root / "world"
    generate_world(WorldConfig(n=12, size=48, seed=3, max_objects=2, text_probability=1.0,
                               splits={"train": 0.75, "val": 0.25, "test": 0.0, "heldout": 0.0}),
                   world, workers=1)  # fmt: skip
    config = LlavaConfig.preset("tiny")
    config = dataclasses.replace(  # a tools-mix sample is ~950 tokens here
        config, decoder=dataclasses.replace(config.decoder, max_position_embeddings=1024)
    )
    processor_config = dataclasses.replace(config.processor, max_length=START_MAX_LENGTH)
    texts = [
        *tokenizer_texts(world, config.processor.loc_bins),
        tools_text([OCR_TOOL]),
        tool_call_text("ocr", OCR_ARGUMENTS),
    ]
    tokenizer = train_tokenizer(texts, vocab_size=400, loc_bins=config.processor.loc_bins,
                                min_frequency=1)  # fmt: skip
    model = build_model("llava", config, seed=0)
    model.processor = Processor(processor_config, tokenizer)
    return world, save_checkpoint(model, root / "start")


def train_args(world: Path, ckpt: Path, out: Path, *sets: str) -> list[str]:
    args = ["train", "--recipe", "llava-tools", "--out", str(out), "--no-progress"]
    for s in (f"model.init_from={json.dumps(str(ckpt))}", f"data.source={json.dumps(str(world))}",
              "max_steps=2", "batch_size=2", "log_every=1", "checkpoint_every=null",
              "data.prefetch=0", *sets):  # fmt: skip
        args += ["--set", s]
    return args


def test_max_length_overrides_the_init_from_processor_and_is_saved(start, tmp_path, capsys) -> None:
    from visto.data.synth.tool_mix import TOOLS_MIX

    world, ckpt = start
    out = tmp_path / "run"
    assert main(train_args(world, ckpt, out, "processor.max_length=1024")) == 0
    saved, base = load(out / "checkpoint"), load(ckpt)
    assert saved.processor.config.max_length == 1024
    assert json.loads((out / "checkpoint" / "processor.json").read_text())["max_length"] == 1024
    # the same processor otherwise: tokenizer and image settings are the checkpoint's
    assert (
        dataclasses.replace(saved.processor.config, max_length=START_MAX_LENGTH)
        == base.processor.config
    )
    assert saved.processor.tokenizer.encode("the red circle") == base.processor.tokenizer.encode(
        "the red circle"
    )
    card = (out / "checkpoint" / "README.md").read_text()
    assert (
        "## processor" in card
        and "| max_length | 1024 |" in card
        and "| max_length_from | recipe |" in card
    )
    assert json.loads((out / "config.json").read_text())["processor"]["max_length"] == 1024

    # what training read: a mix sample is cut at 64 by the start's processor, whole at 1024
    sample = next(TOOLS_MIX.samples(world, "train", seed=0, epoch=0, loc_bins=32))
    cut, whole = (
        base.processor.encode(sample, train=True),
        saved.processor.encode(sample, train=True),
    )
    assert cut.truncated and len(cut.input_ids) <= START_MAX_LENGTH
    assert not whole.truncated and len(whole.input_ids) > START_MAX_LENGTH

    # without the setting the checkpoint's processor is kept as it was
    out2 = tmp_path / "kept"
    assert main(train_args(world, ckpt, out2)) == 0
    assert load(out2 / "checkpoint").processor.config.max_length == START_MAX_LENGTH
    assert "| max_length_from | processor |" in (out2 / "checkpoint" / "README.md").read_text()

    # resuming with a new value changes it from there on
    assert main(["train", "--resume", str(out), "--no-progress", "--set", "max_steps=3",
                 "--set", "processor.max_length=300"]) == 0  # fmt: skip
    assert load(out / "checkpoint").processor.config.max_length == 300


@pytest.mark.parametrize(
    ("value", "says"),
    [("0", ">= 1"), ("-5", ">= 1"), ("abc", "'abc'"), ("1.5", "1.5"), ("true", "True"),
     ('"256"', "'256'"), ("4096", "longer than the 1024 positions")],
)  # fmt: skip
def test_nonsense_max_lengths_are_clear_errors(start, tmp_path, capsys, value, says) -> None:
    world, ckpt = start
    out = tmp_path / "bad"
    assert main(train_args(world, ckpt, out, f"processor.max_length={value}")) == 2
    err = capsys.readouterr().err
    assert "processor.max_length" in err and says in err and "Traceback" not in err
    assert not (out / "checkpoint").exists()
