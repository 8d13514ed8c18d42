"""A plain Vision Transformer (Dosovitskiy et al. 2021) with transformers' CLIP parameter names.

    pixels (B, 3, H, W)
      -> patch embedding: conv with stride = patch  (B, N, D), N = (H / patch) * (W / patch)
         (or, with stem="conv", 3x3 stride-2 convs down to the same grid)
      -> [CLS] + patches, + position embedding        (B, 1 + N, D)
      -> pre_layrnorm, L pre-norm EncoderBlocks
      -> pooled: post_layernorm([CLS]) or post_layernorm(mean of patches)   (B, D)
      -> features: patch tokens of a chosen layer (LLaVA uses the penultimate)   (B, N, D)

With the default linear stem, the state dict of `ViT` is key-for-key that of transformers'
`CLIPVisionModel` (without its `vision_model.` prefix), misspelled `pre_layrnorm` included, so
`load_transformers_clip_vision` and export are a prefix away. Also here: a small PIL -> tensor transform of our own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from visto.errors import UserError
from visto.nn.transformer import EncoderBlock

STEMS = ("patch", "conv")  # ViTConfig.stem: linear patch embedding | 3x3 stride-2 conv stack
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalization constants
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ViTConfig:
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_hidden: int = 512
    act: str = "gelu"  # "quick_gelu" for OpenAI CLIP weights
    eps: float = 1e-5
    pos_embed: str = "learned"  # "learned" | "sincos" (fixed 2-D, as in MAE)
    pool: str = "cls"  # "cls" | "mean" (over patch tokens)
    # "patch": the linear patch embedding of ViT/CLIP (one strided conv). "conv": a stack of
    # 3x3 stride-2 convolutions down to the same patch grid (Xiao et al. 2021, "Early
    # convolutions help transformers see better"): same token count, faster to train from
    # scratch on small shapes. Only "patch" exports to transformers' CLIPVisionModel.
    stem: str = "patch"
    feature_layer: int = -1  # hidden_states index for patch features: -1 last, -2 penultimate
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise UserError(
                f"vision image_size {self.image_size} must be a multiple of patch_size "
                f"{self.patch_size}"
            )
        if self.width % self.heads:
            raise UserError(f"vision width {self.width} must be divisible by heads {self.heads}")
        if self.pos_embed not in ("learned", "sincos"):
            raise UserError(
                f"vision pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}"
            )
        if self.stem not in STEMS:
            raise UserError(f"vision stem must be one of {STEMS}, got {self.stem!r}")
        if self.stem == "conv" and (self.patch_size & (self.patch_size - 1) or self.patch_size < 2):
            raise UserError(
                f"the conv stem halves the image per layer, so patch_size must be a power of 2 "
                f"(>= 2), got {self.patch_size}"
            )
        if self.pool not in ("cls", "mean"):
            raise UserError(f"vision pool must be 'cls' or 'mean', got {self.pool!r}")
        if not -self.layers - 1 <= self.feature_layer <= self.layers:
            raise UserError(
                f"vision feature_layer {self.feature_layer} is outside the {self.layers + 1} "
                "hidden states (0 = embeddings, -1 = last layer)"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def preset(cls, name: str, **overrides) -> ViTConfig:
        """Named sizes: `tiny` for unit tests, `small` for the synthetic world on a CPU."""
        presets = {
            "tiny": dict(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_hidden=64),
            "small": dict(
                image_size=64, patch_size=8, width=128, layers=4, heads=4, mlp_hidden=512
            ),
        }
        if name not in presets:
            raise UserError(f"unknown ViT preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


def sincos_position_embedding_2d(grid: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos embedding (MAE, He et al. 2022): half the channels encode the row,
    half the column. Returns (grid * grid, dim), row-major like the patch order."""
    assert dim % 4 == 0, f"2-D sin-cos position embedding needs dim divisible by 4, got {dim}"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.flatten().double()[:, None] * omega[None]  # (N, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, dim/2)

    return torch.cat([encode(ys), encode(xs)], dim=1).float()  # (N, dim)


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """3x3 stride-2 convs + GELU, log2(patch_size) of them, channels doubling up to `width`,
    then a 1x1 conv to `width`: (B, 3, H, W) -> (B, width, H / patch, W / patch)."""
    n = patch_size.bit_length() - 1
    channels = [3] + [max(8, width >> (n - 1 - i)) for i in range(n)]  # ..., width/2, width
    layers: list[nn.Module] = []
    for c_in, c_out in pairwise(channels):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
    layers.append(nn.Conv2d(channels[-1], width, 1, bias=False))
    return nn.Sequential(*layers)


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.class_embedding = nn.Parameter(torch.randn(D) * D**-0.5)
        if cfg.stem == "conv":
            self.patch_embedding: nn.Module = conv_stem(D, cfg.patch_size)
        else:
            self.patch_embedding = nn.Conv2d(3, D, cfg.patch_size, stride=cfg.patch_size, bias=False)
        if cfg.pos_embed == "learned":
            self.position_embedding = nn.Embedding(cfg.num_patches + 1, D)
        else:
            grid = cfg.image_size // cfg.patch_size
            table = torch.cat([torch.zeros(1, D), sincos_position_embedding_2d(grid, D)])
            self.register_buffer("fixed_position_embedding", table, persistent=False)

    def positions(self) -> Tensor:
        if self.cfg.pos_embed == "learned":
            return self.position_embedding.weight  # (1 + N, D)
        return self.fixed_position_embedding

    def forward(self, pixel_values: Tensor) -> Tensor:
        B, C, H, W = pixel_values.shape
        size = self.cfg.image_size
        assert (C, H, W) == (3, size, size), (
            f"ViT expects pixels (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}"
        )
        patches = self.patch_embedding(pixel_values.to(self.class_embedding.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.expand(B, 1, -1)  # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.positions()  # (B, 1 + N, D)


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                EncoderBlock(cfg.width, cfg.heads, cfg.mlp_hidden, cfg.act, cfg.eps)
                for _ in range(cfg.layers)
            ]
        )


