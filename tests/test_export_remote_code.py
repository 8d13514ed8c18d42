"""`visto export` of a model no transformers class computes (the quickstart's: regions
connector with question focus, named words, pointer head, read slots and OCR reader; conv
stem): a transformers directory with custom code (config.json's auto_map, modeling_visto.py
beside the weights) that `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`
loads offline, whose forward equals what visto's engine samples from and whose greedy
`generate` gives visto's tokens. Built at a test's size as the quickstart builds its model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from test_cli_export import tiny_llava, tokenizer_dir  # noqa: F401 (a fixture)
from test_export_quickstart import quickstart_model
from visto.checkpoint import load, read_config, save_checkpoint
from visto.cli import main
from visto.data.sample import Sample, Turn
from visto.infer.engine import Engine
from visto.infer.sampling import SamplingParams
from visto.nn.lora import LoraConfig, apply_lora

transformers = pytest.importorskip("transformers")

COLOURS = [(200, 30, 30), (30, 30, 200), (30, 200, 30)]
QUESTIONS = ["What colour?", "Describe it.", "What colour? Describe it. red blue"]


def samples():
    """Three prompts of different lengths (left padding), each with its own image."""
    out = []
    for i, (colour, question) in enumerate(zip(COLOURS, QUESTIONS, strict=True)):
        image = Image.new("RGB", (32, 32), (20, 20, 20))
        image.paste(Image.new("RGB", (12 + 4 * i, 10), colour), (4 + 3 * i, 8))
        out.append(Sample(str(i), [image], [Turn("user", "<image>\n" + question)]))
    return out


def noisy(model):
    """Weights away from their initialisation, so the pointer's copies, the focus and every
    part change the numbers (a part the export dropped would show)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        pointer = model.pointer
        pointer.query.weight.mul_(20)  # copies compete with the vocabulary
    return model.eval()


