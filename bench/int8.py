"""int8 inference (`--int8`, visto.nn.quantize) against fp32 on the same checkpoint: weights
on disk, peak RSS, time to first token and decode tokens/s, and how far the answers move.

    python bench/int8.py                                  # quickstart-size LLaVA, random weights
    python bench/int8.py --model runs/quickstart/checkpoint --world runs/quickstart/world \
        --rounds 7 --json bench/out/int8.json

Without --model, the model is a LLaVA of the quickstart's sizes (`visto.quickstart.llava_config`:
ViT 128 px / 16 px patches 4 x 128, MLP projector, decoder 4 x 256, vocabulary 1,024) with a
tokenizer trained on a small corpus and random weights (std 0.08 for matrices, so logits are
not flat). Random weights say nothing about accuracy: give a trained checkpoint for that.

Figures (int8 / fp32 ratios, both measured in this process, alternating fp32 and int8 each
round so that load drift hits both; medians of --rounds, each round the median of --repeats generations per side):
- weights: bytes of model.safetensors of the checkpoint and of its int8 export (what
  `visto export --int8` writes), fp32 / int8 (> 1: int8 smaller);
- peak RSS of a fresh process that loads the checkpoint, or the int8 export, and generates;
- ttft_ratio: time to first token (vision tower, projector, prompt prefill, first draw),
  fp32 / int8 (> 1: int8 faster); decode_ratio: decode tokens/s, int8 / fp32 (> 1: faster);
  both at batch 1 and batch --batch, each answer forced to --tokens tokens;
- max_logit_diff: the largest |int8 - fp32| over the first-token logits of the prompts, and
  beside it the fp32 logits' own range; greedy agreement: the share of prompts whose --tokens
  greedy tokens are all equal, and the mean position of the first difference;
- with --world (the checkpoint's synthetic world): VQA accuracy (`vqa.overall`, as `visto eval`
  scores it) of both on the test split's first --eval-images images; vqa_delta = int8 - fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

QUESTIONS = ["what is in the image?", "how many squares are there?", "what colour is the circle?",
             "is there a triangle?", "describe the image.", "where is the red square?",
             "read the text.", "what shape is left of the circle?"]  # fmt: skip


def make_checkpoint(path: Path, seed: int = 0, width: int | None = None, layers: int | None = None) -> Path:
    """A LLaVA of the quickstart's sizes (its decoder `width` x `layers` if given) with a
    trained tokenizer and random weights."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_serve_support import corpus
    from visto.checkpoint import save_checkpoint
    from visto.data.processor import Processor
    from visto.data.tokenizer import train_tokenizer, with_focus_token
    from visto.models import build_model
    from visto.quickstart import QuickstartConfig, focus_slots, llava_config

    cfg = QuickstartConfig(decoder_width=width or QuickstartConfig.decoder_width,
                           decoder_layers=layers or QuickstartConfig.decoder_layers)
    tokenizer = train_tokenizer(corpus() + QUESTIONS, cfg.vocab_size, loc_bins=cfg.loc_bins)
    tokenizer = with_focus_token(tokenizer) if focus_slots(cfg) else tokenizer  # as the quickstart's
    config = llava_config(cfg, max(cfg.vocab_size, tokenizer.vocab_size))
    model = build_model("llava", config, seed=seed)
    model.processor = Processor(config.processor, tokenizer)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    return save_checkpoint(model, path)


def prompts(n: int, size: int = 128) -> list:
    """`n` different scenes (shapes of several colours) each with a question."""
    from PIL import Image, ImageDraw

    from visto.data.sample import Sample, Turn, image_to_png_bytes

    colours = [(220, 40, 40), (40, 180, 60), (40, 60, 220), (230, 200, 40), (150, 60, 200)]
    out = []
    for i in range(n):
        image = Image.new("RGB", (size, size), (245, 245, 245))
        draw = ImageDraw.Draw(image)
        for k in range(1 + i % 4):
            x, y = (17 * i + 37 * k) % (size - 40), (29 * i + 23 * k) % (size - 40)
            box = (x, y, x + 20 + 5 * k, y + 20 + 3 * k)
            colour = colours[(i + k) % len(colours)]
            (draw.ellipse if (i + k) % 2 else draw.rectangle)(box, fill=colour)
        question = QUESTIONS[i % len(QUESTIONS)]
        out.append(Sample(f"p{i}", [image_to_png_bytes(image)], [Turn("user", "<image>\n" + question)]))
    return out


def load(checkpoint: Path, int8: bool):
    import visto
    from visto.nn.quantize import quantize_int8

    model = visto.load(checkpoint)
    return quantize_int8(model) if int8 else model