@dataclass
class ViTOutput:
    pooled: Tensor | None  # (B, D), None when not asked for
    features: Tensor  # (B, N, D) patch tokens (no CLS) from the chosen layer


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = ViTEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # sic: transformers' name
        self.encoder = ViTEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.apply(_init_weights)
        if cfg.stem == "conv":
            # He init keeps the activation scale through the GELU convs (std 0.02 would shrink
            # it about tenfold per layer).
            for conv in self.embeddings.patch_embedding.modules():
                if isinstance(conv, nn.Conv2d):
                    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")

    @property
    def output_dim(self) -> int:
        return self.config.width

    def forward(
        self, pixel_values: Tensor, feature_layer: int | None = None, pooled: bool = True
    ) -> ViTOutput:
        """pixel_values (B, 3, S, S), normalized. `feature_layer` indexes hidden states as
        transformers does (0 = embeddings after pre_layrnorm, -1 = last layer, -2 = penultimate).
        With pooled=False the layers after `feature_layer` are skipped."""
        cfg = self.config
        layer = cfg.feature_layer if feature_layer is None else feature_layer
        layer = layer % (cfg.layers + 1)  # as a non-negative hidden-states index
        last = cfg.layers if pooled else layer

        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, 1 + N, D)
        features = x if layer == 0 else None
        for i, block in enumerate(self.encoder.layers[:last], start=1):
            x = block(x)
            if i == layer:
                features = x
        assert features is not None
        pooled_out = None
        if pooled:
            token = x[:, 0] if cfg.pool == "cls" else x[:, 1:].mean(dim=1)  # (B, D)
            pooled_out = self.post_layernorm(token)
        return ViTOutput(pooled=pooled_out, features=features[:, 1:])  # drop CLS: (B, N, D)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=0.02)


# --------------------------------------------------------------------------------------------
# transformers' CLIPVisionModel <-> ViT


def vit_config_from_transformers(cfg: dict) -> ViTConfig:
    """A ViTConfig from a transformers CLIP(Vision)Config dict (a full CLIP config works too)."""
    cfg = cfg.get("vision_config", cfg)
    return ViTConfig(
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        width=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        mlp_hidden=cfg["intermediate_size"],
        act=cfg.get("hidden_act", "quick_gelu"),
        eps=cfg.get("layer_norm_eps", 1e-5),
        pool="cls",
        pos_embed="learned",
    )


_VIT_TOP_LEVEL = {"embeddings", "pre_layrnorm", "encoder", "post_layernorm"}


def load_transformers_clip_vision(directory: str | Path) -> ViT:
    """Our ViT with the weights of a transformers CLIP(Vision)Model saved in `directory`.

    Our ViT is named as transformers names it, so the key map is the identity; a full
    CLIPModel's text tower and projections are left unread."""
    from visto.nn.weights import load_by_key_map

    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise UserError(f"{directory} is not a transformers CLIP checkpoint: {p.name} missing")
    vit = ViT(vit_config_from_transformers(json.loads(config_path.read_text())))
    load_by_key_map(
        vit,
        directory,
        {key: key for key in vit.state_dict()},
        rename=lambda key: key.removeprefix("vision_model."),
        # position_ids: a non-persistent buffer in recent versions
        ignore=lambda key: (
            key.split(".")[0] not in _VIT_TOP_LEVEL or key == "embeddings.position_ids"
        ),
    )
    return vit


# --------------------------------------------------------------------------------------------
# Images -> tensor (our own transform; the processor may provide a richer one)


def images_to_tensor(
    images: list[Image.Image],
    size: int,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> Tensor:
    """Resize each image to size x size (bicubic, aspect not kept) and normalize: (N, 3, S, S)."""
    arrays = []
    for image in images:
        image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)  # (S, S, 3)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, 3, S, S)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
