"""Parity of the remote-code transformers export with visto, on a real checkpoint.

Exports CKPT with `visto export` (the quickstart's model gets the custom-code directory),
loads it with transformers' AutoModelForCausalLM and AutoProcessor (trust_remote_code=True,
offline), and on N test prompts of the world (one question per test image, tasks in turn):

- logits: the wrapper's forward on the prompts vs visto's engine at the prompt's last
  position (what it samples the first token from), and the forward on prompt + visto's
  greedy answer vs visto's `answer_logits` on the same sequences (every position before the
  last) and the engine's step-by-step logits (every generated position): max |diff|;
- greedy tokens: `model.generate(do_sample=False)` vs visto's Engine at temperature 0, per
  row up to its end-of-turn;
- how many of the answer tokens the pointer's copies decide (the decoder's own argmax differs
  there): what a wrapper without the mixing would get wrong.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/export_remote_code.py \
        --checkpoint runs/q0/checkpoint --world runs/q0/world --n 20 --out /tmp/q0-hf
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/q0/checkpoint")
    ap.add_argument("--world", default="runs/q0/world")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--out", default="/tmp/visto-remote-export")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import visto
    from visto.cli import main as cli
    from visto.data.sample import Sample
    from visto.data.synth.reader import iter_samples
    from visto.infer.engine import Engine
    from visto.infer.sampling import SamplingParams

    shutil.rmtree(args.out, ignore_errors=True)
    t = time.perf_counter()
    assert cli(["export", args.checkpoint, "--out", args.out]) == 0
    export_s = time.perf_counter() - t
    from transformers import AutoModelForCausalLM, AutoProcessor

    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(args.out, trust_remote_code=True, local_files_only=True)
    processor = AutoProcessor.from_pretrained(args.out, trust_remote_code=True, local_files_only=True)
    load_s = time.perf_counter() - t
    model = visto.load(args.checkpoint)

    # one question per test image, the tasks taken in turn
    tasks = ("vqa", "caption", "ground", "ocr", "json", "refdesc", "count", "classify")
    samples, k = [], 0
    for record_samples in _by_image(iter_samples(args.world, "test")):
        sample = record_samples[k % len(record_samples)]
        for s in record_samples:
            if s.truth["task"] == tasks[k % len(tasks)]:
                sample = s
        samples.append(Sample(sample.id, sample.images, sample.turns[:1], sample.truth))
        k += 1
        if len(samples) == args.n:
            break
    questions = [s.turns[0].content for s in samples]
    # the same inputs through transformers' processor (custom code) and visto's
    inputs = processor(images=[s.images[0] for s in samples], text=questions)
    batch = model.prompt_batch(samples)
    assert torch.equal(inputs["input_ids"], batch.input_ids), "the processors disagree"

    greedy = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    t = time.perf_counter()
    completions = Engine(model, model.processor.tokenizer).generate_batch(batch, greedy)
    engine_s = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        generated = hf.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    hf_s = time.perf_counter() - t
    P = inputs["input_ids"].shape[1]
    end = set(hf.generation_config.eos_token_id)
    equal = 0
    for row, c in enumerate(completions):
        ours = generated[row, P:].tolist()
        cut = next((i + 1 for i, tok in enumerate(ours) if tok in end), len(ours))
        equal += ours[:cut] == list(c.token_ids)

    diffs = {"prompt_last": 0.0, "answer_logits": 0.0, "engine_steps": 0.0}
    copied = 0
    with torch.no_grad():
        logits = hf(**inputs).logits  # (B, P, V)
        engine_first, _ = model.prefill(batch)
        diffs["prompt_last"] = float((logits[:, -1] - engine_first).abs().max())
        for sample, c in zip(samples, completions, strict=True):  # one row at a time
            one = model.prompt_batch([sample])
            ids = torch.cat([one.input_ids, torch.tensor([list(c.token_ids)])], 1)
            full = hf(input_ids=ids, pixel_values=one.pixel_values, attention_mask=torch.ones_like(ids)).logits[0]
            ref = model.answer_logits({"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids),
                                       "pixel_values": one.pixel_values})[0]  # fmt: skip
            diffs["answer_logits"] = max(diffs["answer_logits"], float((full[:-1] - ref[:-1]).abs().max()))
            step, state = model.prefill(one)
            n = one.input_ids.shape[1]
            worst = float((full[n - 1] - step[0]).abs().max())
            for i, tok in enumerate(list(c.token_ids)[:-1]):
                step, state = model.decode_step(torch.tensor([tok]), state)
                worst = max(worst, float((full[n + i] - step[0]).abs().max()))
            diffs["engine_steps"] = max(diffs["engine_steps"], worst)
            # where the pointer's copies decide the token: the decoder's own argmax differs
            embeds = model.embed_inputs(ids, one.pixel_values)
            hidden, _ = model.language_model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), head=False)
            head = model.language_model.lm_head(hidden[0])
            copied += int((head[n - 1:].argmax(-1) != full[n - 1:].argmax(-1)).sum())
    result = {
        "checkpoint": args.checkpoint, "prompts": len(samples),
        "tasks": sorted({s.truth["task"] for s in samples}),
        "greedy_equal": f"{equal}/{len(samples)}", "max_abs_diff": diffs,
        "answer_tokens": sum(len(c.token_ids) for c in completions),
        "tokens_the_pointer_decides": copied,
        "export_s": round(export_s, 2), "load_s": round(load_s, 2),
        "visto_engine_s": round(engine_s, 2), "transformers_generate_s": round(hf_s, 2),
        "example": {"question": questions[0], "answer": processor.decode(generated[0, P:])},
    }  # fmt: skip
    print(json.dumps(result, indent=2))


def _by_image(samples):
    group, current = [], None
    for s in samples:
        if current is not None and s.truth["image_id"] != current:
            yield group
            group = []
        current = s.truth["image_id"]
        group.append(s)
    if group:
        yield group


if __name__ == "__main__":
    main()
