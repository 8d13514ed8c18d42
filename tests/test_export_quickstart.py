"""The quickstart's model has no native transformers export, whatever its flags: `visto export
--remote-code never` says which parts transformers' LlavaForConditionalGeneration has no
counterpart for (the regions connector with its focus, named words and pointer; a conv stem),
writes nothing, and names what does export. (By default it is exported with custom code
instead: tests/test_export_remote_code.py.) Built as the quickstart builds it
(`quickstart.llava_config`)."""

from __future__ import annotations

import dataclasses

import pytest

from test_cli_export import tiny_llava, tokenizer_dir  # noqa: F401 (a fixture)
from visto.checkpoint import save_checkpoint
from visto.cli import main
from visto.connectors.projector import ProjectorConfig
from visto.data.tokenizer import Tokenizer, with_focus_token
from visto.models import build_model
from visto.nn.vision import ViTConfig
from visto.quickstart import QuickstartConfig, llava_config


def quickstart_model(tokenizer_dir, out, **flags):  # noqa: F811
    """A LLaVA of the quickstart's layout at a test's size (its connector, focus, slots), with
    the test tokenizer plus `<focus>` as the quickstart gives it (`with_focus_token`)."""
    tokenizer = with_focus_token(Tokenizer.load(tokenizer_dir / "tokenizer.json"))
    out.mkdir()
    tokenizer.save(out / "tokenizer.json")
    cfg = QuickstartConfig(size=32, vision_width=32, vision_layers=1, decoder_width=32,
                           decoder_layers=1, vocab_size=400, loc_bins=32, **flags)  # fmt: skip
    config = llava_config(cfg, 400)  # the decoder's vocabulary holds the tokenizer's
    config = dataclasses.replace(config, tokenizer_dir=str(out))
    return build_model("llava", config, seed=0)


@pytest.mark.parametrize("stem", ["conv", "patch"])
def test_the_quickstarts_model_is_refused_with_each_part_and_what_exports(
    tokenizer_dir,  # noqa: F811
    tmp_path,
    capsys,
    stem,
):
    model = quickstart_model(tokenizer_dir, tmp_path / "tok", vision_stem=stem)
    assert model.config.projector.kind == "regions" and model.config.projector.pointer
    save_checkpoint(model, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--remote-code", "never"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "its connector is visto's regions connector" in err
    assert "the question focus, named words (filter, count, relate), a pointer head" in err
    assert ("conv stem" in err) == (stem == "conv")  # the patch stem is no part of the problem
    assert "This is the model `visto quickstart` trains, whatever its flags" in err
    assert "visto export --format visto" in err and "projector kind 'mlp'" in err
    assert "--vision-stem patch" not in err  # a patch stem alone does not make it export
    assert not (tmp_path / "hf").exists()  # nothing half-written
    # What the message offers instead works: a visto checkpoint.
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "v"), "--format", "visto"]) == 0


def test_a_conv_stem_alone_is_named_with_the_setting_that_exports(tokenizer_dir, tmp_path, capsys):  # noqa: F811
    model = tiny_llava(tokenizer_dir, vision=ViTConfig.preset("tiny", stem="conv"))
    save_checkpoint(model, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--remote-code", "never"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "its vision tower has a conv stem" in err and "vision.stem 'patch'" in err
    assert "regions connector" not in err and "visto quickstart" not in err
    # The same model with a patch stem exports (tests/test_cli_export.py checks its logits).
    save_checkpoint(tiny_llava(tokenizer_dir), tmp_path / "patch")
    assert main(["export", str(tmp_path / "patch"), "--out", str(tmp_path / "hf")]) == 0


def test_a_regions_connector_without_focus_is_refused_too(tokenizer_dir, tmp_path, capsys):  # noqa: F811
    model = tiny_llava(tokenizer_dir)
    config = dataclasses.replace(
        model.config, projector=ProjectorConfig(kind="regions", slots=4),
        processor=dataclasses.replace(model.config.processor, image_tokens=4),
    )  # fmt: skip
    model = build_model("llava", config, seed=0)
    save_checkpoint(model, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--remote-code", "never"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "writes each object as the decoder's own words), where" in err  # no focus named
