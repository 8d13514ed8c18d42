"""visto's generation engine against transformers' `generate`: same weights, same prompts, greedy.

    .venv/bin/python bench/generate_vs_hf.py                  # LLaVA with an image, batch 1 and 8
    .venv/bin/python bench/generate_vs_hf.py --family llava --preset tiny
    .venv/bin/python bench/generate_vs_hf.py --family decoder --hidden 512 --layers 8
    .venv/bin/python bench/generate_vs_hf.py --threads 1 --repeats 7 --json bench/out/gen.json

--family llava (default): a visto LLaVA (`--preset small`, the quickstart's size) with random
weights is exported by `visto.models.llava.export_hf` and loaded as transformers'
`LlavaForConditionalGeneration`. Each timed call starts from the chat messages and a PIL image,
so preprocessing is included on both sides: ours `Llava.prompt_batch` (our processor), theirs
`LlavaProcessor` (chat template, `CLIPImageProcessorPil`, tokenizer) then `generate`.
Batch 8 asks 8 different questions about the image (prompt lengths differ: left padding); the
engine then runs the image and the prompt's shared prefix once (issue 19). --distinct-images
gives each row an image of its own (the test image with its values shifted per row), where
nothing is shared.

--family decoder: a random Llama built with transformers, saved, and loaded into visto's
DecoderLM through `from_pretrained` (the same path a real checkpoint takes); token prompts.

Both sides generate greedily. The script asserts that the generated tokens are identical and
prints, per batch size:

    ttft       time to first token: a generate call with max_new_tokens=1 (prefill + 1 token,
               preprocessing included for llava)
    tok/s      decode throughput: B * (N - 1) / (time(N tokens) - time(1 token)), all rows
    ratio      ours / transformers (> 1: we are faster for tok/s; < 1: faster for ttft)

Each figure is the median of --repeats runs after a warm-up, the two sides taking turns; the
same figures from process CPU time (steadier than wall time on a shared machine) are printed
beside them. --json FILE writes them: {"batch": {"1": {"ttft_ratio", "tokps_ratio" (wall,
ours / transformers), "ttft_ratio_cpu", "tokps_ratio_cpu", "ttft_ms", "tokps"}, "8": ...},
"load": [before, after]}. The weights are drawn wider than the usual init so that greedy choices are not
near-ties that float noise could flip. The machine load (`uptime`) is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def interleaved_medians(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median wall and CPU seconds of each function, run in turns (A, B, A, B, ...) after one
    warm-up each, so that the load drift of a shared machine hits both sides alike."""
    for fn in fns.values():
        fn()
    wall: dict = {name: [] for name in fns}
    cpu: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    med = statistics.median
    return {n: med(t) for n, t in wall.items()}, {n: med(t) for n, t in cpu.items()}


def report(B: int, N: int, wall: dict, cpu: dict, sides: tuple[str, str]) -> dict:
    """Rows of ttft and tok/s per side (wall, then CPU time), and the ratio ours / theirs;
    returns the batch's entry of the --json file."""
    figures = {}
    for side in sides:
        row = []
        for t in (wall, cpu):
            ttft = t[(side, 1)]
            row += [ttft, B * (N - 1) / max(t[(side, N)] - ttft, 1e-9)]
        figures[side] = row
        print(f"{B:>5} {side:>12} {row[0] * 1e3:>9.1f} {row[1]:>9.1f} {row[2] * 1e3:>11.1f} "
              f"{row[3]:>10.1f}")  # fmt: skip
    o, h = figures[sides[0]], figures[sides[1]]
    print(
        f"{B:>5} {'ratio':>12} {o[0] / h[0]:>9.2f} {o[1] / h[1]:>9.2f} {o[2] / h[2]:>11.2f} "
        f"{o[3] / h[3]:>10.2f}   (ttft ours/hf: lower is better; tok/s ours/hf: higher is "
        "better); tokens identical"
    )
    return {
        "ttft_ratio": o[0] / h[0], "tokps_ratio": o[1] / h[1],
        "ttft_ratio_cpu": o[2] / h[2], "tokps_ratio_cpu": o[3] / h[3],
        "ttft_ms": {side: figures[side][0] * 1e3 for side in sides},
        "tokps": {side: figures[side][1] for side in sides},
    }  # fmt: skip


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


