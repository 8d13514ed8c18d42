"""`visto export CKPT --out DIR`: transformers loads what it writes and computes our logits;
what cannot be exported is refused with the part and what to do instead."""

from __future__ import annotations

import pytest
import torch
import transformers  # a hard dependency: a broken install fails here, not skips

from visto.checkpoint import save_checkpoint
from visto.cli import main
from visto.data.sample import Sample, Turn
from visto.data.tokenizer import train_tokenizer
from visto.models import build_model
from visto.models.llava import LlavaConfig
from visto.nn.lora import LoraConfig, apply_lora
from visto.nn.vision import ViTConfig


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    texts = ["What colour?", "red", "blue", "Describe it.", "a red square"] * 4
    train_tokenizer(texts, vocab_size=400, loc_bins=32, min_frequency=1).save(
        path / "tokenizer.json"
    )
    return path


def tiny_llava(tokenizer_dir, **overrides):
    config = LlavaConfig.preset("tiny", tokenizer_dir=str(tokenizer_dir), **overrides)
    model = build_model("llava", config, seed=0).eval()
    with torch.no_grad():  # non-zero biases and gains, so a dropped tensor would show
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "layernorm.weight")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_export_with_lora_merged_gives_our_logits_in_transformers(tokenizer_dir, tmp_path, capsys):
    model = tiny_llava(tokenizer_dir)
    apply_lora(model, LoraConfig(rank=2, targets=["q_proj", "v_proj"]))
    with torch.no_grad():  # trained-looking adapters: the export must fold them in
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    save_checkpoint(model, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert "AutoModelForImageTextToText" in capsys.readouterr().out

    from PIL import Image

    import visto

    ours = visto.load(tmp_path / "ckpt")  # adapters re-applied, unmerged
    theirs = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    sample = Sample("a", [Image.new("RGB", (40, 30), (200, 40, 40))],
                    [Turn("user", "<image>\nWhat colour?"), Turn("assistant", "red")])  # fmt: skip
    batch = ours.collate([sample])
    with torch.no_grad():
        logits, _ = ours.language_model(
            inputs_embeds=ours.embed_inputs(batch["input_ids"], batch["pixel_values"]),
            attention_mask=batch["attention_mask"],
        )
        hf_logits = theirs(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits  # fmt: skip
    assert (logits - hf_logits).abs().max() < 1e-4
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.tokenizer.image_token == "<image>"


def test_the_conv_stem_is_refused_with_what_to_do(tokenizer_dir, tmp_path, capsys):
    model = tiny_llava(tokenizer_dir, vision=ViTConfig.preset("tiny", stem="conv"))
    save_checkpoint(model, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"), "--remote-code", "never"]) == 2
    err = capsys.readouterr().err
    # A patch stem alone does not make the quickstart's model export (its connector has no
    # counterpart either: tests/test_export_quickstart.py), so the quickstart is not offered.
    assert "conv stem" in err and "vision.stem 'patch'" in " ".join(err.split())
    assert "--vision-stem patch" not in err
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_families_without_an_export_and_bad_paths(tokenizer_dir, tmp_path, capsys):
    from visto.models.clip import CLIPConfig

    save_checkpoint(build_model("clip", CLIPConfig.preset("tiny")), tmp_path / "clip")
    assert main(["export", str(tmp_path / "clip"), "--out", str(tmp_path / "x")]) == 2
    assert "no transformers export for 'clip' models; it exports blip2, flamingo, fuyu, llava" in capsys.readouterr().err

    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err

    save_checkpoint(tiny_llava(tokenizer_dir), tmp_path / "llava")
    (tmp_path / "taken").mkdir()
    args = ["export", str(tmp_path / "llava"), "--out", str(tmp_path / "taken")]
    assert main(args) == 2
    assert "already exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main(["export", str(tmp_path / "taken"), "--out", str(tmp_path / "y")]) == 2
    assert "already a transformers directory" in capsys.readouterr().err


def test_export_format_visto_merges_lora_into_a_visto_checkpoint(tokenizer_dir, tmp_path, capsys):
    import visto
    from visto.nn.lora import has_lora

    model = tiny_llava(tokenizer_dir)
    apply_lora(model, LoraConfig(rank=2, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    save_checkpoint(model, tmp_path / "ckpt")
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(out), "--format", "visto"]) == 0
    assert "LoRA merged" in capsys.readouterr().out
    ours, merged = visto.load(tmp_path / "ckpt"), visto.load(tmp_path / "merged")
    assert has_lora(ours) and not has_lora(merged)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        a, _ = ours.language_model(input_ids=ids)
        b, _ = merged.language_model(input_ids=ids)
    assert (a - b).abs().max() < 1e-5
