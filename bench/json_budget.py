"""Constrained JSON at the edge of the token budget: how often the answer is valid JSON that
follows the schema, with the grammar alone and with the closing path (visto.infer.constrain),
and what the closing path costs per token.

    python bench/json_budget.py                               # runs/r3: the quickstart model
    python bench/json_budget.py --model runs/quickstart/checkpoint \
        --world runs/quickstart/world --images 20 --json bench/out/json_budget.json

Requests: each of the first --images test images of --world, asked "List the objects in the
image as JSON." (LangChain's with_structured_output sends such a request) under each schema
below, greedy, at every budget max_tokens from the fewest tokens that can close the schema
(`Grammars.fewest_tokens`) to that + --spread - 1. Both modes decode the same requests through
the engine (`Engine.generate_batch`, what `visto serve` runs, at batch 1); "grammar" hides the constraint's
`settle`, so only the token masks apply, as before the closing path.

Figures per mode and schema: valid (json.loads and the schema hold), stop (ended by the stop
token, not by length) over the requests; per token: the mean microseconds in the constraint's
mask (fill + unpack) and in settle (the closing path), beside the whole decode step (model
and constraint) per token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SCHEMAS = {
    # the issue's: a list of names, nothing bounded
    "names": {"type": "object", "properties": {
        "objects": {"type": "array", "items": {"type": "string"}}},
        "required": ["objects"], "additionalProperties": False},
    # a scene: a free description and objects with fields
    "scene": {"type": "object", "properties": {
        "description": {"type": "string"},
        "objects": {"type": "array", "items": {"type": "object", "properties": {
            "shape": {"type": "string"}, "colour": {"type": "string"}},
            "required": ["shape", "colour"], "additionalProperties": False}}},
        "required": ["description", "objects"], "additionalProperties": False},
}  # fmt: skip
QUESTION = "List the objects in the image as JSON."


class Timed:
    """A constraint with its time counted; `settle` only where `closing` (else hidden)."""

    def __init__(self, inner: Any, closing: bool, clock: dict[str, float]) -> None:
        self.inner, self.clock = inner, clock
        if closing:
            self.settle = self._settle

    def __call__(self, generated: list[int], logits: Any) -> Any:
        t = time.perf_counter()
        out = self.inner(generated, logits)
        self.clock["mask_s"] += time.perf_counter() - t
        self.clock["tokens"] += 1
        return out

    def _settle(self, generated: list[int], token: int, left: int) -> int:
        t = time.perf_counter()
        out = self.inner.settle(generated, token, left)
        self.clock["settle_s"] += time.perf_counter() - t
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/r3/checkpoint")
    ap.add_argument("--world", default="runs/r3/world")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--spread", type=int, default=12, help="budgets per request from the fewest")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    import torch

    from test_constrain_budget import conforms
    from visto.checkpoint import load
    from visto.data.sample import Sample, Turn
    from visto.data.special_tokens import IMAGE_PLACEHOLDER
    from visto.data.synth.reader import iter_samples
    from visto.infer import Engine, SamplingParams
    from visto.infer.constrain import Grammars
    from visto.tasks.runner import AnswerTokenizer, logits_width, prompt_batch

    torch.set_num_threads(1)
    model = load(args.model).eval()
    tokenizer = model.processor.tokenizer
    engine = Engine(model, AnswerTokenizer(tokenizer))
    grammars = Grammars(tokenizer, logits_width(model), list(engine.eos_token_ids))
    images = list({s.truth["image_id"]: s.images[0]
                   for s in iter_samples(args.world, "test", tasks=["caption"],
                                         limit=args.images)}.values())  # fmt: skip
    figures: dict[str, Any] = {"model": args.model, "images": len(images), "spread": args.spread}
    for name, schema in SCHEMAS.items():
        compiled = grammars.compile_json(schema)
        fewest = grammars.fewest_tokens(compiled)
        figures[f"{name}.fewest_tokens"] = fewest
        for mode in ("grammar", "closing"):
            clock = {"mask_s": 0.0, "settle_s": 0.0, "tokens": 0}
            valid = stopped = n = 0
            decode_s = decode_tokens = 0.0
            examples = []
            for image in images:
                sample = Sample("q", [image], [Turn("user", f"{IMAGE_PLACEHOLDER}\n{QUESTION}")])
                batch, _ = prompt_batch(model, [sample], engine.device)
                for budget in range(fewest, fewest + args.spread):
                    constraint = Timed(grammars.constraint(compiled), mode == "closing", clock)
                    params = SamplingParams(max_new_tokens=budget, logits_processor=constraint)
                    [out] = engine.generate_batch(batch, params)
                    decode_s += out.timing.decode_s
                    decode_tokens += out.timing.decode_tokens
                    n += 1
                    stopped += out.finish_reason == "stop"
                    try:
                        valid += conforms(json.loads(out.text), schema)
                    except json.JSONDecodeError:
                        pass
                    if len(examples) < 3 and budget == fewest + args.spread - 1:
                        examples.append(out.text)
            key = f"{name}.{mode}"
            figures.update({
                f"{key}.requests": n, f"{key}.valid": valid / n, f"{key}.stop": stopped / n,
                f"{key}.mask_us_per_token": 1e6 * clock["mask_s"] / clock["tokens"],
                f"{key}.settle_us_per_token": 1e6 * clock["settle_s"] / clock["tokens"],
                f"{key}.decode_step_us": 1e6 * decode_s / max(decode_tokens, 1),
                f"{key}.examples": examples,
            })  # fmt: skip
            print(f"{key}: {n} requests, valid {valid / n:.3f}, stop {stopped / n:.3f}; per "
                  f"token: mask {figures[f'{key}.mask_us_per_token']:.0f} us, settle "
                  f"{figures[f'{key}.settle_us_per_token']:.0f} us, decode step "
                  f"{figures[f'{key}.decode_step_us']:.0f} us; e.g. {examples[:1]}")  # fmt: skip
    print(f"load: {open('/proc/loadavg').read().strip()}")
    figures["loadavg"] = open("/proc/loadavg").read().split()[:3]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
