"""Fine-tuning on your own images in one command: `visto train --recipe llava-lora` on a
world exported as LLaVA JSON (`visto data export`) trains LoRA adapters, scores the held-out
file before and after, and exports the model merged; from a visto or a transformers LLaVA."""

from __future__ import annotations

import json

import pytest
import torch

from test_chat import train_tiny_llava  # a tiny LLaVA that answers every question with a box
from visto.cli import main

# The recipe's settings scaled to the tiny model and a test's budget.
TINY = ["--set", "optim.lr=0.003", "--set", "batch_size=8", "--set", "max_steps=300",
        "--set", "log_every=50", "--set", "finish.eval_n=40", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """(root, starting checkpoint, train JSON, held-out JSON)."""
    root = tmp_path_factory.mktemp("lora")
    world, run = train_tiny_llava(root)
    for split, name in (("train", "train"), ("test", "heldout")):
        assert main(["data", "export", str(world), "--split", split, "--format", "llava",
                     "--out", str(root / name), "--tasks", "vqa"]) == 0  # fmt: skip
    return root, run / "checkpoint", root / "train", root / "heldout"


def data_flags(train, heldout) -> list[str]:
    return ["--set", f"data.source={train / 'data.json'}", "--set", f"data.image_root={train}",
            "--set", f"finish.eval_source={heldout / 'data.json'}",
            "--set", f"finish.eval_image_root={heldout}"]  # fmt: skip


def batch_logits(model, sample) -> torch.Tensor:
    batch = model.eval().collate([sample])
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
        logits, _ = model.language_model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"]
        )
    return logits


@pytest.mark.slow
def test_llava_lora_trains_adapters_scores_the_heldout_file_and_exports_merged(start, capsys):
    import visto
    from visto.data.formats import read_samples
    from visto.nn.lora import has_lora

    root, init, train, heldout = start
    run = root / "tuned"
    args = ["train", "--recipe", "llava-lora", "--set", f"model.init_from={init}",
            *data_flags(train, heldout), "--out", str(run), *TINY]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "held-out figures: start -> trained" in out

    # The held-out file, before and after: the start model answers every question with a
    # box (VQA 0); 300 LoRA steps on the world's questions teach it answers (the tiny model
    # learns the answers' priors: its blind twin scores as well).
    before = json.loads((run / "eval-start" / "eval.json").read_text())
    after = json.loads((run / "eval.json").read_text())
    assert before["vqa.overall"] == 0.0 and after["vqa.overall"] > 0.1
    assert "blind.vqa.overall" in after and "vqa.count" in after  # scored as the world
    assert "## Example predictions" in (run / "report.md").read_text()

    # Adapters trained, the base weights frozen as they were.
    tuned, base = visto.load(run / "checkpoint"), visto.load(init)
    assert has_lora(tuned)
    state, base_state = tuned.state_dict(), base.state_dict()
    b_norms = [state[k].norm() for k in state if "lora_B" in k]
    assert b_norms and all(n > 0 for n in b_norms)
    for key, value in state.items():
        original = key.replace(".base_layer.", ".")
        if "lora_" not in key and not key.startswith("multi_modal_projector."):
            assert torch.equal(value, base_state[original]), key

    # Exported with the adapters merged: plain weights, the same logits.
    merged = visto.load(run / "export")
    assert not has_lora(merged)
    sample = next(iter(read_samples(heldout / "data.json")))
    assert torch.allclose(batch_logits(merged, sample), batch_logits(tuned, sample), atol=1e-5)


@pytest.mark.slow
def test_llava_lora_from_a_transformers_directory_exports_one(start, capsys):
    import visto
    from visto.data.formats import read_samples
    from visto.models.transformers_format import is_transformers_dir

    root, init, train, heldout = start
    hf_start = root / "start-hf"
    assert main(["export", str(init), "--out", str(hf_start)]) == 0
    run = root / "run-hf"
    args = ["train", "--recipe", "llava-lora", "--set", f"model.init_from={hf_start}",
            *data_flags(train, heldout), "--set", "finish.eval_source=null",
            "--set", "finish.eval_image_root=null", "--set", "finish.eval_start=false",
            "--set", "finish.export=hf", "--out", str(run), *TINY, "--set", "max_steps=3"]  # fmt: skip
    assert main(args) == 0
    assert is_transformers_dir(run / "export") and not (run / "eval.json").exists()
    sample = next(iter(read_samples(heldout / "data.json")))
    exported, tuned = visto.load(run / "export"), visto.load(run / "checkpoint")
    assert torch.allclose(batch_logits(exported, sample), batch_logits(tuned, sample), atol=1e-4)


def test_bad_finish_settings_are_clear_errors(tmp_path, capsys):
    def error(*sets: str) -> str:
        args = ["train", "--recipe", "llava-lora", "--out", str(tmp_path / "r")]
        for s in sets:
            args += ["--set", s]
        assert main(args) == 2
        return capsys.readouterr().err

    assert "finish.export must be one of visto, hf or null" in error("finish.export=onnx")
    assert "finish.eval_start scores the model.init_from" in error("model.init_from=null")
    assert "finish.eval_source runs/nowhere.json does not exist" in error(
        "finish.eval_source=runs/nowhere.json"
    )
