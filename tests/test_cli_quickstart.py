"""`visto quickstart`'s options are QuickstartConfig's fields: names, types and defaults come
from the dataclass (the pipeline itself is tested in test_quickstart.py)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from visto.cli import build_parser, main
from visto.commands.quickstart import OPTIONS, config_from_args
from visto.quickstart import QuickstartConfig

# Every flag the command had when its defaults were written by hand, and those added since:
# none may go or be renamed.
FLAGS = [
    "--out", "--vision-steps", "--box-tokens", "--text-slots", "--focus", "--no-focus", "--focus-slots",
    "--read-slots", "--pointer", "--no-pointer", "--named", "--no-named", "--box-nms", "--count-width", "--object-order", "--copy-answers", "--no-copy-answers", "--copy-verdicts", "--no-copy-verdicts", "--question-pointer", "--no-question-pointer", "--copy-json", "--no-copy-json", "--detector-json-boxes", "--no-detector-json-boxes", "--reader-steps", "--stage1-steps",
    "--stage2-steps", "--minutes", "--n", "--size", "--seed", "--workers", "--threads",
    "--eval-images", "--stage1-mix", "--stage1-batch", "--stage2-batch", "--vision-stem",
    "--vision-batch", "--until", "--fresh",
]  # fmt: skip


def quickstart_parser():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["quickstart"]


def test_every_flag_keeps_its_name():
    flags = [s for a in quickstart_parser()._actions for s in a.option_strings if s.startswith("--")]
    assert flags == ["--help", *FLAGS]


def test_no_flags_give_the_config_defaults():
    assert config_from_args(build_parser().parse_args(["quickstart"])) == QuickstartConfig()


def test_each_flag_sets_its_field():
    defaults = QuickstartConfig()
    argv, want = ["quickstart"], {}
    for name in OPTIONS:
        default, flag = getattr(defaults, name), "--" + name.replace("_", "-")
        if isinstance(default, bool):  # a switch: --name turns it on, --no-name off
            argv.append(flag if not default else "--no-" + name.replace("_", "-"))
            want[name] = not default
        elif isinstance(default, str):
            argv += [flag, default + "x"]
            want[name] = default + "x"
        else:  # int, or float | None (minutes)
            value = 2.5 if default is None or isinstance(default, float) else default + 3
            if name == "focus_slots":
                value = 0  # the one other layout it takes
            argv += [flag, str(value)]
            want[name] = value
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg == dataclasses.replace(defaults, **want)
    assert all(getattr(cfg, name) != getattr(defaults, name) for name in OPTIONS)


def test_help_shows_the_config_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line an option
    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    text = capsys.readouterr().out
    cfg = QuickstartConfig()
    for name in ("vision_steps", "reader_steps", "stage1_steps", "stage2_steps", "n", "size",
                 "eval_images", "stage1_batch", "vision_batch"):  # fmt: skip
        assert f"(default {getattr(cfg, name)})" in text, name
    assert f"the defaults are {cfg.vision_steps:,} + {cfg.stage1_steps:,} + {cfg.stage2_steps:,}" in text
    assert f"split {cfg.vision_share:.0%} vision" in text  # --minutes: the shares of the cap
    assert "--stage1-mix MIX" in text and "--vision-stem {patch,conv}" in text
