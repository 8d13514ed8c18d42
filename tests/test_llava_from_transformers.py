"""A LLaVA saved by transformers (`LlavaForConditionalGeneration.save_pretrained`) opens with
`visto.load`, as `model.init_from` and as `vision_init`: transformers' logits (< 1e-4) and
greedy tokens; a directory visto cannot reproduce exactly is a clear error."""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # a hard dependency: a broken install fails here, not skips
from PIL import Image

import visto
from visto.data.sample import Sample, Turn
from visto.data.tokenizer import train_tokenizer
from visto.errors import UserError
from visto.infer import Engine, SamplingParams
from visto.models.llava import Llava, LlavaConfig
from visto.pretrained import build_model

TEXTS = ["What colour is the square?", "red", "blue", "Describe the image.", "a red square"] * 5


def save_hf_llava(directory, tokenizer=None, **overrides):
    """A tiny random transformers LLaVA (weights widened, biases non-zero: a tensor loaded
    into the wrong place shows), saved by transformers itself with a visto tokenizer."""
    vocab = tokenizer.vocab_size if tokenizer else 300
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )  # fmt: skip (hidden_act: CLIP's default quick_gelu)
    text = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    settings = dict(image_token_index=3, image_seq_length=16, vision_feature_layer=-2)
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, **{**settings, **overrides}
    )
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            scale = 0.08 if p.ndim == 2 else 0.1
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.to_hf_tokenizer().save_pretrained(str(directory))
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "llava"
    tokenizer = train_tokenizer(TEXTS, vocab_size=300, loc_bins=8, min_frequency=1)
    hf = save_hf_llava(directory, tokenizer)
    return directory, hf


def samples() -> list[Sample]:
    red = Image.new("RGB", (40, 40), (220, 30, 30))
    red.paste((30, 30, 220), (5, 5, 20, 20))
    blue = Image.new("RGB", (48, 32), (30, 40, 220))
    return [
        Sample(
            "a",
            [red],
            [Turn("user", "<image>\nWhat colour is the square?"), Turn("assistant", "red")],
        ),
        Sample(
            "b", [blue], [Turn("user", "<image>\nDescribe the image."), Turn("assistant", "blue")]
        ),
    ]


def test_visto_load_gives_transformers_logits_and_greedy_tokens(hf_dir):
    directory, hf = hf_dir
    ours = visto.load(directory)
    assert isinstance(ours, Llava) and ours.config.vision.act == "quick_gelu"
    batch = ours.collate(samples())
    with torch.no_grad():
        logits, _ = ours.language_model(
            inputs_embeds=ours.embed_inputs(batch["input_ids"], batch["pixel_values"]),
            attention_mask=batch["attention_mask"],
        )
        theirs = hf(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits  # fmt: skip
    real = batch["attention_mask"].bool()
    assert (logits[real] - theirs[real]).abs().max() < 1e-4

    prompts = [Sample(s.id, s.images, s.turns[:1]) for s in samples()]
    engine = Engine(ours, ours.processor.tokenizer, eos_token_ids=[])
    prompt = ours.prompt_batch(prompts)
    done = engine.generate_batch(prompt, SamplingParams(max_new_tokens=8))
    with torch.no_grad():
        out = hf.generate(
            input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
            pixel_values=prompt.pixel_values, max_new_tokens=8, min_new_tokens=8,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    assert [c.token_ids for c in done] == out[:, prompt.input_ids.shape[1] :].tolist()


def test_chat_cli_answers_with_a_transformers_directory(hf_dir, tmp_path, capsys):
    from visto.cli import main

    directory, _ = hf_dir
    samples()[0].images[0].save(tmp_path / "scene.png")
    args = [
        "chat",
        "--model",
        str(directory),
        str(tmp_path / "scene.png"),
        "What colour is the square?",
    ]
    assert main([*args, "--max-tokens", "4", "--json"]) == 0
    assert "answer" in capsys.readouterr().out


def test_as_vision_init_and_init_from(hf_dir, tmp_path):
    from visto.cli import main
    from visto.data.formats import write_samples

    directory, hf = hf_dir
    tower = build_model("llava", LlavaConfig.preset("tiny", vision_init=str(directory), vision_feature_layer=-2))
    ours, theirs = tower.vision_tower.state_dict(), hf.model.vision_tower.state_dict()
    assert set(ours) == set(theirs) - {"embeddings.position_ids"}
    assert all(torch.equal(value, theirs[key]) for key, value in ours.items())

    write_samples(samples() * 4, tmp_path / "data", "llava")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({
        "model": {"family": "llava", "init_from": str(directory)},
        "data": {"source": str(tmp_path / "data")},
        "batch_size": 4, "max_steps": 2, "log_every": 1, "eval_every": None, "num_threads": 1,
    }))  # fmt: skip
    run = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--out", str(run), "--no-progress"]) == 0
    trained = visto.load(run / "checkpoint")
    assert trained.family == "llava" and trained.processor.tokenizer.vocab_size == 300


def test_what_visto_cannot_reproduce_is_named(tmp_path):
    save_hf_llava(
        tmp_path / "other_id", image_token_index=32, vision_feature_select_strategy="full"
    )
    with pytest.raises(UserError) as e:
        visto.load(tmp_path / "other_id")
    assert "image_token_index 32" in str(e.value) and "'full'" in str(e.value)

    decoder = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2)
    )  # fmt: skip
    decoder.save_pretrained(tmp_path / "llama")
    with pytest.raises(UserError, match="transformers 'llama' model; visto reads .*llava"):
        visto.load(tmp_path / "llama")
    with pytest.raises(
        UserError, match="vision_init reads a visto checkpoint or a transformers CLIP, SigLIP or LLaVA"
    ):
        build_model("llava", LlavaConfig.preset("tiny", vision_init=str(tmp_path / "llama")))


def test_tensors_that_do_not_match_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "llava"
    save_hf_llava(directory)
    weights = load_file(str(directory / "model.safetensors"))
    dropped = next(k for k in weights if k.endswith("linear_2.bias"))
    del weights[dropped]
    weights["multi_modal_projector.extra.weight"] = torch.zeros(2)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96  # the files hold 128-wide MLPs
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        visto.load(directory)
    message = str(e.value)
    assert "does not match the model its config.json describes" in message
    assert "1 tensor(s) missing, e.g. multi_modal_projector.linear_2.bias" in message
    assert "not read by visto, e.g. multi_modal_projector.extra.weight" in message
    assert (
        "of another shape" in message
        and "mlp.up_proj.weight (128, 64) (visto expects (96, 64))" in message
    )


def test_visto_load_reads_the_other_transformers_families_it_converts(tmp_path):
    from test_fuyu_hf import save_tiny_fuyu

    save_tiny_fuyu(tmp_path / "fuyu")
    assert visto.load(tmp_path / "fuyu").family == "fuyu"


def test_read_config_names_the_family_of_a_transformers_directory(hf_dir):
    from visto.checkpoint import read_config

    meta = read_config(hf_dir[0])
    assert meta["family"] == "llava" and meta["transformers"] and meta["config"]["model_type"] == "llava"


@pytest.mark.slow
def test_eval_cli_takes_a_transformers_directory(hf_dir, tmp_path):
    from visto.cli import main

    world = tmp_path / "world"
    assert main(["data", "synth", "--out", str(world), "--n", "12", "--workers", "1", "--size", "48"]) == 0
    out = tmp_path / "eval"
    args = ["eval", "--model", str(hf_dir[0]), "--data", str(world), "--n", "2", "--out", str(out)]
    assert main(args) == 0
    assert json.loads((out / "eval.json").read_text())
