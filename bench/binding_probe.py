"""Binding probe: how fast does a from-scratch decoder learn "which colour does the <shape> have?"
over several objects, depending on how the objects reach it and on the optimisation levers?

Ideal (oracle) visual features, no vision tower: this isolates the decoder's two-hop problem
(find the named object, then read its colour) from perception. The decoder is the quickstart's
size (4 layers x 256, 8 heads), batch 32, AdamW; one question per sample; scenes of 2-7 objects
(each shape at most once, so the question names one object).

Tokens (how the image reaches the decoder):
    tags       one token per object: the decoder's own word embedding of its colour + that of its
               shape (OSCAR's object tags as embeddings)
    objects    one token per object: a learned projection of one-hot (colour, shape)
    patchtags  64 tokens: the `tags` tokens at random cells, a learned background elsewhere

Levers (each a flag; combine them):
    --init mimetic    W_q = W_k per head at init, so q.k starts as a similarity and a token
                      attends to tokens like itself (Trockman & Kolter 2023, mimetic init)
    --normsoftmax G   attention logits divided by max(std/G, 1) (Hoffmann et al. 2023, the
                      "Eureka-moments" NormSoftmax)
    --qknorm          query/key normalisation
    --qfirst          the question before the object tokens (objects can see the question)
    --attnsup W       a loss pulling the answer position's attention onto the named object,
                      --attnsup-layers "last" | "all" | "1,2" (mean over heads or --attnsup-heads max)
    --curriculum N    scenes grow from 2 objects to 7, one more every N steps
    --feature-ratio R add to each object token a learned projection of an informative but
                      not word-tied feature (a fixed random code of its colour and shape, plus
                      noise), starting at R times the tags' size: the real connector's
                      `feature` term, which came out ~100x the tags in the quickstart
    --embed-std S     word embeddings start N(0, S^2) (the real decoder: 0.02, as Llama's
                      initializer_range) instead of torch's N(0, 1)
    --feature-norm    that feature LayerNormed and its projection zero-initialised (what
                      ProjectorConfig.norm does for the regions connector)

Each run prints the held-out accuracy every 50 steps and a RESULT line with the first step at
which accuracy reached 0.95; `--json F` appends the result to F (one JSON object per line).
Table of measured runs: bench/README.md ("Binding probe").

    python bench/binding_probe.py tags --init mimetic --steps 1000 --json bench/out/binding.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

COLOURS, SHAPES, SLOTS = 8, 7, 7
WORDS = ["<pad>", "which", "colour", "does", "the", "have", "?"]
WORDS += [f"c{i}" for i in range(COLOURS)] + [f"s{i}" for i in range(SHAPES)]
WORD = {w: i for i, w in enumerate(WORDS)}
COLOUR_IDS = torch.tensor([WORD[f"c{i}"] for i in range(COLOURS)])
SHAPE_IDS = torch.tensor([WORD[f"s{i}"] for i in range(SHAPES)])
QUESTION_LEN = 7
FEATURE_DIM = 64  # the --feature-ratio term's input width  # which colour does the <shape> have ?


def rotary(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding over (B, H, T, hd), half-split layout as Llama's."""
    T, hd = x.shape[-2], x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.arange(T).float()[:, None] * freqs[None]  # (T, hd/2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(nn.Module):
    def __init__(self, d: int, heads: int, qknorm: bool, normsoftmax: float, mimetic: bool, rope: bool) -> None:
        super().__init__()
        self.heads, self.qknorm, self.normsoftmax, self.rope = heads, qknorm, normsoftmax, rope
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        if mimetic:
            # q.k = x W W^T x^T: positive semi-definite, so at init a token prefers keys like itself.
            with torch.no_grad():
                self.qkv.weight[d : 2 * d] = self.qkv.weight[:d]
                self.qkv.bias[d : 2 * d] = self.qkv.bias[:d]
        self.attn: torch.Tensor | None = None  # (B, H, T, T) of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        hd = D // self.heads
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        if self.rope:  # rotary positions, as the real decoder (Llama layout) has
            q, k = rotary(q), rotary(k)
        if self.qknorm:
            q, k = F.normalize(q, dim=-1) * 2 * hd**0.25, F.normalize(k, dim=-1) * 2 * hd**0.25
        logits = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        if self.normsoftmax:
            # std over the keys each query may see (the causal row), not the masked ones
            n = causal.sum(-1, keepdim=True)
            mean = (logits * causal).sum(-1, keepdim=True) / n
            std = (((logits - mean) ** 2 * causal).sum(-1, keepdim=True) / n + 1e-6).sqrt()
            logits = logits / torch.clamp(std / self.normsoftmax, min=1.0)
        attn = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        self.attn = attn
        y = (attn @ v).transpose(1, 2).reshape(B, T, D)
        x = x + self.out(y)
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    def __init__(self, tokens: str, qfirst: bool, d: int = 256, layers: int = 4, heads: int = 8,
                 qknorm: bool = False, normsoftmax: float = 0.0, mimetic: bool = False,
                 rope: bool = False, feature_ratio: float = 0.0, feature_norm: bool = False,
                 embed_std: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        self.tokens, self.qfirst = tokens, qfirst
        self.embed = nn.Embedding(len(WORDS), d)
        if embed_std != 1.0:  # (no redraw at torch's default, so seeded runs stay as measured)
            nn.init.normal_(self.embed.weight, std=embed_std)
        self.rope = rope
        self.pos = nn.Embedding(128, d)
        self.image_type = nn.Parameter(torch.zeros(d))  # marks visual tokens
        self.project = nn.Linear(COLOURS + SHAPES, d)
        self.background = nn.Parameter(torch.randn(d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, qknorm, normsoftmax, mimetic, rope) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.use_feature = feature_ratio > 0 or feature_norm
        self.register_buffer("codes", torch.randn(COLOURS * SHAPES, FEATURE_DIM))
        self.feature_in = nn.LayerNorm(FEATURE_DIM) if feature_norm else nn.Identity()
        self.feature = nn.Linear(FEATURE_DIM, d)
        with torch.no_grad():
            if feature_norm:  # the token starts as its tags; the feature grows as the loss asks
                self.feature.weight.zero_()
            else:  # output rms = ratio x the tags' rms (two N(0, embed_std^2) embeddings)
                std = feature_ratio * embed_std * math.sqrt(2) / math.sqrt(FEATURE_DIM)
                self.feature.weight.normal_(0.0, std)
            self.feature.bias.zero_()

    def visual(self, colours, shapes, present, cells):
        if self.tokens in ("tags", "patchtags"):
            vis = self.embed(COLOUR_IDS[colours]) + self.embed(SHAPE_IDS[shapes])
        else:
            onehot = torch.cat([F.one_hot(colours, COLOURS), F.one_hot(shapes, SHAPES)], -1).float()
            vis = self.project(onehot)
        if self.use_feature:
            code = self.codes[colours * SHAPES + shapes]
            vis = vis + self.feature(self.feature_in(code + 0.1 * torch.randn_like(code)))
        vis = (vis + self.image_type) * present[..., None]  # (B, K, d)
        if self.tokens == "patchtags":
            where = F.one_hot(cells, 64).float() * present[..., None]  # (B, K, 64)
            noise = torch.randn(vis.shape[0], 64, vis.shape[-1]) * 0.02
            vis = self.background + noise + where.transpose(1, 2) @ (vis - self.background * present[..., None])
        return vis

    def forward(self, colours, shapes, present, cells, question):
        vis = self.visual(colours, shapes, present, cells)
        words = self.embed(question)
        x = torch.cat([words, vis] if self.qfirst else [vis, words], 1)
        if self.qfirst:  # the answer is read after the objects: repeat "?" as the answer position
            x = torch.cat([x, self.embed(question[:, -1:])], 1)
        if not self.rope:
            x = x + self.pos(torch.arange(x.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, -1]) @ self.embed.weight.T

    def visual_span(self, n_visual: int) -> slice:
        start = QUESTION_LEN if self.qfirst else 0
        return slice(start, start + n_visual)


def scenes(n: int, kmin: int, kmax: int, g: torch.Generator):
    colours = torch.randint(0, COLOURS, (n, SLOTS), generator=g)
    shapes = torch.rand(n, SHAPES, generator=g).argsort(1)[:, :SLOTS]  # distinct shapes
    counts = torch.randint(kmin, kmax + 1, (n,), generator=g)
    present = torch.arange(SLOTS)[None] < counts[:, None]
    cells = torch.rand(n, 64, generator=g).argsort(1)[:, :SLOTS]
    target = (torch.rand(n, generator=g) * counts).long()
    named = shapes[torch.arange(n), target]
    q = [WORD["which"], WORD["colour"], WORD["does"], WORD["the"], 0, WORD["have"], WORD["?"]]
    question = torch.tensor(q).repeat(n, 1)
    question[:, 4] = SHAPE_IDS[named]
    answer = COLOUR_IDS[colours[torch.arange(n), target]]
    return (colours, shapes, present, cells, question), answer, counts, target


def attention_loss(model: Decoder, target, cells, layers: list[int], reduce: str) -> torch.Tensor:
    """-log of the answer position's attention on the named object's token, per chosen layer."""
    n_visual = 64 if model.tokens == "patchtags" else SLOTS
    span = model.visual_span(n_visual)
    pos = cells[torch.arange(len(target)), target] if model.tokens == "patchtags" else target
    loss = torch.zeros(())
    for i in layers:
        att = model.blocks[i].attn[:, :, -1, span]  # (B, H, n_visual)
        att = att.mean(1) if reduce == "mean" else att.max(1).values
        loss = loss - torch.log(att[torch.arange(len(pos)), pos] + 1e-6).mean()
    return loss / len(layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tokens", choices=["tags", "objects", "patchtags"])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kmin", type=int, default=2)
    ap.add_argument("--init", choices=["default", "mimetic"], default="default")
    ap.add_argument("--normsoftmax", type=float, default=0.0, help="gamma; 0 = plain softmax")
    ap.add_argument("--qknorm", action="store_true")
    ap.add_argument("--qfirst", action="store_true")
    ap.add_argument("--rope", action="store_true", help="rotary positions instead of learned absolute ones")
    ap.add_argument("--attnsup", type=float, default=0.0)
    ap.add_argument("--attnsup-layers", default="last")
    ap.add_argument("--attnsup-heads", choices=["mean", "max"], default="mean")
    ap.add_argument("--curriculum", type=int, default=0)
    ap.add_argument("--feature-ratio", type=float, default=0.0,
                    help="add a learned feature term starting at this multiple of the tags' rms")
    ap.add_argument("--embed-std", type=float, default=1.0,
                    help="word embeddings' starting std (the real decoder: 0.02)")
    ap.add_argument("--feature-norm", action="store_true",
                    help="that feature LayerNormed, its projection zero-initialised")
    ap.add_argument("--stop-at", type=float, default=0.99, help="stop once held-out accuracy reaches this")
    ap.add_argument("--json", help="append the result to this JSON-lines file")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    model = Decoder(a.tokens, a.qfirst, qknorm=a.qknorm, normsoftmax=a.normsoftmax,
                    mimetic=a.init == "mimetic", rope=a.rope, feature_ratio=a.feature_ratio,
                    feature_norm=a.feature_norm, embed_std=a.embed_std)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    layers = {"last": [len(model.blocks) - 1], "all": list(range(len(model.blocks)))}.get(a.attnsup_layers)
    layers = layers if layers is not None else [int(x) for x in a.attnsup_layers.split(",")]
    g, g_eval = torch.Generator().manual_seed(a.seed), torch.Generator().manual_seed(999)
    held_x, held_y, held_k, _ = scenes(1024, a.kmin, SLOTS, g_eval)
    t0, first95, acc, curve = time.time(), None, 0.0, []
    step = 0
    for step in range(1, a.steps + 1):
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, step / max(1, a.warmup))
        kmax = min(SLOTS, a.kmin + step // a.curriculum) if a.curriculum else SLOTS
        x, y, _, target = scenes(a.batch, a.kmin, kmax, g)
        loss = F.cross_entropy(model(*x), y)
        if a.attnsup:
            loss = loss + a.attnsup * attention_loss(model, target, x[3], layers, a.attnsup_heads)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or time.time() - t0 > a.seconds:
            with torch.no_grad():
                pred = model(*held_x).argmax(-1)
            acc = (pred == held_y).float().mean().item()
            many = ((pred == held_y) & (held_k >= 5)).float().sum().item() / (held_k >= 5).sum().item()
            curve.append((step, round(acc, 3)))
            print(f"step {step} {time.time() - t0:.0f}s loss {loss.item():.3f} acc {acc:.3f} acc(k>=5) {many:.3f}", flush=True)
            if acc >= 0.95 and first95 is None:
                first95 = step
            if acc >= a.stop_at or time.time() - t0 > a.seconds:
                break
    result = {k: v for k, v in vars(a).items() if k not in ("json", "threads", "seconds")}
    result.update(steps_run=step, acc=round(acc, 3), first_step_acc95=first95,
                  seconds=round(time.time() - t0, 1), curve=curve, load=os.getloadavg()[0])  # fmt: skip
    print("RESULT " + json.dumps({k: v for k, v in result.items() if k != "curve"}))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