def timed(engine, model, samples: list, tokens: int, repeats: int = 1) -> tuple[float, float]:
    """(TTFT s, decode tokens/s) of generating `samples` as one batch, `repeats` times in a
    row: the medians (the rows' median TTFT, and the batch's decode rate, per generation)."""
    from visto.infer import SamplingParams

    batch = model.prompt_batch(samples)
    ttfts, rates = [], []
    for _ in range(repeats):
        completions = engine.generate_batch(batch, SamplingParams(tokens, ignore_eos=True))
        ttfts.append(statistics.median(c.timing.ttft_s for c in completions))
        decode_s = max(c.timing.decode_s for c in completions)
        rates.append(sum(c.timing.decode_tokens for c in completions) / decode_s)
    return statistics.median(ttfts), statistics.median(rates)


def worker(checkpoint: Path, tokens: int, threads: int) -> None:
    """In a fresh process: load, generate once; print peak RSS in MB."""
    import torch

    torch.set_num_threads(threads)
    from visto.infer import Engine
    from visto.tasks.runner import AnswerTokenizer

    model = load(checkpoint, int8=False)  # an int8 export loads as int8 by itself
    engine = Engine(model, AnswerTokenizer(model.processor.tokenizer))
    timed(engine, model, prompts(1), tokens)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_rss_mb(checkpoint: Path, tokens: int, threads: int) -> float:
    cmd = [sys.executable, __file__, "--worker", "--model", str(checkpoint), "--tokens",
           str(tokens), "--threads", str(threads)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def agreement(models: dict, engines: dict, samples: list, tokens: int) -> dict:
    import torch

    from visto.infer import SamplingParams

    batch = models["fp32"].prompt_batch(samples)
    with torch.inference_mode():
        first = {k: engines[k].prefill(batch, room=1)[0] for k in ("fp32", "int8")}
    greedy = {k: [c.token_ids for c in engines[k].generate_batch(
        models[k].prompt_batch(samples), SamplingParams(tokens, ignore_eos=True))]
        for k in ("fp32", "int8")}  # fmt: skip
    diverge = []
    for a, b in zip(greedy["fp32"], greedy["int8"], strict=True):
        diverge.append(next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)))
    return {
        "max_logit_diff": float((first["int8"] - first["fp32"]).abs().max()),
        "fp32_logit_range": float(first["fp32"].max() - first["fp32"].min()),
        "first_token_equal": sum(int(first["int8"][i].argmax() == first["fp32"][i].argmax())
                                 for i in range(len(samples))) / len(samples),  # fmt: skip
        "greedy_equal": sum(d == tokens for d in diverge) / len(diverge),
        "mean_first_difference": statistics.mean(diverge),
    }