@pytest.fixture(scope="module")
def exported(tokenizer_dir, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("remote")
    model = noisy(quickstart_model(tokenizer_dir, tmp / "tok"))
    model.prefill(model.prompt_batch(samples()))  # as a trained one: the focus's lookup filled
    assert model.multi_modal_projector.focus.lookup.shape[0] > 0
    save_checkpoint(model, tmp / "ckpt")
    return tmp


def load_hf(directory, auto="AutoModelForCausalLM"):
    return getattr(transformers, auto).from_pretrained(str(directory), trust_remote_code=True,
                                                       local_files_only=True)  # fmt: skip


def engine_tokens(model, batch, n=10, fast=True):
    greedy = SamplingParams(max_new_tokens=n, temperature=0.0)
    return [list(c.token_ids) for c in Engine(model, model.processor.tokenizer, fast=fast).generate_batch(batch, greedy)]


def test_the_quickstarts_model_exports_with_custom_code_by_default(exported, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = exported / "hf"
    assert main(["export", str(exported / "ckpt"), "--out", str(out)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "custom code" in said and "trust_remote_code=True" in said and "vLLM does not serve it" in said
    assert "regions connector" in said and "conv stem" in said  # why no native class
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "visto" and config["visto"]["family"] == "llava"
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModelForCausalLM", "AutoModelForImageTextToText"}
    for name in ("modeling_visto.py", "configuration_visto.py", "processing_visto.py", "model.safetensors",
                 "tokenizer.json", "tokenizer_config.json", "processor.json", "processor_config.json"):  # fmt: skip
        assert (out / name).is_file(), name
    # The directory stands alone: moved elsewhere, with the checkpoint gone, it still loads.
    moved = exported / "moved"
    shutil.copytree(out, moved)
    for auto in ("AutoModelForCausalLM", "AutoModel", "AutoModelForImageTextToText"):
        assert type(load_hf(moved, auto)).__name__ == "VistoForConditionalGeneration"
    # visto reads it back too (visto.load, and so chat, serve, eval), with the same numbers
    assert read_config(moved)["family"] == "llava"
    again, model = load(moved), load(exported / "ckpt")
    batch = model.prompt_batch(samples())
    assert torch.equal(again.prefill(batch)[0], model.prefill(batch)[0])
    assert main(["export", str(moved), "--out", str(exported / "again")]) == 2  # already exported


def test_its_logits_are_what_the_engine_samples_from_and_generate_gives_its_tokens(exported, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = exported / "hf2"
    assert main(["export", str(exported / "ckpt"), "--out", str(out)]) == 0
    model = load(exported / "ckpt")
    hf = load_hf(out)
    processor = transformers.AutoProcessor.from_pretrained(str(out), trust_remote_code=True)
    prompts = samples()
    batch = model.prompt_batch(prompts)
    inputs = processor(images=[s.images[0] for s in prompts], text=QUESTIONS)
    assert torch.equal(inputs["input_ids"], batch.input_ids)  # the same prompts, left padded
    assert torch.equal(inputs["pixel_values"], batch.pixel_values)
    assert (batch.attention_mask == 0).any()  # padding exercised

    with torch.no_grad():
        logits = hf(**inputs).logits
    first, _ = model.prefill(batch)
    assert (logits[:, -1] - first).abs().max() < 1e-4
    answers = engine_tokens(model, batch)
    assert answers == engine_tokens(model, batch, fast=False)
    assert len({tuple(a) for a in answers}) > 1  # the images make a difference

    plain = 0.0
    for sample, answer in zip(prompts, answers, strict=True):
        one = model.prompt_batch([sample])
        ids = torch.cat([one.input_ids, torch.tensor([answer])], 1)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            full = hf(input_ids=ids, pixel_values=one.pixel_values, attention_mask=mask).logits[0]
            ref = model.answer_logits({"input_ids": ids, "labels": ids, "attention_mask": mask,
                                       "pixel_values": one.pixel_values})[0]  # fmt: skip
            hidden, _ = model.language_model(inputs_embeds=model.embed_inputs(ids, one.pixel_values),
                                             attention_mask=mask, head=False)  # fmt: skip
            head = model.language_model.lm_head(hidden[0]).log_softmax(-1)
        assert (full[:-1] - ref[:-1]).abs().max() < 1e-4  # visto's forward, teacher forced
        # ... and the engine, step by step over the answer it generated
        n = one.input_ids.shape[1]
        step, state = model.prefill(one)
        assert (full[n - 1] - step[0]).abs().max() < 1e-4
        for i, token in enumerate(answer[:-1]):
            step, state = model.decode_step(torch.tensor([token]), state)
            assert (full[n + i] - step[0]).abs().max() < 1e-4
        plain = max(plain, float((full[n - 1:] - head[n - 1:]).abs().max()))
    assert plain > 1e-2  # the pointer's copies are in these logits: the decoder's alone differ

    with torch.no_grad():
        generated = hf.generate(**inputs, max_new_tokens=10, do_sample=False)
    P = inputs["input_ids"].shape[1]
    end = set(hf.generation_config.eos_token_id)
    for row, answer in enumerate(answers):
        ours = generated[row, P:].tolist()
        cut = next((i + 1 for i, t in enumerate(ours) if t in end), len(ours))
        assert ours[:cut] == answer
    assert processor.batch_decode(generated[:, P:])[0] == model.processor.tokenizer.decode(answers[0], skip_special=True)

    # save_pretrained (the tied head written once) and load again: the same numbers
    hf.save_pretrained(exported / "resaved")
    processor.save_pretrained(exported / "resaved")
    again = load_hf(exported / "resaved")
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, logits)
    assert torch.equal(load(exported / "resaved").prefill(batch)[0], first)  # and visto reads it


def test_remote_code_never_keeps_the_refusal(exported, capsys):
    assert main(["export", str(exported / "ckpt"), "--out", str(exported / "no"), "--remote-code", "never"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "its connector is visto's regions connector" in err and "--remote-code never" in err
    assert not (exported / "no").exists()
    assert main(["export", str(exported / "ckpt"), "--out", str(exported / "x"), "--int8",
                 "--remote-code", "always"]) == 2  # fmt: skip


def test_a_plain_llava_stays_native_unless_custom_code_is_asked_for(tokenizer_dir, tmp_path, capsys):  # noqa: F811
    model = tiny_llava(tokenizer_dir)
    save_checkpoint(model, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "native")]) == 0
    assert json.loads((tmp_path / "native" / "config.json").read_text())["model_type"] == "llava"
    assert "custom code" not in capsys.readouterr().out
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "remote"), "--remote-code", "always"]) == 0
    assert json.loads((tmp_path / "remote" / "config.json").read_text())["model_type"] == "visto"
    hf = load_hf(tmp_path / "remote")
    batch = model.prompt_batch(samples()[:2])
    with torch.no_grad():
        ours = hf(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask).logits
    first, _ = model.prefill(batch)
    assert (ours[:, -1] - first).abs().max() < 1e-4


def test_lora_adapters_are_merged_into_the_custom_code_export(tokenizer_dir, tmp_path):  # noqa: F811
    model = noisy(quickstart_model(tokenizer_dir, tmp_path / "tok"))
    apply_lora(model, LoraConfig(rank=2, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    save_checkpoint(model, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    hf = load_hf(tmp_path / "hf")
    assert not any("lora" in k for k in hf.state_dict())
    model = load(tmp_path / "ckpt")
    batch = model.prompt_batch(samples())
    with torch.no_grad():
        ours = hf(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                  attention_mask=batch.attention_mask, image_sample_index=batch.image_sample_index).logits  # fmt: skip
    first, _ = model.prefill(batch)
    assert (ours[:, -1] - first).abs().max() < 1e-4
