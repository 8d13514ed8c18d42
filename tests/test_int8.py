"""int8 inference (`visto.nn.quantize`, `--int8`): which layers are quantized, how close the
answers stay to fp32, the engine's fused int8 path against the model's own, and the flag
through `visto chat` and `visto serve` (the official openai SDK) end to end."""

from __future__ import annotations

import io
import json

import openai
import pytest
import torch
from torch import nn

import visto
from test_chat import ANSWER_PLAIN, train_tiny_llava
from test_serve_support import data_url, make_llava_checkpoint, png_bytes, running
from visto.cli import build_parser, main
from visto.commands.serve import build_app
from visto.data.sample import Sample, Turn
from visto.data.synth import iter_records
from visto.errors import UserError
from visto.infer import Engine, SamplingParams
from visto.models import build_model
from visto.nn.quantize import int8_summary, is_int8, is_int8_linear, quantize_int8
from visto.tasks.runner import AnswerTokenizer

pytestmark = pytest.mark.timeout(300)

PROMPTS = [((200, 40, 40), "the red"), ((30, 30, 220), "the blue square"),
           ((30, 200, 30), "left of the"), ((240, 240, 240), "the green circle")]  # fmt: skip


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory):
    """A tiny LLaVA with large random weights (peaked logits) and a trained tokenizer."""
    return make_llava_checkpoint(tmp_path_factory.mktemp("int8") / "tiny-llava" / "checkpoint")


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """(checkpoint, image): a tiny LLaVA trained to answer every question with one box."""
    world, run = train_tiny_llava(tmp_path_factory.mktemp("int8-trained"))
    return run / "checkpoint", world / next(iter_records(world, "test"))["image"]


def engines(checkpoint, fast: bool = True) -> tuple[nn.Module, nn.Module, Engine, Engine]:
    fp32, int8 = visto.load(checkpoint), quantize_int8(visto.load(checkpoint))
    make = lambda m: Engine(m, AnswerTokenizer(m.processor.tokenizer), fast=fast)  # noqa: E731
    return fp32, int8, make(fp32), make(int8)


def batch(model):
    samples = [Sample(f"p{i}", [png_bytes(colour)], [Turn("user", "<image>\n" + text)])
               for i, (colour, text) in enumerate(PROMPTS)]  # fmt: skip
    return model.prompt_batch(samples)


def saved_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def test_the_towers_decoder_blocks_and_head_go_int8_the_embeddings_stay_fp32(random_tiny):
    fp32, int8, _, _ = engines(random_tiny)
    quantized = {n for n, m in int8.named_modules() if is_int8_linear(m)}
    plain = {n for n, m in fp32.named_modules() if type(m) is nn.Linear}
    assert quantized == plain and "language_model.lm_head" in quantized
    assert any(n.startswith("vision_tower.") for n in quantized)
    assert any(n.startswith("multi_modal_projector.") for n in quantized)
    lm, lm32 = int8.language_model, fp32.language_model
    # the embeddings stay fp32 (a lookup reads rows); the head tied to them is their int8 rows
    assert torch.equal(lm.model.embed_tokens.weight, lm32.model.embed_tokens.weight)
    head = lm.lm_head.weight()
    assert head.dtype == torch.qint8
    step = lm32.lm_head.weight.abs().amax(1, keepdim=True) / 127
    assert ((head.dequantize() - lm32.lm_head.weight).abs() <= step).all()
    assert saved_bytes(int8) < 0.65 * saved_bytes(fp32)  # tiny: the embeddings weigh a lot
    assert int8_summary(int8).startswith(f"int8: {len(quantized)} Linear layers quantized")
    assert "language_model.lm_head" in int8_summary(int8)
    assert quantize_int8(int8) is int8 and is_int8(int8) and not is_int8(fp32)