def vqa_accuracy(model, world: Path, images: int) -> tuple[float, int]:
    """(vqa.overall, questions) on the first `images` test images of `world`, greedy."""
    from visto.data.synth import iter_samples
    from visto.eval.generative import evaluate_generative
    from visto.tasks.runner import make_generate

    samples = list(iter_samples(world, "test", tasks=["vqa"], limit=images))
    metrics, records = evaluate_generative(make_generate(model, constrain_json=False), samples)
    return metrics["vqa.overall"], len(records)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a LLaVA checkpoint (default: build a random one)")
    ap.add_argument("--rounds", type=int, default=5, help="alternated fp32/int8 rounds")
    ap.add_argument("--repeats", type=int, default=3,
                    help="generations per side in a round (its figure: their median; a 32-token "
                         "batch-1 decode is ~60 ms, short enough for one scheduler hiccup to move it)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per answer")
    ap.add_argument("--batch", type=int, default=8, help="the batched figure's batch size")
    ap.add_argument("--prompts", type=int, default=16, help="prompts for the accuracy figures")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--decoder-width", type=int, help="without --model: the random model's decoder width "
                    "(default the quickstart's 256; 512 with --decoder-layers 8 gives 100 MB of fp32 "
                    "decoder weights, beyond a CPU's last-level cache)")
    ap.add_argument("--decoder-layers", type=int, help="without --model: the random model's decoder layers (default 4)")
    ap.add_argument("--world", type=Path, help="the model's synthetic world: VQA delta on its test split")
    ap.add_argument("--eval-images", type=int, default=50, help="test images for the VQA delta")
    ap.add_argument("--json", type=Path, help="write the figures to this JSON file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.model, args.tokens, args.threads)
        return 0
    if min(args.rounds, args.repeats, args.batch, args.prompts) < 1 or args.tokens < 2:
        ap.error("--rounds, --repeats, --batch, --prompts must be at least 1 and --tokens at least 2")

    import torch

    torch.set_num_threads(args.threads)
    from visto.checkpoint import WEIGHTS_FILE, save_checkpoint
    from visto.infer import Engine
    from visto.tasks.runner import AnswerTokenizer

    if args.model is not None and (args.decoder_width or args.decoder_layers):
        ap.error("--decoder-width and --decoder-layers size the random model: not with --model")
    checkpoint = args.model or make_checkpoint(Path(tempfile.mkdtemp()) / "qs-llava" / "checkpoint",
                                               width=args.decoder_width, layers=args.decoder_layers)
    load_before = os.popen("uptime").read().strip()
    print(f"model {checkpoint} | torch threads {args.threads} | cpus {os.cpu_count()}")
    print(f"uptime: {load_before}")
    models = {k: load(checkpoint, k == "int8") for k in ("fp32", "int8")}
    engines = {k: Engine(m, AnswerTokenizer(m.processor.tokenizer)) for k, m in models.items()}
    assert all(e.runner is not None for e in engines.values()), "expected the engine's fast path"
    exported = save_checkpoint(models["int8"], Path(tempfile.mkdtemp()) / "int8" / "checkpoint")
    files = {"fp32": checkpoint, "int8": exported}
    weights = {k: (path / WEIGHTS_FILE).stat().st_size for k, path in files.items()}
    rss = {k: peak_rss_mb(path, args.tokens, args.threads) for k, path in files.items()}

    samples = prompts(max(args.batch, args.prompts))
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with torch.inference_mode():
        for batch in (1, args.batch):
            for k in models:  # warm-up: first calls allocate and pack
                timed(engines[k], models[k], samples[:batch], args.tokens)
        for r in range(args.rounds):
            order = ["fp32", "int8"][:: 1 if r % 2 == 0 else -1]
            for batch in (1, args.batch):
                for k in order:
                    group = samples[(r * batch) % len(samples):][:batch] or samples[:batch]
                    runs.setdefault((k, batch), []).append(
                        timed(engines[k], models[k], group, args.tokens, args.repeats))
    speed = {}
    for batch in (1, args.batch):
        fp32, int8 = runs[("fp32", batch)], runs[("int8", batch)]
        speed[str(batch)] = {
            "ttft_ratio": statistics.median(a[0] / b[0] for a, b in zip(fp32, int8, strict=True)),
            "decode_ratio": statistics.median(b[1] / a[1] for a, b in zip(fp32, int8, strict=True)),
            "fp32_ttft_ms": statistics.median(a[0] for a in fp32) * 1e3,
            "int8_ttft_ms": statistics.median(b[0] for b in int8) * 1e3,
            "fp32_decode_tok_s": statistics.median(a[1] for a in fp32),
            "int8_decode_tok_s": statistics.median(b[1] for b in int8),
        }
    accuracy = agreement(models, engines, samples[: args.prompts], args.tokens)
    vqa = {}
    if args.world is not None:
        with torch.inference_mode():
            vqa = {k: vqa_accuracy(m, args.world, args.eval_images) for k, m in models.items()}
    load_after = os.popen("uptime").read().strip()

    print(f"weights on disk (model.safetensors): fp32 {weights['fp32'] / 1e6:.2f} MB, int8 "
          f"{weights['int8'] / 1e6:.2f} MB: {weights['fp32'] / weights['int8']:.2f}x smaller")
    print(f"peak RSS (load, generate): fp32 {rss['fp32']:.0f} MB, int8 "
          f"{rss['int8']:.0f} MB: {rss['fp32'] / rss['int8']:.2f}x")
    for batch, s in speed.items():
        print(f"batch {batch:>2}: TTFT fp32 {s['fp32_ttft_ms']:.1f} ms, int8 {s['int8_ttft_ms']:.1f} "
              f"ms (fp32/int8 {s['ttft_ratio']:.2f}x); decode fp32 {s['fp32_decode_tok_s']:.0f}, "
              f"int8 {s['int8_decode_tok_s']:.0f} tok/s (int8/fp32 {s['decode_ratio']:.2f}x); "
              f"medians of {args.rounds} rounds of {args.repeats}")
    print(f"first-token logits: max |int8 - fp32| {accuracy['max_logit_diff']:.4f} (fp32 range "
          f"{accuracy['fp32_logit_range']:.2f}); argmax equal {accuracy['first_token_equal']:.2f}; "
          f"{args.tokens}-token greedy answers equal {accuracy['greedy_equal']:.2f}, first "
          f"difference at token {accuracy['mean_first_difference']:.1f} on average "
          f"({args.prompts} prompts)")
    if vqa:
        print(f"VQA accuracy on {vqa['fp32'][1]} questions of {args.world}: fp32 "
              f"{vqa['fp32'][0]:.3f}, int8 {vqa['int8'][0]:.3f}: "
              f"delta {100 * (vqa['int8'][0] - vqa['fp32'][0]):+.1f} points")
    print(f"uptime: {load_after}")
    if args.json:
        figures = {
            "model": str(checkpoint), "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
            "tokens": args.tokens, "cpus": os.cpu_count(),
            "weights_bytes": weights, "weights_ratio": weights["fp32"] / weights["int8"],
            "peak_rss_mb": rss, "rss_ratio": rss["fp32"] / rss["int8"],
            "batch": speed,
            "decode_ratio": speed["1"]["decode_ratio"], "ttft_ratio": speed["1"]["ttft_ratio"],
            **accuracy,
            "vqa": {k: v[0] for k, v in vqa.items()} or None,
            "vqa_delta": vqa["int8"][0] - vqa["fp32"][0] if vqa else None,  # fraction, not points
            "uptime_before": load_before, "uptime_after": load_after,
        }  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
