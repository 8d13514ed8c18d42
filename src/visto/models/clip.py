"""CLIP (Radford et al. 2021), SigLIP's loss (Zhai et al. 2023) and LiT's locked towers
(Zhai et al. 2022): two towers and a contrastive loss, wired in one short file.

    pixels (B, 3, S, S) -> ViT -> pooled (B, W_v) -> visual_projection -> L2 norm -> (B, E)
    texts              -> text tower -> (B, W_t) -> text_projection  -> L2 norm -> (B, E)
    logits = scale * image_emb @ text_emb.T      (B, B), the matching pairs on the diagonal
    loss   = InfoNCE both ways (CLIP) | pairwise sigmoid with a learnable bias (SigLIP)

The temperature is learned as log(1 / T), initialised at T = 0.07 and clipped so that the
logit scale never exceeds 100 (CLIP, section 2.5). Names follow transformers' `CLIPModel`
(`vision_model`, `text_model`, `visual_projection`, `text_projection`, `logit_scale`), so the
vision tower, and with kind="transformer" the text tower too, export by key.

A locked tower (LiT: `lock_image`, `lock_text`) runs without gradient and stays in eval mode;
its projection head still trains, since it maps the locked features to the shared space.
A locked text tower's features are a function of the caption alone, so each distinct caption
is encoded once and then read from a cache (`text_cache_size` entries): from the second epoch
on, LiT's step costs the image tower only (MiniLM took half of it).

Hard negative captions (NegCLIP, Yuksekgonul et al. 2023): with `hard_negative_swaps` (lists
of interchangeable words), `collate` adds to each caption one text-only negative with one word
swapped for another of its list (visto.data.negatives), and the loss ranks every image against
them too (visto.losses). Off (an empty list) by default.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from visto.data.negatives import check_swap_groups, swap_word
from visto.data.pairs import caption_of, image_key
from visto.data.processor import ProcessorConfig, image_transform
from visto.data.sample import Sample
from visto.errors import UserError
from visto.losses import batch_ids, clip_loss, contrastive_logits, pair_positives, siglip_loss
from visto.models.common import refuse_part_paths
from visto.nn.text import TextConfig, build_text_encoder
from visto.nn.vision import CLIP_MEAN, CLIP_STD, ViT, ViTConfig, pop_old_normalisation

LOSSES = ("infonce", "siglip")


@dataclass
class CLIPConfig:
    vision: ViTConfig = field(default_factory=lambda: ViTConfig.preset("small"))
    text: TextConfig = field(default_factory=lambda: TextConfig.preset("small"))
    embed_dim: int = 128
    loss: str = "infonce"  # "infonce" (CLIP) | "siglip"
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0  # CLIP clips the learned scale here
    init_logit_bias: float = -10.0  # SigLIP's initial bias (paper, section 3.2)
    lock_image: bool = False  # LiT: a pretrained image tower, kept as it is
    lock_text: bool = False
    # A pretrained image tower: a visto checkpoint with a ViT (CLIP, LLaVA, e.g. the
    # quickstart's dense-pretrained RUN/vision/checkpoint) or a transformers CLIP or SigLIP directory.
    # Read by visto.pretrained.build_model, then forgotten: its architecture replaces `vision`, all
    # but `vision.pool` (pooling has no weights: "mean" suits a tower trained on patches).
    vision_init: str | None = None
    # A directory with processor.json + tokenizer.json (visto.data.processor.Processor.save),
    # used when no processor is attached (a fresh model; a checkpoint carries its own).
    processor_dir: str | None = None
    # The image transform when no processor is attached (an attached one's settings come
    # first): a transformers CLIP's preprocessor_config.json mean/std, say. None: resize to the
    # tower's square and normalise with OpenAI CLIP's mean/std.
    processor: ProcessorConfig | None = None
    # NegCLIP's hard negatives: lists of interchangeable words (e.g. the world's shapes, its
    # colours); each training caption gets one negative with a word swapped within its list.
    # Empty = none (plain in-batch negatives).
    hard_negative_swaps: list[list[str]] = field(default_factory=list)
    # SigLIP's layout (a transformers SigLIP directory loads as a CLIP with loss "siglip"):
    # its image embedding is the tower's attention-pooled output, with no projection after it
    # (embed_dim = vision.width), and its text head is a projection with a bias.
    image_projection: bool = True
    text_projection_bias: bool = False
    # Distinct captions whose locked-text-tower features are kept (lock_text only; 0 = off).
    # 200k x 384 floats (MiniLM) is ~300 MB.
    text_cache_size: int = 200_000

    def __post_init__(self) -> None:
        self.hard_negative_swaps = check_swap_groups(
            self.hard_negative_swaps, "clip hard_negative_swaps"
        )
        if self.loss not in LOSSES:
            raise UserError(f"clip loss must be one of {LOSSES}, got {self.loss!r}")
        if self.processor is not None and self.processor.resize_mode == "patch":
            raise UserError(
                "clip processor.resize_mode must be 'pad' or 'resize': CLIP encodes square images"
            )
        if not 0 < self.init_temperature <= 1:
            raise UserError(f"init_temperature must be in (0, 1], got {self.init_temperature}")
        if 1 / self.init_temperature > self.max_logit_scale:
            raise UserError(
                f"init_temperature {self.init_temperature} gives a logit scale above "
                f"max_logit_scale {self.max_logit_scale}"
            )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CLIPConfig:
        """`tiny` for unit tests; `small` for the synthetic world on a CPU."""
        if name == "tiny":
            base = dict(
                vision=ViTConfig.preset("tiny"), text=TextConfig.preset("tiny"), embed_dim=32
            )
        elif name == "small":
            base = dict(vision=ViTConfig.preset("small"), text=TextConfig.preset("small"))
        else:
            raise UserError(f"unknown CLIP preset {name!r}; choose 'tiny' or 'small'")
        return cls(**{**base, **overrides})

    @staticmethod
    def upgrade(data: dict) -> dict:
        """A saved CLIPConfig dict in today's layout (visto.config.from_dict calls this): the
        normalisation an old config kept in `vision` (see pop_old_normalisation) moves to
        `processor`, where a processor-less CLIP reads it; OpenAI CLIP's, the default, needs none."""
        if not isinstance(data.get("vision"), dict):
            return data
        vision, moved = pop_old_normalisation(data["vision"])
        data = {**data, "vision": vision}
        mean = [float(v) for v in moved.get("mean", CLIP_MEAN)]
        std = [float(v) for v in moved.get("std", CLIP_STD)]
        if (mean, std) != (list(CLIP_MEAN), list(CLIP_STD)) and data.get("processor") is None:
            size = vision.get("image_size", ViTConfig.image_size)
            data["processor"] = dict(image_size=size, resize_mode="resize", mean=mean, std=std)
        return data


