"""Copy probe: how many steps does the quickstart's decoder need to copy tokens it is handed?

The question focus hands a grounding answer its box as 4 `<focus>` slots right before the
answer, and read slots hand an OCR answer the reader's tokens the same way: the answer is a
copy from a fixed distance back. After 400 stage-1 steps with grounding and OCR questions in
every batch, the quickstart had not learned it (answer exact 0.000 for both; bench/README.md,
"Question focus"). This probe isolates the copy: the quickstart's decoder (4 x 256, 8 heads,
mimetic attention init), no image, sequences of

    [context: C random tokens, some of them "location" tokens (distractors)]
    [K slots: random location tokens]  [answer marker]  [answer: the K slot tokens]  [end]

with the loss on the answer and the end token only, AdamW 2e-3, batch 16. Arms:

    plain     the decoder alone: a fixed-distance copy it must learn through attention
    hint      the token to copy next added to the input where it is predicted (the marker
              gets slot 0, answer token i gets slot i + 1): a copy along the residual stream
    pointer   a pointer head beside the LM head (M4C's dynamic pointer network, Hu et al.
              2020; pointer-generator, See et al. 2017): scores q(h_t) . k_j over the K slots,
              one softmax with the vocabulary, slot probabilities added to their tokens' ids

It prints, per arm and seed, the exact-copy accuracy (every answer token the argmax, teacher
forced) on 128 held-out sequences every `--every` steps, and the first step at 0.9.

    python bench/copy_probe.py --steps 400 --seeds 0 1 --json bench/out/copy_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB, LOC = 1025, range(100, 200)  # location-like ids (the quickstart has 100 loc bins)
MARKER, END = 5, 6


def batch(gen: torch.Generator, n: int, context: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ids (n, T), labels (n, T) with -100 off the answer, slots (n, k))."""
    ctx = torch.randint(200, 1000, (n, context), generator=gen)
    distract = torch.rand(n, context, generator=gen) < 0.25  # other objects' boxes in the context
    ctx = torch.where(distract, torch.randint(LOC.start, LOC.stop, (n, context), generator=gen), ctx)
    slots = torch.randint(LOC.start, LOC.stop, (n, k), generator=gen)
    marker, end = torch.full((n, 1), MARKER), torch.full((n, 1), END)
    ids = torch.cat([ctx, slots, marker, slots, end], 1)
    labels = torch.full_like(ids, -100)
    start = context + k + 1  # the first answer token
    labels[:, start:] = ids[:, start:]
    return ids, labels, slots


class Probe(nn.Module):
    def __init__(self, arm: str, k: int) -> None:
        super().__init__()
        from visto.nn.language import DecoderConfig, DecoderLM

        config = DecoderConfig(vocab_size=VOCAB, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                               intermediate_size=768, attention_init="mimetic")  # fmt: skip
        self.lm, self.arm, self.k = DecoderLM(config), arm, k
        if arm == "pointer":
            self.query = nn.Linear(256, 256, bias=False)
            self.slot_keys = nn.Parameter(torch.randn(k + 1, 256) * 0.02)  # + "past the last slot"

    def forward(self, ids: Tensor, slots: Tensor, context: int) -> Tensor:
        """Log-probabilities (B, T, V) of the next token."""
        embed = self.lm.model.embed_tokens
        x = embed(ids)
        if self.arm == "hint":  # the token to copy next, where it is predicted
            start = context + self.k  # the marker predicts answer token 0
            nxt = torch.cat([slots, torch.full_like(slots[:, :1], END)], 1)  # (B, k + 1)
            x = x.clone()
            x[:, start : start + self.k + 1] += embed(nxt)
        hidden = {}
        hook = self.lm.model.norm.register_forward_hook(lambda m, i, o: hidden.setdefault("h", o))
        logits, _ = self.lm(inputs_embeds=x)
        hook.remove()
        if self.arm != "pointer":
            return logits.log_softmax(-1)
        scores = self.query(hidden["h"]) @ self.slot_keys.T  # (B, T, k + 1)
        joint = torch.cat([logits, scores[..., : self.k]], -1).log_softmax(-1)  # vocabulary + slots
        copy = joint[..., VOCAB:].exp()  # (B, T, k)
        to_ids = torch.zeros(*copy.shape[:2], VOCAB).scatter_add(-1, slots[:, None].expand(-1, copy.shape[1], -1), copy)
        return torch.log(joint[..., :VOCAB].exp() + to_ids + 1e-12)


def exact(model: Probe, ids: Tensor, labels: Tensor, slots: Tensor, context: int) -> float:
    with torch.no_grad():
        pred = model(ids, slots, context)[:, :-1].argmax(-1)
    target = labels[:, 1:]
    ok = (pred == target) | (target == -100)
    return float(ok.all(1).float().mean())


def run(arm: str, seed: int, steps: int, every: int, context: int, k: int) -> dict:
    torch.manual_seed(seed)
    model = Probe(arm, k)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), weight_decay=0.05)
    gen, held = torch.Generator().manual_seed(1000 + seed), torch.Generator().manual_seed(7)
    test = batch(held, 128, context, k)
    curve, t0 = [], time.time()
    for step in range(1, steps + 1):
        ids, labels, slots = batch(gen, 16, context, k)
        logp = model(ids, slots, context)
        loss = F.nll_loss(logp[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % every == 0:
            curve.append((step, exact(model, *test, context), float(loss)))
            print(f"{arm} seed {seed} step {step}: exact {curve[-1][1]:.3f} loss {curve[-1][2]:.3f}", flush=True)
    first = next((s for s, acc, _ in curve if acc >= 0.9), None)
    return {"arm": arm, "seed": seed, "curve": curve, "first_step_at_0.9": first, "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=["plain", "hint", "pointer"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--context", type=int, default=60, help="tokens before the slots")
    ap.add_argument("--slots", type=int, default=4, help="tokens to copy (4: a box)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    results = [run(arm, seed, a.steps, a.every, a.context, a.slots) for arm in a.arms for seed in a.seeds]
    print(f"\ncopy probe: {a.slots} slots after {a.context} context tokens, {a.steps} steps at batch 16, "
          f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| arm | seed | exact at the last step | first step at 0.9 | seconds |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['arm']} | {r['seed']} | {r['curve'][-1][1]:.3f} | {r['first_step_at_0.9'] or '-'} | {r['seconds']:.0f} |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))


if __name__ == "__main__":
    main()
