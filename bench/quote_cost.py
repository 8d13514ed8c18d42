"""What quoting a tool's text (visto.tools.quote, --quote-results of visto chat and serve) costs
an answer: building its QuoteConstraint (one per answer: a pass over the vocabulary) and
masking each step, in CPU time, with a tokenizer of the quickstart's vocabulary size (1,024).

    OMP_NUM_THREADS=1 python bench/quote_cost.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import time

import torch

from visto.data.tokenizer import train_tokenizer
from visto.tools.quote import QuoteConstraint

LABEL = "SALE 50% OFF OAT MILK EUR 2.49".split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(0)
    # random words: enough merges to fill 1,024 entries, as the quickstart's tokenizer has
    pool = LABEL + ["".join(rng.choice(string.ascii_letters + string.digits)
                            for _ in range(rng.randint(2, 8))) for _ in range(3000)]  # fmt: skip
    texts = [" ".join(rng.choice(pool) for _ in range(8)) for _ in range(20000)]
    tok = train_tokenizer(texts, vocab_size=1024, loc_bins=32, min_frequency=1)
    builds, steps = [], []
    for rep in range(args.repeats):
        start = time.process_time()
        quote = QuoteConstraint(tok, LABEL, [tok.end_id])
        builds.append(time.process_time() - start)
        g = torch.Generator().manual_seed(rep)
        out: list[int] = []
        start = time.process_time()
        while True:  # greedy over random logits: which words is the draw's choice
            token = int(quote(out, torch.randn(tok.vocab_size, generator=g)).argmax())
            if token == tok.end_id:
                break
            out.append(token)
        steps.append((time.process_time() - start) / (len(out) + 1))
    print(f"vocabulary {tok.vocab_size}, {args.repeats} answers quoting {' '.join(LABEL)!r}")
    print(f"build: median {statistics.median(builds) * 1e3:.2f} ms CPU "
          f"(min {min(builds) * 1e3:.2f}, max {max(builds) * 1e3:.2f})")  # fmt: skip
    print(f"per step: median {statistics.median(steps) * 1e3:.3f} ms CPU "
          f"(min {min(steps) * 1e3:.3f}, max {max(steps) * 1e3:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