def negative_matches(batch: dict[str, Tensor]) -> Tensor:
    """(B, N) bool: the hard negatives that are in fact captions of an image. A swap can make
    another image's very caption ("One shape: a star." -> "One shape: a circle."): that text
    matches every image the real caption matches (the same image, see `pair_positives`)."""
    caption_ids, negative_ids = batch["caption_ids"], batch["negative_caption_ids"]
    same_image = pair_positives(batch["image_ids"])  # (B, B)
    says = caption_ids[:, None] == negative_ids[None, :]  # (B, N): caption j is negative n
    return (same_image.float() @ says.float()) > 0  # image i has a caption that is negative n


class CLIP(nn.Module):
    family = "clip"

    def __init__(self, config: CLIPConfig, vision: ViT | None = None) -> None:
        """`vision`: a pretrained image tower built elsewhere (visto.pretrained reads
        vision_init); its architecture replaces `config.vision` but for the pooling, which
        stays the config's. Without it, the tower is built fresh."""
        super().__init__()
        refuse_part_paths(config, self.family)
        if vision is not None:
            vision.set_pool(config.vision.pool)
            config = replace(config, vision=vision.config)
        self.config = config
        self.vision_model = vision if vision is not None else ViT(config.vision)
        self.text_model = build_text_encoder(config.text)
        if config.image_projection:
            self.visual_projection: nn.Module = nn.Linear(
                self.vision_model.output_dim, config.embed_dim, bias=False
            )
        elif self.vision_model.output_dim == config.embed_dim:
            self.visual_projection = nn.Identity()
        else:
            raise UserError(
                f"image_projection false makes the tower's pooled output the embedding, so "
                f"embed_dim ({config.embed_dim}) must be the vision width "
                f"({self.vision_model.output_dim})"
            )
        self.text_projection = nn.Linear(
            self.text_model.output_dim, config.embed_dim, bias=config.text_projection_bias
        )
        if config.image_projection:
            nn.init.normal_(self.visual_projection.weight, std=self.vision_model.output_dim**-0.5)
        nn.init.normal_(self.text_projection.weight, std=self.text_model.output_dim**-0.5)
        if self.text_projection.bias is not None:
            nn.init.zeros_(self.text_projection.bias)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))
        if config.loss == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(config.init_logit_bias))
        else:
            self.logit_bias = None
        for locked, tower in (
            (config.lock_image, self.vision_model),
            (config.lock_text, self.text_model),
        ):
            if locked:
                tower.requires_grad_(False)
                tower.eval()
        self._processor: Any = None
        # Locked text features by caption token ids; stale once weights change, so emptied
        # whenever a state dict is loaded.
        self._text_cache: dict[tuple[int, ...], Tensor] = {}
        self.register_load_state_dict_pre_hook(lambda *_: self._text_cache.clear())

    # -- processor: image transform and tokenizer

    @property
    def processor(self) -> Any:
        if self._processor is None and self.config.processor_dir:
            from visto.data.processor import Processor

            self.processor = Processor.load(self.config.processor_dir)
        return self._processor

    @processor.setter
    def processor(self, processor: Any) -> None:
        if processor is not None and self.config.text.kind == "transformer":
            vocab = processor.tokenizer.vocab_size
            if vocab > self.config.text.vocab_size:
                raise UserError(
                    f"the tokenizer has {vocab} tokens but the text tower's vocab_size is "
                    f"{self.config.text.vocab_size}; set text.vocab_size >= {vocab}"
                )
            self.text_model.set_tokenizer(processor.tokenizer)
        self._processor = processor

    def train(self, mode: bool = True) -> CLIP:
        super().train(mode)
        if self.config.lock_image:
            self.vision_model.eval()
        if self.config.lock_text:
            self.text_model.eval()
        return self

    # -- towers

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, S, S) normalized pixels -> (B, embed_dim), unit length."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.lock_image):
            pooled = self.vision_model(pixel_values).pooled  # (B, W_v)
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def encode_text_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Tokenized text (B, T) -> (B, embed_dim), unit length."""
        if self.config.lock_text and self.config.text_cache_size > 0:
            pooled = self._locked_text_features(input_ids, attention_mask)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.lock_text):
                pooled = self.text_model(input_ids, attention_mask)  # (B, W_t)
        return F.normalize(self.text_projection(pooled), dim=-1)

    @torch.no_grad()
    def _locked_text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The locked text tower's pooled features (B, W_t), each caption not yet in the
        cache encoded in one batch; the cache stops growing at `text_cache_size`."""
        keys = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask, strict=True)]
        if self._text_cache and next(iter(self._text_cache.values())).device != input_ids.device:
            self._text_cache.clear()  # the model moved to another device
        missing, seen = [], set()
        for i, key in enumerate(keys):
            if key not in self._text_cache and key not in seen:
                seen.add(key)
                missing.append(i)
        found: dict[tuple[int, ...], Tensor] = {}
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)
            fresh = self.text_model(input_ids[rows], attention_mask[rows])  # (M, W_t)
            found = {keys[i]: f for i, f in zip(missing, fresh, strict=True)}
            if len(self._text_cache) + len(found) <= self.config.text_cache_size:
                self._text_cache.update(found)
        return torch.stack([found[k] if k in found else self._text_cache[k] for k in keys])

    def encode_text(self, texts: list[str]) -> Tensor:
        """Strings -> (B, embed_dim), unit length (tokenized by the text tower)."""
        batch = self._to_device(self.text_model.tokenize(list(texts)))
        return self.encode_text_tokens(batch["input_ids"], batch["attention_mask"])

    def current_logit_scale(self) -> Tensor:
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    # -- training

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch from `collate` -> {"loss", "logit_scale", "acc_i2t", "acc_t2i"[, "logit_bias"]}."""
        if self.training:
            # CLIP clips the parameter itself (open_clip clamps it after each optimizer step);
            # doing it here, before use, keeps the clip inside the model for any training loop.
            with torch.no_grad():
                self.logit_scale.clamp_(0, math.log(self.config.max_logit_scale))
        image_emb = self.encode_image(batch["pixel_values"])  # (B, E)
        text_emb = self.encode_text_tokens(batch["input_ids"], batch["attention_mask"])  # (B, E)
        scale = self.current_logit_scale()
        # Pairs that match besides the diagonal: identical captions, the same image twice.
        ids = [batch[k] for k in ("caption_ids", "image_ids") if k in batch]
        positives = pair_positives(*ids) if ids else None  # (B, B) bool
        negative_emb = negative_positives = None
        if "negative_input_ids" in batch:
            negative_emb = self.encode_text_tokens(
                batch["negative_input_ids"], batch["negative_attention_mask"]
            )  # (N, E)
            negative_positives = negative_matches(batch)  # (B, N) bool
        extra = dict(negative_emb=negative_emb, negative_positives=negative_positives)
        if self.logit_bias is not None:
            loss = siglip_loss(image_emb, text_emb, scale, self.logit_bias, positives, **extra)
        else:
            loss = clip_loss(image_emb, text_emb, scale, positives, **extra)
        with torch.no_grad():
            logits = contrastive_logits(image_emb, text_emb, scale)  # (B, B)
            B = logits.shape[0]
            if positives is None:
                positives = torch.eye(B, dtype=torch.bool, device=logits.device)
            rows = torch.arange(B, device=logits.device)
            # A hit is any matching pair: an identical caption is as right as the own one.
            out = {
                "loss": loss,
                "logit_scale": scale.detach(),
                "acc_i2t": positives[rows, logits.argmax(dim=1)].float().mean(),
                "acc_t2i": positives[logits.argmax(dim=0), rows].float().mean(),
            }
            if negative_emb is not None:
                # Does each image score its caption above the caption's own swapped copy?
                owner = batch["negative_of"]  # (N,) index of the caption each one swaps
                own = (image_emb[owner] * text_emb[owner]).sum(-1)  # (N,)
                swapped = (image_emb[owner] * negative_emb).sum(-1)  # (N,)
                out["acc_hard_negative"] = (own > swapped).float().mean()
            if self.logit_bias is not None:
                out["logit_bias"] = self.logit_bias.detach()
        return out

    def collate(self, samples: list[Sample]) -> dict[str, Tensor]:
        """Samples -> {"pixel_values" (B,3,S,S), "input_ids" (B,T), "attention_mask" (B,T),
        "caption_ids" (B,), "image_ids" (B,)}: each sample's first image with its caption (see
        `visto.data.pairs.caption_of`). Equal ids mark identical captions / the same image within the batch
        (the loss does not treat those pairs as negatives, see visto.losses).

        With `hard_negative_swaps`, also "negative_input_ids" (N, T'), "negative_attention_mask"
        (N, T'), "negative_of" (N,) (the caption each negative swaps a word of) and
        "negative_caption_ids" (N,) (in caption_ids' numbering, so a negative that equals a
        real caption shares its id); N <= B, as a caption without a swappable word has none.
        The swaps are drawn from a generator seeded by the samples' ids: the same batch gets
        the same negatives, in a resumed run too."""
        for s in samples:
            if not s.images:
                raise UserError(f"sample {s.id!r} has no image; CLIP trains on image-text pairs")
        texts = [caption_of(s) for s in samples]
        pixel_values = self.image_tensor([s.images[0] for s in samples])
        batch = {"pixel_values": pixel_values, **self.text_model.tokenize(texts)}
        owners, negatives = [], []
        if self.config.hard_negative_swaps:
            rng = random.Random(zlib.crc32("\n".join(s.id for s in samples).encode()))
            swaps = [swap_word(t, self.config.hard_negative_swaps, rng) for t in texts]
            owners = [i for i, neg in enumerate(swaps) if neg is not None]
            negatives = [swaps[i] for i in owners]
        ids = batch_ids(texts + negatives)  # one numbering for captions and negatives
        batch["caption_ids"] = ids[: len(texts)]
        if negatives:
            tokens = self.text_model.tokenize(negatives)
            batch["negative_input_ids"] = tokens["input_ids"]
            batch["negative_attention_mask"] = tokens["attention_mask"]
            batch["negative_of"] = torch.tensor(owners, dtype=torch.long)
            batch["negative_caption_ids"] = ids[len(texts) :]
        batch["image_ids"] = batch_ids([image_key(s) for s in samples])
        return batch

    # -- inference conveniences

    def image_tensor(self, images: list[Image.Image]) -> Tensor:
        """PIL images -> (N, 3, S, S): the attached processor's transform, else that of the
        config's `processor` settings (e.g. a transformers CLIP's preprocessor_config), else a
        resize to the tower's square with OpenAI CLIP's mean/std."""
        size = self.config.vision.image_size
        processor = self.processor
        if processor is not None and processor.config.resize_mode != "patch":
            config = processor.config
        else:
            config = self.config.processor or ProcessorConfig(
                image_size=size, resize_mode="resize", mean=CLIP_MEAN, std=CLIP_STD
            )
        if config.image_size != size:
            raise UserError(
                f"the processor makes {config.image_size}px images but the vision tower expects "
                f"{size}px; make processor image_size and vision.image_size agree"
            )
        if not images:
            return torch.zeros(0, 3, size, size)
        return torch.stack([image_transform(image, config) for image in images])

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image], batch_size: int = 64) -> Tensor:
        """PIL images -> (N, embed_dim) unit vectors on the CPU."""
        was_training = self.training
        self.eval()
        chunks = [
            self.encode_image(self._to_device(self.image_tensor(images[i : i + batch_size])))
            for i in range(0, len(images), batch_size)
        ]
        self.train(was_training)
        return torch.cat(chunks).cpu() if chunks else torch.zeros(0, self.config.embed_dim)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> Tensor:
        """Strings -> (N, embed_dim) unit vectors on the CPU."""
        was_training = self.training
        self.eval()
        chunks = [
            self.encode_text(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)
        ]
        self.train(was_training)
        return torch.cat(chunks).cpu() if chunks else torch.zeros(0, self.config.embed_dim)

    def _to_device(self, x: Any) -> Any:
        device = self.logit_scale.device
        if isinstance(x, dict):
            return {k: v.to(device) for k, v in x.items()}
        return x.to(device, dtype=self.text_projection.weight.dtype)


# ----------------------------------------------------------------------------- transformers format


def config_from_hf(hf: dict[str, Any], where: str, preprocessor: dict | None = None) -> CLIPConfig:
    """The CLIPConfig of a transformers `CLIPModel` or `SiglipModel` config.json: CLIP's text
    tower is causal and reads its end-of-text token; SigLIP's is bidirectional, reads the last
    position of a text padded to its context, and its image side has no projection."""
    from visto.models.transformers_format import image_normalisation
    from visto.nn.transformer import act_from_hf
    from visto.nn.vision import vit_config_from_transformers

    siglip = hf.get("model_type") == "siglip"
    t = hf.get("text_config") or {}
    vision = vit_config_from_transformers(hf)
    # The directory's image processor normalises as the tower was trained (CLIP's constants
    # when it has none; SigLIP's are 0.5).
    processor = None
    if preprocessor:
        default = ((0.5,) * 3, (0.5,) * 3) if siglip else (CLIP_MEAN, CLIP_STD)
        mean, std = image_normalisation(preprocessor, where, default)
        processor = ProcessorConfig(image_size=vision.image_size, resize_mode="resize", mean=mean, std=std)
    width = t.get("hidden_size", 768 if siglip else 512)
    text = TextConfig(
        kind="transformer",
        vocab_size=t.get("vocab_size", 32000 if siglip else 49408),
        context_length=t.get("max_position_embeddings", 64 if siglip else 77),
        width=width,
        layers=t.get("num_hidden_layers", 12),
        heads=t.get("num_attention_heads", 12 if siglip else 8),
        mlp_hidden=t.get("intermediate_size", 3072 if siglip else 2048),
        act=act_from_hf(t.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu")),
        causal=not siglip,
        pool="last" if siglip else "eos",
        eps=float(t.get("layer_norm_eps", 1e-6 if siglip else 1e-5)),
    )
    if siglip:
        problems = []
        if vision.pool != "map":
            problems.append("vision_use_head is false, so its image tower gives no image embedding")
        if t.get("projection_size", width) != vision.width:
            problems.append(
                f"text projection_size {t.get('projection_size')} differs from the vision width "
                f"{vision.width}, so the two embeddings do not share a space"
            )
        if problems:
            raise UserError(f"{where}: visto cannot use this SigLIP as a two-tower model: " + "; ".join(problems))
        return CLIPConfig(vision=vision, text=text, embed_dim=vision.width, loss="siglip",
                          image_projection=False, text_projection_bias=True,
                          processor=processor)  # fmt: skip
    return CLIPConfig(vision=vision, text=text, embed_dim=hf.get("projection_dim", 512),
                      processor=processor)  # fmt: skip


def hf_key_map(model: CLIP) -> dict[str, str]:
    """Our key -> the key in a transformers CLIPModel / SiglipModel model.safetensors. Both
    towers carry transformers' names; only the text projection (SigLIP's `text_model.head`)
    and SigLIP's missing image projection differ."""
    out = {f"vision_model.{k}": f"vision_model.{k}" for k in model.vision_model.state_dict()}
    out |= {f"text_model.{k}": f"text_model.{k}" for k in model.text_model.state_dict()}
    siglip = model.config.loss == "siglip"
    for k in model.text_projection.state_dict():
        out[f"text_projection.{k}"] = f"text_model.head.{k}" if siglip else f"text_projection.{k}"
    out |= {f"visual_projection.{k}": f"visual_projection.{k}" for k in model.visual_projection.state_dict()}
    out["logit_scale"] = "logit_scale"
    if model.logit_bias is not None:
        out["logit_bias"] = "logit_bias"
    return out


