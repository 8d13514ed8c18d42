"""visto's generation engine against transformers' `generate`: same weights, same prompts, greedy.

    .venv/bin/python bench/generate_vs_hf.py                  # plain decoder, batch 1 and 8
    .venv/bin/python bench/generate_vs_hf.py --hidden 512 --layers 8 --new-tokens 64

A random Llama is built with transformers, saved, and loaded into visto's DecoderLM through
`from_pretrained` (the same path a real checkpoint takes). Both sides then generate greedily
from the same left-padded prompts (batch 8 mixes prompt lengths). The script asserts that the
generated tokens are identical and prints, per batch size:

    ttft       time to first token: a generate call with max_new_tokens=1 (prefill + 1 token)
    tok/s      decode throughput: B * (N - 1) / (time(N tokens) - time(1 token)), all rows
    ratio      ours / transformers (> 1: we are faster for tok/s; < 1: faster for ttft)

Each figure is the median of --repeats runs after a warm-up, the two sides taking turns. The weights are drawn wider than
the usual init so that greedy choices are not near-ties that float noise could flip. The
machine load (`uptime`) is printed, since shared CPUs make timings noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, run in turns (A, B, A, B, ...) after one warm-up each,
    so that the load drift of a shared machine hits both sides alike."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=2048)
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
    args = parser.parse_args()

    import transformers

    from visto.infer import Engine, PromptBatch, SamplingParams
    from visto.nn.language import DecoderLM

    if args.threads:
        torch.set_num_threads(args.threads)
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
    header = f"{'batch':>5} {'side':>12} {'ttft ms':>9} {'tok/s':>9}"
    print(header)
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
        hf_tokens = run_hf(N)[:, batch.input_ids.shape[1] :].tolist()
        if ours_tokens != hf_tokens:
            for row, (a, b) in enumerate(zip(ours_tokens, hf_tokens, strict=True)):
                if a != b:
                    step = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
                    print(
                        f"row {row} differs from step {step}: ours {a[step:][:5]} hf {b[step:][:5]}"
                    )
            raise SystemExit("greedy tokens differ between visto and transformers")

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sides = {"visto": run_ours, "transformers": run_hf}
        fns = {}
        for side, fn in sides.items():
            fns[(side, 1)] = lambda fn=fn, sync=sync: (fn(1), sync())
            fns[(side, N)] = lambda fn=fn, sync=sync, N=N: (fn(N), sync())
        t = interleaved_medians(fns, args.repeats)
        figures = {}
        for side in sides:
            ttft = t[(side, 1)]
            tok_s = B * (N - 1) / max(t[(side, N)] - ttft, 1e-9)
            figures[side] = (ttft, tok_s)
            print(f"{B:>5} {side:>12} {ttft * 1e3:>9.1f} {tok_s:>9.1f}")
        (o_ttft, o_tok), (h_ttft, h_tok) = figures["visto"], figures["transformers"]
        print(
            f"{B:>5} {'ratio':>12} {o_ttft / h_ttft:>9.2f} {o_tok / h_tok:>9.2f}   "
            f"(ttft ours/hf: lower is better; tok/s ours/hf: higher is better); tokens identical"
        )
    print(f"uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