HEADER = f"{'batch':>5} {'side':>12} {'ttft ms':>9} {'tok/s':>9} {'cpu ttft ms':>11} {'cpu tok/s':>10}"

QUESTIONS = [
    "what is in the image?",
    "is the red square left of the circle?",
    "what",
    "the blue triangle is",
    "what is left of the green circle",
    "red",
    "is it blue",
    "what colour is the square in the image",
]


def build_llava(args) -> dict:
    """The comparison's pair: a visto LLaVA (`--preset`, random weights drawn wide), the same
    weights as transformers' LlavaForConditionalGeneration with its processor, the test image
    and visto's engine. Also what bench/ttft_profile.py profiles."""
    import transformers
    from PIL import Image

    from visto.data.processor import ProcessorConfig
    from visto.data.tokenizer import train_tokenizer
    from visto.infer import Engine
    from visto.models import build_model
    from visto.models.llava import LlavaConfig, export_hf

    words = " ".join(QUESTIONS).replace("?", "").split()
    texts = [" ".join(words[(i * k) % len(words)] for k in range(1, 9)) for i in range(400)]
    tmp = tempfile.mkdtemp()
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab, loc_bins=32, min_frequency=1)
    tokenizer.save(f"{tmp}/tokenizer.json")
    base = LlavaConfig.preset(args.preset)
    # "resize" (not LLaVA's "pad"): transformers' CLIP image processor resizes plainly.
    processor = ProcessorConfig(
        image_size=base.vision.image_size, image_tokens=base.image_tokens, resize_mode="resize",
        image_delimiters=False, vocab_size=tokenizer.vocab_size, loc_bins=32,
    )  # fmt: skip
    decoder = replace(base.decoder, vocab_size=tokenizer.vocab_size)
    config = replace(base, processor=processor, decoder=decoder, tokenizer_dir=tmp)
    model = build_model("llava", config, seed=args.seed).eval()
    with torch.no_grad():  # wider than the init: peaked logits, no near-ties
        g = torch.Generator().manual_seed(args.seed)
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    export_hf(model, f"{tmp}/hf")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(f"{tmp}/hf").eval()
    hf_processor = transformers.AutoProcessor.from_pretrained(f"{tmp}/hf")
    hf_processor.tokenizer.padding_side = "left"
    size = base.vision.image_size * 3 // 2  # both sides resize it (PIL bicubic)
    image = Image.new("RGB", (size, size), (200, 40, 40))
    for x in range(0, size, 7):
        for y in range(0, size, 5):
            image.putpixel((x, y), ((x * 3) % 255, (y * 5) % 255, 90))
    engine = Engine(model, model.processor.tokenizer, eos_token_ids=[])
    return dict(model=model, hf=hf, hf_processor=hf_processor, image=image, engine=engine,
                tokenizer=tokenizer, config=config)  # fmt: skip


def bench_llava(args) -> dict:
    """Ours (processor + engine) against transformers (LlavaProcessor + generate)."""
    import transformers

    from visto.data.sample import Sample, Turn
    from visto.infer import SamplingParams

    pair = build_llava(args)
    model, hf, hf_processor = pair["model"], pair["hf"], pair["hf_processor"]
    image, engine = pair["image"], pair["engine"]
    tokenizer, config = pair["tokenizer"], pair["config"]
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, threads "
        f"{torch.get_num_threads()}, LLaVA preset {args.preset}: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
        f"{config.image_tokens} visual tokens, image processor "
        f"{type(hf_processor.image_processor).__name__}, new tokens {args.new_tokens}, "
        f"median of {args.repeats}"
    )
    print(HEADER)
    N = args.new_tokens
    results = {}
    for B in args.batches:
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(B)]
        images = [image] * B
        if args.distinct_images:
            images = [image.point(lambda v, i=i: (v + 37 * i) % 256) for i in range(B)]

        def run_ours(n: int, questions=questions, images=images) -> list[list[int]]:
            samples = [Sample("q", [im], [Turn("user", "<image>\n" + q)])
                       for q, im in zip(questions, images, strict=True)]  # fmt: skip
            done = engine.generate_batch(model.prompt_batch(samples), SamplingParams(max_new_tokens=n))
            return [c.token_ids for c in done]

        def run_hf(n: int, questions=questions, images=images) -> list[list[int]]:
            texts = [
                hf_processor.apply_chat_template(
                    [{"role": "user", "content": "<image>\n" + q}],
                    add_generation_prompt=True, tokenize=False,
                )
                for q in questions
            ]  # fmt: skip
            inputs = hf_processor(
                text=texts, images=images, padding=True, return_tensors="pt"
            )
            with torch.no_grad():
                out = hf.generate(
                    **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=tokenizer.pad_id, eos_token_id=None,
                )  # fmt: skip
            return out[:, inputs["input_ids"].shape[1] :].tolist()

        check_same(run_ours(N), run_hf(N))
        fns = {}
        for side, fn in (("visto", run_ours), ("transformers", run_hf)):
            fns[(side, 1)] = lambda fn=fn: fn(1)
            fns[(side, N)] = lambda fn=fn: fn(N)
        wall, cpu = interleaved_medians(fns, args.repeats)
        results[str(B)] = report(B, N, wall, cpu, ("visto", "transformers"))
    print(f"uptime: {os.popen('uptime').read().strip()}")
    return results


