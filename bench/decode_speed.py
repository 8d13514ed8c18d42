"""Time to first token and decode tokens/s of a trained checkpoint, through the engine, as
`visto compare` measures them (one prompt at a time, every answer forced to --tokens tokens).

    .venv/bin/python bench/decode_speed.py --model runs/compare-8min/flamingo/train/checkpoint \
        --data runs/compare-8min/world --repeats 5

Each repeat times --prompts prompts (VQA questions of the first test images); the figures are
the medians over repeats, with the machine's load beside them. `batched_tokens_per_s` is the
same prompts generated as one batch (prefill included), as a server batches them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="a synthetic world (its test split)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import time

    import torch

    import visto
    from visto.compare import latency, probe_prompts
    from visto.infer import SamplingParams
    from visto.tasks.runner import make_engine, prompt_batch

    torch.set_num_threads(args.threads)
    model = visto.load(args.model)
    samples = probe_prompts(args.data, args.prompts, seed=0)[: args.prompts]
    prompts = [dataclasses.replace(s, turns=s.turns[:-1]) for s in samples]
    runs = [latency(model, prompts, args.tokens) for _ in range(args.repeats)]
    engine = make_engine(model)
    params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    batched = []
    with torch.inference_mode():
        for _ in range(args.repeats + 1):  # the first is a warm-up
            batch, _ = prompt_batch(model, prompts, engine.device)
            t0 = time.perf_counter()
            engine.generate_batch(batch, params)
            batched.append(len(prompts) * args.tokens / (time.perf_counter() - t0))
    result = {
        "model": str(args.model), "threads": args.threads, "repeats": args.repeats,
        "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
        "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
        "batched_tokens_per_s": statistics.median(batched[1:]), "batch": len(prompts),
        "load_average": os.getloadavg(),
    }  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
