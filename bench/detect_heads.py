"""Open-vocabulary detection heads compared on the same frozen features: which design choice
of the clipseg detector (visto.models.clipseg) buys the AP50.

    python bench/detect_heads.py --clip runs/clipseg-clip/checkpoint --data runs/r3/world \
        --json bench/out/detect_heads.json

The CLIP's last-layer patch tokens of the world's train / test / held-out images are computed
once (the tower is frozen in clipseg, so training on cached tokens is training the real heads
on the same inputs); each variant then trains only the detection heads (box MLP, class
embedding, per-patch scale and shift, query map) with the recipe clipseg-synth's optimizer
and schedule (AdamW 2e-3, weight decay 0.05, 30 warmup steps, cosine to 5%, batch 16, the
same random images for every variant) and is scored by visto.eval.dense's protocol: AP50
over the seen pairs on the test split and over the 7 held-out pairs on the held-out split.

    linear-bce     the query map a linear layer from the identity, BCE with pos_weight 10
                   (the detector before issue 17's fix)
    linear-focal   the same under a sigmoid focal loss
    std-bce        queries standardized by the training vocabulary's statistics first
    std-focal      both
    std-mlp-focal  standardized, an MLP as the query map, focal loss (what clipseg trains)

`probes`: what the frozen towers hold about colour (see `probes` below), the why of the fix.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

VARIANTS = {  # standardize, mlp, loss
    "linear-bce": (False, False, "bce"),
    "linear-focal": (False, False, "focal"),
    "std-bce": (True, False, "bce"),
    "std-focal": (True, False, "focal"),
    "std-mlp-focal": (True, True, "focal"),
}


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def ridge_accuracy(x_train, y_train, x_test, y_test, classes: int, lam: float = 1.0) -> float:
    """A linear probe: ridge regression onto one-hot labels, argmax; accuracy on the test rows."""
    import numpy as np

    a = np.c_[x_train, np.ones(len(x_train))]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ np.eye(classes)[y_train])
    return float(((np.c_[x_test, np.ones(len(x_test))] @ w).argmax(1) == y_test).mean())


def probes(tower, train_x, train_truth, test, grid: int) -> dict:
    """What the frozen towers hold about colour: the text embeddings of the 56 pair phrases
    (mean cosine of pairs sharing a shape / a colour; a probe fit on the 49 seen phrases
    naming the colour and the shape of the 7 held-out ones) and the last-layer patch token at
    each object's centre (a probe fit on train objects, scored on test objects)."""
    import numpy as np

    from visto.data.synth.prompts import pair_phrase, seen_pairs
    from visto.data.synth.vocab import COLOURS, SHAPES, heldout_pairs

    colours, shapes = list(COLOURS), list(SHAPES)
    pairs = seen_pairs() + heldout_pairs()
    emb = tower.embed_prompts([pair_phrase(*c) for c in pairs]).double().numpy()
    cos = emb @ emb.T
    same = lambda k: [cos[i, j] for i in range(56) for j in range(i + 1, 56)  # noqa: E731
                      if pairs[i][k] == pairs[j][k]]  # fmt: skip
    out = {"text.cos_same_shape": round(float(np.mean(same(1))), 3),
           "text.cos_same_colour": round(float(np.mean(same(0))), 3)}  # fmt: skip
    for name, k, vocab in (("colour", 0, colours), ("shape", 1, shapes)):
        y = np.array([vocab.index(c[k]) for c in pairs])
        out[f"text.heldout_{name}_probe"] = ridge_accuracy(emb[:49], y[:49], emb[49:], y[49:],
                                                          len(vocab), 1e-3)  # fmt: skip

    def centres(tokens, truths):
        xs, ys = [], []
        for b, truth in enumerate(truths):
            for o in truth["objects"]:
                x1, y1, x2, y2 = o["box"]
                cx, cy = (x1 + x2) / 2 / truth["width"], (y1 + y2) / 2 / truth["height"]
                k = min(grid - 1, int(cy * grid)) * grid + min(grid - 1, int(cx * grid))
                xs.append(tokens[b, k].numpy())
                ys.append((colours.index(o["colour"]), shapes.index(o["shape"])))
        return np.array(xs), np.array(ys)

    xa, ya = centres(train_x[:800], train_truth[:800])
    xb, yb = centres(*test)
    out["image.colour_probe"] = round(ridge_accuracy(xa, ya[:, 0], xb, yb[:, 0], len(colours)), 3)
    out["image.shape_probe"] = round(ridge_accuracy(xa, ya[:, 1], xb, yb[:, 1], len(shapes)), 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clip", required=True, help="the CLIP checkpoint the heads sit on")
    p.add_argument("--data", required=True, help="a synthetic world directory")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    import visto
    from visto.data.images import open_image
    from visto.data.synth import iter_records
    from visto.data.synth.prompts import pair_phrase, seen_pairs
    from visto.data.synth.vocab import heldout_pairs
    from visto.eval.dense import average_precision, detections
    from visto.eval.metrics import box_iou
    from visto.models.clipseg import (
        CLIPSeg,
        CLIPSegConfig,
        box_bias,
        cxcywh_to_xyxy,
        generalized_iou,
        sigmoid_focal_loss,
    )

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in names if v not in VARIANTS]:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clip = visto.load(args.clip)  # the heads' inputs come from CLIPSeg's own _tower
    tower = CLIPSeg(CLIPSegConfig(clip=clip.config, decoder_layers=1), clip=clip).eval()
    g = tower.grid

    def features(split: str, n: int) -> tuple[torch.Tensor, list[dict]]:
        records = [r for _, r in zip(range(n), iter_records(args.data, split), strict=False)]
        tokens = []
        for start in range(0, len(records), 64):
            images = [open_image(os.path.join(args.data, r["image"]))
                      for r in records[start : start + 64]]  # fmt: skip
            hidden, _ = tower._tower(tower._pixels(images))
            with torch.no_grad():
                tokens.append(tower.clip.vision_model.post_layernorm(hidden[-1][:, 1:]))
        return torch.cat(tokens), [r["truth"] for r in records]

    start = time.perf_counter()
    train_x, train_truth = features("train", args.train_images)
    splits = {"test": (*features("test", 1000), seen_pairs()),
              "heldout": (*features("heldout", 1000), heldout_pairs())}  # fmt: skip
    cache_s = time.perf_counter() - start
    classes = seen_pairs()
    n = g * g
    labels = torch.zeros(len(train_truth), n, len(classes))
    centre, boxes = torch.zeros(len(train_truth), n), torch.zeros(len(train_truth), n, 4)
    for b, truth in enumerate(train_truth):  # the targets clipseg's collate builds
        sx, sy = truth["width"], truth["height"]
        for o in truth["objects"]:
            x1, y1, x2, y2 = o["box"]
            cx, cy = (x1 + x2) / 2 / sx, (y1 + y2) / 2 / sy
            k = min(g - 1, int(cy * g)) * g + min(g - 1, int(cx * g))
            centre[b, k] = 1.0
            boxes[b, k] = torch.tensor([cx, cy, (x2 - x1) / sx, (y2 - y1) / sy])
            if (o["colour"], o["shape"]) in classes:
                labels[b, k, classes.index((o["colour"], o["shape"]))] = 1.0
    seen_emb = tower.embed_prompts([pair_phrase(*c) for c in classes])
    W, E = train_x.shape[-1], seen_emb.shape[1]

    class Heads(nn.Module):
        def __init__(self, standardize: bool, mlp: bool) -> None:
            super().__init__()
            self.box_head = nn.Sequential(nn.Linear(W, W), nn.GELU(), nn.Linear(W, 4))
            self.class_head = nn.Linear(W, E)
            self.norm = nn.BatchNorm1d(E, affine=False) if standardize else None
            if mlp:
                self.query = nn.Sequential(nn.Linear(E, E), nn.GELU(), nn.Linear(E, E))
            else:
                self.query = nn.Linear(E, E)
                if not standardize:  # as the detector was: from the identity
                    nn.init.eye_(self.query.weight)
                    nn.init.zeros_(self.query.bias)
            self.shift, self.scale = nn.Linear(W, 1), nn.Linear(W, 1)
            self.register_buffer("bias", box_bias(g))

        def forward(self, tokens, queries):
            q = self.norm(queries) if self.norm is not None else queries
            cos = (
                F.normalize(self.class_head(tokens), dim=-1) @ F.normalize(self.query(q), dim=-1).T
            )
            logits = cos * (F.elu(self.scale(tokens)) + 1) * 10 + self.shift(tokens)
            return logits, torch.sigmoid(self.box_head(tokens) + self.bias)

    def ap50(heads: Heads, tokens, truths, pairs) -> float:
        heads.eval()
        with torch.no_grad():
            logits, pred = heads(tokens, tower.embed_prompts([pair_phrase(*c) for c in pairs]))
        scores, pred = torch.sigmoid(logits), cxcywh_to_xyxy(pred).clamp(0, 1)
        found: list[list[tuple[float, bool]]] = [[] for _ in pairs]
        n_truth = [0] * len(pairs)
        for i, truth in enumerate(truths):
            size = (truth["width"], truth["height"])
            for q, pair in enumerate(pairs):
                objs = [o["box"] for o in truth["objects"] if (o["colour"], o["shape"]) == pair]
                n_truth[q] += len(objs)
                matched = [False] * len(objs)
                for score, box in detections(scores[i, :, q], pred[i], size):
                    best, best_iou = -1, 0.5
                    for j, t in enumerate(objs):
                        if not matched[j] and box_iou(box, t) >= best_iou:
                            best, best_iou = j, box_iou(box, t)
                    if best >= 0:
                        matched[best] = True
                    found[q].append((score, best >= 0))
        return float(
            np.mean([average_precision(f, k) for f, k in zip(found, n_truth, strict=True) if k])
        )

    out: dict = {"command": " ".join(sys.argv), "steps": args.steps, "load_before": loadavg(),
                 "cache_seconds": round(cache_s, 1), "variants": {}}  # fmt: skip
    out["probes"] = probes(tower, train_x, train_truth, splits["test"][:2], g)
    print("probes:", json.dumps(out["probes"]), flush=True)
    order = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, len(train_truth), (16,), generator=order) for _ in range(args.steps)
    ]
    for name in names:
        standardize, mlp, loss_name = VARIANTS[name]
        torch.manual_seed(0)
        heads = Heads(standardize, mlp)
        opt = torch.optim.AdamW(heads.parameters(), lr=2e-3, weight_decay=0.05, betas=(0.9, 0.98))
        t0 = time.perf_counter()
        for step, idx in enumerate(batches):
            cosine = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps))
            for group in opt.param_groups:
                group["lr"] = 2e-3 * min(1.0, (step + 1) / 30) * cosine
            heads.train()
            logits, pred = heads(train_x[idx], seen_emb)
            if loss_name == "focal":
                cls = sigmoid_focal_loss(logits, labels[idx])
            else:
                cls = F.binary_cross_entropy_with_logits(logits, labels[idx],
                                                         pos_weight=torch.tensor(10.0))  # fmt: skip
            on = centre[idx].bool()
            a, b = pred[on], boxes[idx][on]
            giou = generalized_iou(cxcywh_to_xyxy(a), cxcywh_to_xyxy(b))
            loss = cls + F.l1_loss(a, b) * 5 + (1 - giou).mean()
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
            opt.step()
        v = {split: round(ap50(heads, x, t, pairs), 4) for split, (x, t, pairs) in splits.items()}
        v["train_seconds"] = round(time.perf_counter() - t0, 1)
        out["variants"][name] = v
        print(f"{name:14s} AP50 test {v['test']:.3f}  held-out {v['heldout']:.3f}  "
              f"({v['train_seconds']} s)", flush=True)  # fmt: skip
    out["load_after"] = loadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