def test_int8_logits_stay_close_and_greedy_tokens_match_fp32(random_tiny):
    fp32, int8, e32, e8 = engines(random_tiny)
    with torch.inference_mode():
        l32, l8 = e32.prefill(batch(fp32), room=1)[0], e8.prefill(batch(int8), room=1)[0]
    assert (l8 - l32).abs().max() < 0.05 * (l32.max() - l32.min())
    params = SamplingParams(3)
    greedy32 = [c.token_ids for c in e32.generate_batch(batch(fp32), params)]
    greedy8 = [c.token_ids for c in e8.generate_batch(batch(int8), params)]
    assert greedy8 == greedy32


def test_the_engines_fused_int8_path_computes_what_the_int8_model_does(random_tiny):
    # The fast path concatenates q/k/v (and gate/up) int8 rows and scales into one matmul;
    # the model's own forward runs each int8 layer: same numbers.
    _, int8, _, fast = engines(random_tiny)
    slow = Engine(int8, AnswerTokenizer(int8.processor.tokenizer), fast=False)
    assert fast.runner is not None and slow.runner is None
    with torch.inference_mode():
        torch.testing.assert_close(fast.prefill(batch(int8), room=1)[0],
                                   slow.prefill(batch(int8), room=1)[0], rtol=1e-5, atol=1e-5)  # fmt: skip
    params = SamplingParams(12, ignore_eos=True)
    assert ([c.token_ids for c in fast.generate_batch(batch(int8), params)]
            == [c.token_ids for c in slow.generate_batch(batch(int8), params)])  # fmt: skip


def test_chat_int8_answers_as_fp32_does(trained_tiny, capsys, tmp_path):
    checkpoint, image = trained_tiny
    answers = []
    for flags in ([], ["--int8"]):
        code = main(["chat", "--model", str(checkpoint), str(image), "red circle", "--task",
                     "ground", "--json", "--out", str(tmp_path / "b.png"), *flags])  # fmt: skip
        captured = capsys.readouterr()
        assert code == 0
        answers.append(json.loads(captured.out)["answer"])
        assert ("int8: " in captured.err) == bool(flags)
    assert answers == [ANSWER_PLAIN, ANSWER_PLAIN]


