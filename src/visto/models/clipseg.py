"""Text-prompted segmentation (CLIPSeg, Lüddecke & Ecker 2022) and open-vocabulary detection
(OWL-ViT, Minderer et al. 2022): light heads over one frozen two-tower (CLIP) model.

    image  -> CLIP's ViT, frozen: the hidden states of its layers (B, 1 + N, W) and, with a
              conv stem, the stem's maps at S/2, S/4, ... (what the tower saw before patches)
    prompt -> CLIP's text tower and projection, frozen: e (E,), unit length

    segment (CLIPSeg, section 3.1): the patch tokens of the last `decoder_layers` layers,
        deepest first, each reduced to D and added to a small transformer's stream; after the
        first, FiLM by the prompt (x = mul(e) * x + add(e)). The grid of tokens is then grown
        2x at a time to the image, each step joined with the stem's map of that size (the
        pixels at the last): CLIPSeg's transposed convolution alone draws blobs of 16-pixel
        patches, too coarse for a 20-pixel star.               -> mask logits (S, S)
    detect (OWL-ViT, section 3.1): each patch of the last layer predicts one box (an MLP plus
        a bias that centres it on its patch, then a sigmoid) and a class embedding; a query's
        logit on a patch is the cosine of that embedding with the query's text embedding
        (standardized by the training queries' statistics, then an MLP), scaled and shifted
        per patch, so any text is a class.                    -> (N, Q) logits, (N, 4) boxes

Trained on the synthetic world (`visto train --recipe clipseg-synth`): the samples of the
world's "segment" kind carry each image's prompts and instance mask
(visto.data.synth.prompts); detection learns the seen colour-shape pairs as queries, one
positive patch per object (the one holding its box centre, as CenterNet assigns), under a
focal loss. The CLIP is part of the checkpoint, so one directory answers both.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from visto.data.sample import Sample
from visto.data.synth.prompts import Prompt, pair_phrase, prompt_mask, seen_pairs
from visto.errors import UserError
from visto.models.clip import CLIP, CLIPConfig
from visto.models.common import refuse_part_paths
from visto.nn.transformer import EncoderBlock


@dataclass
class CLIPSegConfig:
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    # A visto CLIP checkpoint whose config, weights and processor the model starts from; read
    # by visto.pretrained.build_model, then forgotten (its config replaces `clip`).
    clip_init: str | None = None
    width: int = 64  # D: the decoder's width
    decoder_layers: int = 3  # transformer blocks, one per ViT layer read (the last ones)
    heads: int = 4
    prompts_per_image: int = 4  # segmentation prompts drawn per training image
    seg_weight: float = 1.0
    det_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise UserError(f"clipseg width {self.width} must be divisible by heads {self.heads}")
        if not 1 <= self.decoder_layers <= self.clip.vision.layers:
            raise UserError(f"clipseg decoder_layers must be 1..{self.clip.vision.layers} (the "
                            f"ViT's layers), got {self.decoder_layers}")  # fmt: skip
        if self.prompts_per_image < 1:
            raise UserError(f"prompts_per_image must be >= 1, got {self.prompts_per_image}")


def box_bias(grid: int) -> Tensor:
    """(N, 4) logits that put each patch's default box (cx, cy, w, h) on that patch, one patch
    wide (OWL-ViT's `compute_box_bias`)."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    xy = torch.stack([xs.flatten(), ys.flatten()], dim=1)  # (N, 2), row-major like the patches
    wh = torch.full_like(xy, 1.0 / grid)
    return torch.logit(torch.cat([xy, wh], dim=1))


def cxcywh_to_xyxy(b: Tensor) -> Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def generalized_iou(a: Tensor, b: Tensor) -> Tensor:
    """Paired (x1, y1, x2, y2) boxes (..., 4) -> GIoU (...) (Rezatofighi et al. 2019)."""
    area = lambda t: (t[..., 2] - t[..., 0]).clamp(min=0) * (t[..., 3] - t[..., 1]).clamp(min=0)  # noqa: E731
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area(a) + area(b) - inter
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).prod(-1)
    return inter / union.clamp(min=1e-6) - (hull - union) / hull.clamp(min=1e-6)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:  # fmt: skip
    """Focal loss (Lin et al. 2017, as OWL-ViT and DETR's successors train their classes),
    summed and divided by the number of positives: of a patch's 49 queries the hard negatives
    are the few that share a word with its object; BCE lets the thousands of easy ones
    (other shapes, background patches) outweigh them, the (1 - p_t)^gamma factor does not."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    weight = alpha * targets + (1 - alpha) * (1 - targets)
    return (weight * ce * (1 - p_t) ** gamma).sum() / targets.sum().clamp(min=1.0)


class Upsampler(nn.Module):
    """Decoder grid (B, D, g, g) -> (B, 1, S, S): 2x steps, each joined with a skip map.

    The masks come out at the largest skip's size (S/2 with a conv stem) and are resized to
    the image: a perfect mask at S/2, resized so, keeps an IoU of 0.98 on the world's single
    objects (0.94 at S/4), and each step at full size, run once per prompt, cost as much as
    all the others together. Steps up to S/4 are 3x3 convolutions (where a shape's outline is
    drawn), larger ones 1x1 (each pixel decided from the upsampled features and the stem's
    map there), for the same reason."""

    def __init__(
        self, width: int, skip_channels: list[int], skip_sizes: list[int], size: int
    ) -> None:
        super().__init__()
        chans = [width] + [max(16, width >> (k + 1)) for k in range(len(skip_channels))]
        self.steps = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in + c_skip, c_out, 3 if side <= size // 4 else 1,
                                    padding=1 if side <= size // 4 else 0), nn.GELU())
            for c_in, c_skip, c_out, side in zip(chans[:-1], skip_channels, chans[1:], skip_sizes,
                                                 strict=True)
        )  # fmt: skip
        self.out = nn.Conv2d(chans[-1], 1, 1)

    def forward(self, x: Tensor, skips: list[Tensor]) -> Tensor:
        """(B, D, g, g) and the skips, smallest first -> logits (B, 1, s, s), s the last skip's."""
        for step, skip in zip(self.steps, skips, strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = step(torch.cat([x, skip], dim=1))
        return self.out(x)


class CLIPSeg(nn.Module):
    family = "clipseg"

    def __init__(self, config: CLIPSegConfig, clip: CLIP | None = None) -> None:
        """`clip`: a trained CLIP with its processor, built elsewhere (visto.pretrained reads
        clip_init); its config replaces `config.clip`. Without it, a fresh CLIP."""
        super().__init__()
        refuse_part_paths(config, self.family)
        if clip is not None:
            config = replace(config, clip=clip.config)
        self.config = config
        self.clip = clip if clip is not None else CLIP(config.clip)
        self.clip.requires_grad_(False)  # frozen, as in CLIPSeg and LiT: only the heads learn
        vision, D, E = config.clip.vision, config.width, config.clip.embed_dim
        W = self.clip.vision_model.output_dim
        self.grid = vision.image_size // vision.patch_size
        self.reduces = nn.ModuleList(nn.Linear(W, D) for _ in range(config.decoder_layers))
        self.film_mul = nn.Linear(E, D)
        self.film_add = nn.Linear(E, D)
        self.blocks = nn.ModuleList(
            EncoderBlock(D, config.heads, 4 * D) for _ in range(config.decoder_layers)
        )
        with torch.no_grad():  # the skip maps' channels, read off a dry run of the stem
            _, maps = self._tower(torch.zeros(1, 3, vision.image_size, vision.image_size))
        self.upsampler = Upsampler(
            D, [m.shape[1] for m in maps], [m.shape[-1] for m in maps], vision.image_size
        )
        self.box_head = nn.Sequential(nn.Linear(W, W), nn.GELU(), nn.Linear(W, 4))
        self.register_buffer("box_bias", box_bias(self.grid), persistent=False)
        self.class_head = nn.Linear(W, E)
        # The frozen text space barely separates colours (on the world's CLIP the pairs sharing
        # a shape have cosine 0.94, those sharing a colour 0.33), though a linear probe reads
        # the colour of every held-out pair off it: the colour lies along directions of small
        # variance, which a map of the raw embedding hardly learns to use (its gradient scales
        # with the input). So each feature is first standardized by the statistics of the
        # training queries (BatchNorm's running mean and variance, kept at inference), then an
        # MLP maps the queries into the class embeddings' space.
        self.register_buffer("query_mean", torch.zeros(E))
        self.register_buffer("query_var", torch.ones(E))
        self.query_proj = nn.Sequential(nn.Linear(E, E), nn.GELU(), nn.Linear(E, E))
        self.logit_shift = nn.Linear(W, 1)
        self.logit_scale = nn.Linear(W, 1)
        self.clip.eval()

    # -- processor: the CLIP's (image transform and tokenizer)

    @property
    def processor(self) -> Any:
        return self.clip.processor

    @processor.setter
    def processor(self, processor: Any) -> None:
        self.clip.processor = processor

    def train(self, mode: bool = True) -> CLIPSeg:
        super().train(mode)
        self.clip.eval()
        return self

    # -- the frozen towers

    @torch.no_grad()
    def _tower(self, pixels: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(hidden states after each layer (B, 1 + N, W), the conv stem's maps larger than
        the patch grid, smallest first: S/8, S/4, S/2 for 16-pixel patches)."""
        vit = self.clip.vision_model
        emb = vit.embeddings
        x, maps = pixels, []
        if isinstance(emb.patch_embedding, nn.Sequential):  # conv stem: keep each stride's map
            for layer in emb.patch_embedding:
                x = layer(x)
                if isinstance(layer, nn.GELU):
                    maps.append(x)
        else:
            x = emb.patch_embedding(x)
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, W)
        h = torch.cat([emb.class_embedding.expand(len(x), 1, -1), tokens], 1) + emb.positions()
        h = vit.pre_layrnorm(h)
        hidden = []
        for block in vit.encoder.layers:
            h = block(h)
            hidden.append(h)
        # Skips for the upsampler: the stem's maps larger than the grid, smallest first.
        skips = [m for m in maps if m.shape[-1] > self.grid]
        return hidden, sorted(skips, key=lambda m: m.shape[-1])

    @torch.no_grad()
    def embed_prompts(self, texts: list[str]) -> Tensor:
        """Strings -> (Q, E) unit vectors from the CLIP's text tower."""
        return self.clip.encode_text(list(texts))

    # -- heads

    def segment_logits(self, hidden: list[Tensor], skips: list[Tensor], image_index: Tensor,
                       prompt_emb: Tensor) -> Tensor:  # fmt: skip
        """Mask logits (Q, s, s) for Q prompts, prompt q on image `image_index[q]` (s = S/2 with
        a conv stem, the patch grid without)."""
        layers = hidden[::-1][: self.config.decoder_layers]  # deepest first
        x = None
        for k, (h, reduce, block) in enumerate(zip(layers, self.reduces, self.blocks, strict=True)):
            r = reduce(h[image_index, 1:])  # (Q, N, D), the class token left out
            x = r if x is None else x + r
            if k == 0:  # FiLM (Perez et al. 2018): the prompt scales and shifts every token
                x = self.film_mul(prompt_emb)[:, None] * x + self.film_add(prompt_emb)[:, None]
            x = block(x)
        g = self.grid
        x = x.transpose(1, 2).reshape(len(x), -1, g, g)  # (Q, D, g, g)
        return self.upsampler(x, [s[image_index] for s in skips]).squeeze(1)  # (Q, s, s)

    def detect_outputs(self, hidden: list[Tensor], query_emb: Tensor) -> tuple[Tensor, Tensor]:
        """(logits (B, N, Q), boxes (B, N, 4) as (cx, cy, w, h) / side) for Q queries."""
        tokens = self.clip.vision_model.post_layernorm(hidden[-1][:, 1:])  # (B, N, W)
        boxes = torch.sigmoid(self.box_head(tokens) + self.box_bias)
        cls = F.normalize(self.class_head(tokens), dim=-1)  # (B, N, E)
        # a training step's queries are the whole seen vocabulary, so their batch statistics
        # are the vocabulary's; inference (no grad) uses the running ones for any query set
        learn = self.training and torch.is_grad_enabled()
        z = F.batch_norm(query_emb, self.query_mean, self.query_var, training=learn)
        cos = cls @ F.normalize(self.query_proj(z), dim=-1).T  # (B, N, Q)
        # OWL-ViT's per-patch scale (elu + 1 keeps it positive) and shift
        logits = (cos * (F.elu(self.logit_scale(tokens)) + 1) * 10) + self.logit_shift(tokens)
        return logits, boxes

    # -- training

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        hidden, skips = self._tower(batch["pixel_values"])
        prompt_emb = self.embed_prompts(batch["prompts"])
        logits = self.segment_logits(hidden, skips, batch["prompt_image"], prompt_emb)
        # Targets at the logits' size: the share of each cell the prompt covers.
        target = F.adaptive_avg_pool2d(batch["masks"][:, None], logits.shape[-2:])[:, 0]
        bce = F.binary_cross_entropy_with_logits(logits, target)
        prob = torch.sigmoid(logits)
        inter = (prob * target).flatten(1).sum(1)
        dice = 1 - (2 * inter + 1) / (prob.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
        seg_loss = bce + dice.mean()

        det_logits, boxes = self.detect_outputs(hidden, self.embed_prompts(batch["classes"]))
        labels, centre = batch["det_labels"], batch["det_centre"]  # (B, N, C), (B, N)
        cls_loss = sigmoid_focal_loss(det_logits, labels)
        on = centre.bool()
        box_loss = torch.zeros((), device=labels.device)
        if on.any():
            pred, true = boxes[on], batch["det_boxes"][on]
            giou = generalized_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(true))
            box_loss = F.l1_loss(pred, true) * 5 + (1 - giou).mean()  # DETR's weights
        det_loss = cls_loss + box_loss
        loss = self.config.seg_weight * seg_loss + self.config.det_weight * det_loss
        with torch.no_grad():
            hard = logits > 0
            t = target > 0.5
            union = (hard | t).flatten(1).sum(1)
            iou = ((hard & t).flatten(1).sum(1) / union.clamp(min=1))[union > 0]
            out = {"loss": loss, "seg_loss": seg_loss.detach(), "det_loss": det_loss.detach(),
                   "box_loss": box_loss.detach(),
                   "iou": iou.mean() if len(iou) else torch.tensor(float("nan"))}  # fmt: skip
            if on.any():
                best = det_logits.argmax(dim=1)  # (B, C): the top patch per class
                has = labels.amax(dim=1) > 0  # (B, C): classes present
                hit = labels.gather(1, best[:, None, :]).squeeze(1) > 0
                out["det_top1"] = hit[has].float().mean()
        return out

    def collate(self, samples: list[Sample]) -> dict[str, Any]:
        """Samples of the world's "segment" kind -> pixel_values (B, 3, S, S); prompts (Q strings,
        up to prompts_per_image an image, drawn at random) with prompt_image (Q,) and masks
        (Q, S, S); detection targets for the seen colour-shape pairs (classes, C strings):
        det_labels (B, N, C), det_centre (B, N), det_boxes (B, N, 4)."""
        size = self.config.clip.vision.image_size
        classes = seen_pairs()
        g, n = self.grid, self.grid * self.grid
        prompts, owner, masks = [], [], []
        labels = torch.zeros(len(samples), n, len(classes))
        centre, boxes = torch.zeros(len(samples), n), torch.zeros(len(samples), n, 4)
        for b, s in enumerate(samples):
            item = (s.truth or {}).get("item") or {}
            if not s.images or "prompts" not in item or "mask" not in item:
                raise UserError(f"sample {s.id!r} is not a segmentation sample: clipseg trains on "
                                'the world\'s "segment" kind (data.tasks ["segment"])')  # fmt: skip
            truth = s.truth
            with Image.open(item["mask"]) as m:
                instance = np.asarray(m, np.uint8)
            chosen = [Prompt.from_json(p) for p in item["prompts"]]
            pick = torch.randperm(len(chosen))[: self.config.prompts_per_image].tolist()
            for k in pick:
                target = prompt_mask(instance, truth, chosen[k])
                if target.shape != (size, size):
                    target = np.asarray(Image.fromarray(target).resize((size, size), Image.NEAREST))
                prompts.append(chosen[k].text)
                owner.append(b)
                masks.append(torch.from_numpy(target.astype(np.float32)))
            sx, sy = truth["width"], truth["height"]
            for o in truth["objects"]:
                x1, y1, x2, y2 = o["box"]
                cx, cy = (x1 + x2) / 2 / sx, (y1 + y2) / 2 / sy
                k = min(g - 1, int(cy * g)) * g + min(g - 1, int(cx * g))
                centre[b, k] = 1.0
                boxes[b, k] = torch.tensor([cx, cy, (x2 - x1) / sx, (y2 - y1) / sy])
                pair = (o["colour"], o["shape"])
                if pair in classes:  # a held-out pair is never a training query
                    labels[b, k, classes.index(pair)] = 1.0
        return {
            "pixel_values": self.clip.image_tensor([s.images[0] for s in samples]),
            "prompts": prompts,
            "prompt_image": torch.tensor(owner, dtype=torch.long),
            "masks": torch.stack(masks),
            "classes": [pair_phrase(*p) for p in classes],
            "det_labels": labels,
            "det_centre": centre,
            "det_boxes": boxes,
        }

    # -- inference

    def _pixels(self, images: list[Image.Image]) -> Tensor:
        device = self.box_bias.device
        return self.clip.image_tensor([im.convert("RGB") for im in images]).to(device)

    @torch.no_grad()
    def segment(self, images: list[Image.Image], prompts: list[str],
                image_index: list[int] | None = None) -> list[np.ndarray]:  # fmt: skip
        """Mask probabilities, one (H, W) float array per prompt at its image's size. Prompt i
        is asked of images[image_index[i]]; by default every prompt of a single image, or
        prompt i of image i."""
        if image_index is None:
            if len(images) not in (1, len(prompts)):
                raise UserError(f"give one image or one per prompt, got {len(images)} for "
                                f"{len(prompts)} prompts")  # fmt: skip
            image_index = [0 if len(images) == 1 else i for i in range(len(prompts))]
        if not prompts:
            return []
        device = self.box_bias.device
        hidden, skips = self._tower(self._pixels(images))
        owner = torch.tensor(image_index, dtype=torch.long, device=device)
        logits = self.segment_logits(hidden, skips, owner, self.embed_prompts(prompts))
        out = []
        for i, lg in enumerate(logits):
            w, h = images[image_index[i]].size
            up = F.interpolate(lg[None, None], size=(h, w), mode="bilinear", align_corners=False)
            out.append(torch.sigmoid(up)[0, 0].cpu().numpy())
        return out

    @torch.no_grad()
    def detect(self, images: list[Image.Image], queries: list[str]) -> tuple[Tensor, Tensor]:
        """(scores (B, N, Q) in 0..1, boxes (B, N, 4) as (x1, y1, x2, y2) in 0..1 of each image):
        every patch's box and how well it matches each query."""
        hidden, _ = self._tower(self._pixels(images))
        logits, boxes = self.detect_outputs(hidden, self.embed_prompts(queries))
        return torch.sigmoid(logits).cpu(), cxcywh_to_xyxy(boxes).clamp(0, 1).cpu()


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.5, keep: int = 10) -> list[int]:
    """Greedy non-maximum suppression over (K, 4) x1y1x2y2 boxes: indices kept, best first."""
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(_box_iou(boxes[i], boxes[j]) <= iou for j in kept):
            kept.append(int(i))
            if len(kept) == keep:
                break
    return kept


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[3], b[3]) - max(a[1], b[1])
    )
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


__all__ = ["CLIPSeg", "CLIPSegConfig", "box_bias", "generalized_iou", "nms", "sigmoid_focal_loss"]
