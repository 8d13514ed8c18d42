"""The engine's decode step runs its decoder layers as TorchScript (`visto.infer.scripted`):
the same operators in the same order as the runner's Python path, so the same logits bit for
bit, fp32 and int8, with and without padding, grouped-query attention or not."""

from __future__ import annotations

import pytest
import torch

import visto
from test_serve_support import make_llava_checkpoint, png_bytes
from visto.data.sample import Sample, Turn
from visto.infer import Engine
from visto.infer.engine import PromptBatch
from visto.infer.runner import DecoderRunner
from visto.nn.language import DecoderConfig, DecoderLM
from visto.nn.quantize import quantize_int8
from visto.tasks.runner import AnswerTokenizer

PROMPTS = [((200, 40, 40), "the red"), ((30, 30, 220), "the blue square is left of"),
           ((30, 200, 30), "left"), ((240, 240, 240), "the green circle")]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_llava_checkpoint(tmp_path_factory.mktemp("scripted") / "llava" / "checkpoint")


def decode(runner: DecoderRunner, batch, steps: int, scripted: bool) -> list[torch.Tensor]:
    """The logits of `steps` greedy decode steps, with the scripted layers or without."""
    runner._refresh()
    saved = runner._scripted
    assert saved is not None, "expected the scripted decode layers for this decoder"
    runner._scripted = saved if scripted else None
    runner._watch = runner._watch  # keep the fused weights: the check sees nothing changed
    try:
        logits, state = runner.prefill(batch, room=steps + 1)
        out = []
        for _ in range(steps):
            logits, state = runner.decode_step(logits.argmax(-1), state)
            out.append(logits)
        return out
    finally:
        runner._scripted = saved


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("rows", [1, 4])
def test_scripted_decode_layers_give_the_python_paths_logits_bit_for_bit(checkpoint, int8, rows):
    model = visto.load(checkpoint)
    if int8:
        model = quantize_int8(model)
    runner = Engine(model, AnswerTokenizer(model.processor.tokenizer)).runner
    samples = [Sample(f"p{i}", [png_bytes(c)], [Turn("user", "<image>\n" + t)])
               for i, (c, t) in enumerate(PROMPTS[:rows])]  # fmt: skip
    batch = model.prompt_batch(samples)
    fast, slow = decode(runner, batch, 8, True), decode(runner, batch, 8, False)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)


def test_without_grouped_query_attention_too_and_the_engine_uses_it():
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                        intermediate_size=128, max_position_embeddings=256)  # fmt: skip
    lm = DecoderLM(cfg).eval()
    runner = DecoderRunner.for_model(lm)
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    batch = PromptBatch.left_padded(prompts)
    fast, slow = decode(runner, batch, 6, True), decode(runner, batch, 6, False)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)
    # the decode step goes through it: with the function broken, the logits change
    function, weights = runner._scripted
    runner._scripted = (lambda x, *args: function(x, *args) * 0, weights)
    logits, state = runner.prefill(batch, room=2)
    broken, _ = runner.decode_step(logits.argmax(-1), state)
    assert not torch.equal(broken, fast[0])


def test_a_decoder_with_biases_runs_the_python_path():
    cfg = DecoderConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=128, max_position_embeddings=256, qkv_bias=True)  # fmt: skip
    runner = DecoderRunner.for_model(DecoderLM(cfg).eval())
    runner._refresh()
    assert runner._scripted is None


def test_a_torch_that_cannot_script_them_runs_the_python_path(monkeypatch):
    from visto.infer import scripted as scripted_module

    def refuse(fn):
        raise RuntimeError("no TorchScript in this torch")

    monkeypatch.setattr(scripted_module, "_SCRIPTED", {})
    monkeypatch.setattr(scripted_module.torch.jit, "script", refuse)
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=128, max_position_embeddings=256)  # fmt: skip
    runner = DecoderRunner.for_model(DecoderLM(cfg).eval())
    logits, state = runner.prefill(PromptBatch.left_padded([[5, 6, 7]]), room=2)
    assert runner._scripted is None
    logits, state = runner.decode_step(logits.argmax(-1), state)
    assert logits.shape == (1, 300) and torch.isfinite(logits).all()