def load_hf(directory: str | Path) -> CLIP:
    """A visto CLIP from a transformers `CLIPModel` or `SiglipModel` directory, with the
    directory's own tokenizer (AutoTokenizer) and image mean/std, so `embed_images` and
    `embed_texts` give transformers' `get_image_features` / `get_text_features`, normalised.
    Images are resized to the tower's square, as SigLIP's processor does; CLIP's processor
    resizes the short side and crops the centre, which is the same for square images."""

    from visto.models.transformers_format import read_hf_config, read_image_processor
    from visto.nn.weights import load_by_key_map

    directory = Path(directory)
    hf = read_hf_config(directory)
    if hf is None or hf.get("model_type") not in ("clip", "siglip"):
        raise UserError(f"{directory} is not a transformers CLIP or SigLIP directory "
                        "(config.json model_type 'clip' or 'siglip')")  # fmt: skip
    found = read_image_processor(directory)  # preprocessor_config.json, or transformers 5's processor_config.json
    preprocessor, where = found if found else (None, directory)
    model = CLIP(config_from_hf(hf, str(where), preprocessor))
    scalar = lambda t: t.reshape(())  # noqa: E731 (SigLIP stores them as (1,))
    transforms = {k: scalar for k in ("logit_scale", "logit_bias") if k in model.state_dict()}
    load_by_key_map(
        model, directory, hf_key_map(model), transforms,
        ignore=lambda key: key.endswith("position_ids"),
    )  # fmt: skip
    # Keep the checkpoint's temperature as it is (CLIP clips its own at 100 while training).
    scale = float(model.logit_scale.detach().exp())
    model.config = replace(model.config, max_logit_scale=max(model.config.max_logit_scale, scale))
    model.text_model.set_tokenizer(_hf_tokenizer(directory))
    return model.eval()


def _hf_tokenizer(directory: Path) -> Any:
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(
            f"{directory} has no tokenizer (tokenizer.json / tokenizer_config.json): a two-tower "
            "model embeds text with its own tokenizer; save it there with "
            "`tokenizer.save_pretrained(DIR)` (its vision tower alone loads as vision_init)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the tokenizer in {directory}: {e}") from None