def test_serve_int8_answers_the_openai_sdk_as_fp32_does(trained_tiny):
    checkpoint, image = trained_tiny
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image.read_bytes())}},
        {"type": "text", "text": "How many circles are there?"}]}]  # fmt: skip
    answers, cards = [], []
    for flags in ([], ["--int8"]):
        args = build_parser().parse_args(["serve", "--model", str(checkpoint), *flags])
        with running(build_app(args)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            [card] = client.models.list().data
            cards.append(card.model_dump()["int8"])
            out = client.chat.completions.create(model=card.id, messages=messages, max_tokens=8)
            answers.append(out.choices[0].message.content)
    assert cards == [False, True]
    assert answers[0] == answers[1] and answers[0]


def test_int8_refuses_what_it_cannot_quantize(random_tiny):
    with pytest.raises(UserError, match="no vision tower or decoder"):
        quantize_int8(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(UserError, match="runs on the CPU"):
        quantize_int8(visto.load(random_tiny).to("meta"))
    from visto.nn.lora import LoraConfig, apply_lora

    with pytest.raises(UserError, match="LoRA"):
        quantize_int8(apply_lora(visto.load(random_tiny), LoraConfig(rank=2)))
    with pytest.raises(UserError, match="--int8 quantizes the chat model"):
        build_app(build_parser().parse_args(["serve", "--clip", str(random_tiny), "--int8"]))


def test_an_int8_checkpoint_is_smaller_and_loads_back_in_int8(random_tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from visto.checkpoint import WEIGHTS_FILE, is_int8_checkpoint, save_checkpoint

    _, int8, _, e8 = engines(random_tiny)
    out = save_checkpoint(int8, tmp_path / "int8")
    assert is_int8_checkpoint(out) and not is_int8_checkpoint(random_tiny)
    assert (out / WEIGHTS_FILE).stat().st_size < 0.65 * (random_tiny / WEIGHTS_FILE).stat().st_size
    loaded = visto.load(out)
    assert is_int8(loaded)
    again = Engine(loaded, AnswerTokenizer(loaded.processor.tokenizer))
    with torch.inference_mode():  # the same int8 numbers, not a second rounding
        torch.testing.assert_close(again.prefill(batch(loaded), room=1)[0],
                                   e8.prefill(batch(int8), room=1)[0], rtol=0, atol=0)  # fmt: skip
    with pytest.raises(UserError, match="runs on the CPU: pass --device cpu"):
        visto.load(out, device="cuda")
    tensors = load_file(out / WEIGHTS_FILE)
    # the head tied to the fp32 embeddings is made again from them at load, not stored
    assert not [k for k in tensors if k.startswith("language_model.lm_head")]
    del tensors["language_model.model.layers.0.mlp.up_proj.weight_scale"]
    save_file(tensors, out / WEIGHTS_FILE)
    with pytest.raises(UserError, match="no int8 weights for language_model.model.layers.0.mlp"):
        visto.load(out)


def test_an_untied_head_is_stored_in_int8_and_an_older_fp32_one_still_loads(tmp_path):
    import dataclasses

    from safetensors.torch import load_file, save_file

    from visto.checkpoint import WEIGHTS_FILE, save_checkpoint

    source = make_llava_checkpoint(tmp_path / "tied" / "checkpoint")
    model = visto.load(source)
    decoder = dataclasses.replace(model.config.decoder, tie_word_embeddings=False)
    untied = build_model("llava", dataclasses.replace(model.config, decoder=decoder), seed=1)
    untied.processor = model.processor
    fp32_out = save_checkpoint(untied, tmp_path / "untied")
    int8 = quantize_int8(visto.load(fp32_out))
    out = save_checkpoint(int8, tmp_path / "untied-int8")
    tensors = load_file(out / WEIGHTS_FILE)
    assert tensors["language_model.lm_head.weight"].dtype == torch.int8
    reference = Engine(int8, AnswerTokenizer(int8.processor.tokenizer))
    with torch.inference_mode():
        expected = reference.prefill(batch(int8), room=1)[0]
    # An export made before heads went int8 stored an untied head as fp32: it loads, in int8.
    del tensors["language_model.lm_head.weight"], tensors["language_model.lm_head.weight_scale"]
    tensors["language_model.lm_head.weight"] = visto.load(fp32_out).language_model.lm_head.weight.detach()
    save_file(tensors, out / WEIGHTS_FILE)
    for path in (tmp_path / "untied-int8",):
        loaded = visto.load(path)
        assert is_int8_linear(loaded.language_model.lm_head)
        again = Engine(loaded, AnswerTokenizer(loaded.processor.tokenizer))
        with torch.inference_mode():
            torch.testing.assert_close(again.prefill(batch(loaded), room=1)[0], expected, rtol=0, atol=0)


def test_export_int8_then_chat_answers_as_fp32_does(trained_tiny, capsys, tmp_path):
    checkpoint, image = trained_tiny
    out = tmp_path / "tiny-int8"
    assert main(["export", str(checkpoint), "--out", str(out), "--int8"]) == 0
    assert "int8 visto checkpoint" in capsys.readouterr().out
    assert main(["chat", "--model", str(out), str(image), "red circle", "--task", "ground",
                 "--json", "--out", str(tmp_path / "b.png")]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["answer"] == ANSWER_PLAIN
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "x"), "--int8",
                 "--format", "hf"]) == 2  # fmt: skip
    assert "transformers cannot load" in capsys.readouterr().err


def test_eval_int8_scores_as_fp32_does_and_says_so(trained_tiny, capsys, tmp_path):
    # `visto eval --int8` takes chat/serve's path (commands._common.load_for_inference): the
    # tiny model's answers, hence every figure, are fp32's; the report and stderr say int8.
    checkpoint, _ = trained_tiny
    world = checkpoint.parent.parent / "world"  # train_tiny_llava: ROOT/world, ROOT/run
    args = ["eval", "--model", str(checkpoint), "--data", str(world), "--n", "2", "--tasks",
            "vqa", "ground", "--max-tokens", "6", "--no-blind", "--examples", "0"]  # fmt: skip
    runs = {}
    for name, flags in (("fp32", []), ("int8", ["--int8"])):
        assert main([*args, "--out", str(tmp_path / name), *flags]) == 0
        err = capsys.readouterr().err
        assert ("int8: " in err) == bool(flags)
        runs[name] = tmp_path / name
    metrics = {n: json.loads((d / "eval.json").read_text()) for n, d in runs.items()}
    assert metrics["int8"] == metrics["fp32"] and metrics["fp32"]["ground.acc50"] >= 0.0
    rows = {n: [json.loads(r) for r in (d / "predictions.jsonl").read_text().splitlines()]
            for n, d in runs.items()}  # fmt: skip
    assert [r["prediction"] for r in rows["int8"]] == [r["prediction"] for r in rows["fp32"]]
    assert {r["prediction"] for r in rows["int8"]} == {ANSWER_PLAIN}
    assert "int8: " in (runs["int8"] / "report.md").read_text()
    assert "int8: " not in (runs["fp32"] / "report.md").read_text()
    # An int8 checkpoint (visto export --int8) evaluates in int8 without the flag, and says so.
    exported = tmp_path / "exported"
    assert main(["export", str(checkpoint), "--out", str(exported), "--int8"]) == 0
    assert main([*args, "--model", str(exported), "--out", str(tmp_path / "exp")]) == 0
    assert json.loads((tmp_path / "exp" / "eval.json").read_text()) == metrics["fp32"]
    assert "int8: " in (tmp_path / "exp" / "report.md").read_text()


def test_matrices_that_are_not_linear_layers_are_stored_as_int8_rows(random_tiny, tmp_path, monkeypatch):
    """Float matrices in the quantized parts (a conv stem, the focus's maps; in the tiny model
    the patch embedding and the position table, once the size floor is lowered) are rounded
    to int8 rows when the model is quantized and stored that way: the export is smaller, and
    loads back to exactly what the model quantized in memory computes."""
    from safetensors.torch import load_file

    from visto.checkpoint import WEIGHTS_FILE, save_checkpoint
    from visto.nn import quantize

    fp32 = visto.load(random_tiny)
    sizes = {}
    for floor in (None, 1):
        if floor is not None:
            monkeypatch.setattr(quantize, "STORED_INT8_MIN_ELEMENTS", floor)
            monkeypatch.setattr(quantize, "STORED_INT8_MIN_ROW", 4)
        int8 = quantize_int8(visto.load(random_tiny))
        out = save_checkpoint(int8, tmp_path / f"int8-{floor}")
        sizes[floor] = (out / WEIGHTS_FILE).stat().st_size
    names = quantize.stored_int8_names(int8)
    assert "vision_tower.embeddings.patch_embedding.weight" in names
    assert not any(n.startswith("language_model.model.embed_tokens") for n in names)  # head's twin
    assert sizes[1] < sizes[None]
    tensors = load_file(out / WEIGHTS_FILE)
    for name in names:
        assert tensors[name + "__int8"].dtype == torch.int8 and name not in tensors
        before, after = fp32.state_dict()[name], int8.state_dict()[name]
        step = before.reshape(before.shape[0], -1).abs().amax(1) / 127  # conv: per out channel
        assert bool(((after - before).reshape(before.shape[0], -1).abs() <= step[:, None] / 2 + 1e-7).all())
    loaded = visto.load(out)
    make = lambda m: Engine(m, AnswerTokenizer(m.processor.tokenizer))  # noqa: E731
    with torch.inference_mode():  # the same numbers as in memory, not a second rounding
        torch.testing.assert_close(make(loaded).prefill(batch(loaded), room=1)[0],
                                   make(int8).prefill(batch(int8), room=1)[0], rtol=0, atol=0)  # fmt: skip