def check_same(ours: list[list[int]], theirs: list[list[int]]) -> None:
    if ours == theirs:
        return
    for row, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:
            step = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
            print(f"row {row} differs from step {step}: ours {a[step:][:5]} hf {b[step:][:5]}")
    raise SystemExit("greedy tokens differ between visto and transformers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["llava", "decoder"], default="llava")
    parser.add_argument("--preset", choices=["tiny", "small"], default="small", help="llava size")
    parser.add_argument("--vocab", type=int, default=None, help="default 1024 llava, 2048 decoder")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distinct-images", action="store_true",
                        help="llava: a different image in every row (nothing shared)")  # fmt: skip
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    args.vocab = args.vocab or (1024 if args.family == "llava" else 2048)
    load_before = load_average()
    results = bench_llava(args) if args.family == "llava" else bench_decoder(args)
    if args.json:
        from visto.utils.io import atomic_write_json

        atomic_write_json(args.json, {
            "family": args.family, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "new_tokens": args.new_tokens, "load": [load_before, load_average()], "batch": results,
            "distinct_images": args.distinct_images,
        })  # fmt: skip
        print(f"wrote {args.json}")


def bench_decoder(args) -> dict:
    import transformers

    from visto.infer import Engine, PromptBatch, SamplingParams
    from visto.nn.language import DecoderLM

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = DecoderLM.from_pretrained(tmp)
    hf.to(device)
    ours.to(device)

    class IdsAsText:  # random weights have no vocabulary: text is the ids, space-separated
        def encode(self, text: str) -> list[int]:
            return [int(t) for t in text.split()]

        def decode(self, ids: list[int]) -> str:
            return " ".join(map(str, ids))

    engine = Engine(ours, IdsAsText(), eos_token_ids=[], pad_id=0, device=device)
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}, "
        f"threads {torch.get_num_threads()}, model {sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M "
        f"params (hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}), "
        f"prompt {args.prompt_len}, new tokens {args.new_tokens}, median of {args.repeats}"
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    print(HEADER)
    results = {}
    for B in args.batches:
        # Batch 8 mixes lengths: row i has prompt_len - 3 * i tokens (left-padded).
        lengths = [max(1, args.prompt_len - 3 * i) for i in range(B)]
        prompts = [torch.randint(1, args.vocab, (n,), generator=gen).tolist() for n in lengths]
        batch = PromptBatch.left_padded(prompts, pad_id=0, device=device)
        N = args.new_tokens

        def run_ours(n: int, batch=batch):
            return engine.generate_batch(batch, SamplingParams(max_new_tokens=n))

        def run_hf(n: int, batch=batch):
            with torch.no_grad():
                return hf.generate(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=None,
                )

        ours_tokens = [c.token_ids for c in run_ours(N)]
        check_same(ours_tokens, run_hf(N)[:, batch.input_ids.shape[1] :].tolist())
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        fns = {}
        for side, fn in (("visto", run_ours), ("transformers", run_hf)):
            fns[(side, 1)] = lambda fn=fn, sync=sync: (fn(1), sync())
            fns[(side, N)] = lambda fn=fn, sync=sync, N=N: (fn(N), sync())
        wall, cpu = interleaved_medians(fns, args.repeats)
        results[str(B)] = report(B, N, wall, cpu, ("visto", "transformers"))
    print(f"uptime: {os.popen('uptime').read().strip()}")
    return results


if __name__ == "__main__":
    main()
