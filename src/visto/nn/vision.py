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
`load_transformers_vision` and export are a prefix away (SigLIP's tower too, with
`cls_token`, `pre_norm` and `patch_bias` set as it has them).

The tower takes pixels already normalised: the mean/std are the processor's
(`visto.data.processor.ProcessorConfig.mean/std`, what transformers keeps in
preprocessor_config.json), not the tower's. `pop_old_normalisation` reads configs saved when
the tower held a copy.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass, replace
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visto.errors import UserError
from visto.nn.transformer import MLP, EncoderStack, FusedEncoderBlock, act_from_hf, activation

STEMS = ("patch", "conv")
POOLS = ("cls", "mean", "map")  # ViTConfig.stem: linear patch embedding | 3x3 stride-2 conv stack
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
    # "cls" | "mean" (over patch tokens) | "map": SigLIP's attention-pooling head (a learned
    # probe attends to every token, then an MLP; Zhai et al. 2023 "MAP"), with weights `head`.
    pool: str = "cls"
    # SigLIP's tower differs from CLIP's in three layout choices, all off for CLIP: no class
    # token (the features are every token), no LayerNorm before the blocks, a biased patch conv.
    cls_token: bool = True
    pre_norm: bool = True
    patch_bias: bool = False
    # "patch": the linear patch embedding of ViT/CLIP (one strided conv). "conv": a stack of
    # 3x3 stride-2 convolutions down to the same patch grid (Xiao et al. 2021, "Early
    # convolutions help transformers see better"): same token count, faster to train from
    # scratch on small shapes. Only "patch" exports to transformers' CLIPVisionModel.
    stem: str = "patch"
    feature_layer: int = -1  # hidden_states index for patch features: -1 last, -2 penultimate
    # Not fields (never saved): accepted from callers written when the tower held a copy of
    # the normalisation, and ignored, as every family but a processor-less CLIP ignored them.
    # quickstart.llava_config and blip2.config_from_hf still pass them.
    image_mean: InitVar[tuple[float, float, float] | None] = None
    image_std: InitVar[tuple[float, float, float] | None] = None

    def __post_init__(self, image_mean: object = None, image_std: object = None) -> None:
        if image_mean is not None or image_std is not None:
            warnings.warn(
                "ViTConfig image_mean/image_std are not read: images are normalised by the "
                "processor (ProcessorConfig.mean/std); drop them",
                DeprecationWarning,
                stacklevel=3,
            )
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
        if self.pool not in POOLS:
            raise UserError(f"vision pool must be one of {POOLS}, got {self.pool!r}")
        if self.pool == "cls" and not self.cls_token:
            raise UserError("vision pool 'cls' needs a class token: use pool 'mean' or 'map'")
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

    @staticmethod
    def upgrade(data: dict) -> dict:
        """A saved ViTConfig dict in today's layout (visto.config.from_dict calls this)."""
        return pop_old_normalisation(data)[0]


# Configs saved by visto 0.1.0 before the normalisation moved to the processor alone (every
# checkpoint config.json, run-directory config.json and recipe written until then) held it in
# the tower's config too, as vision.image_mean / image_std. Only a CLIP with no processor
# attached read it (CLIPConfig.upgrade moves it into that CLIP's `processor`); in every other
# family it was a copy nothing read.
OLD_NORMALISATION = {"image_mean": "mean", "image_std": "std"}


def pop_old_normalisation(vision: dict) -> tuple[dict, dict]:
    """`vision` (a ViTConfig dict) without the old normalisation keys, and what they held as
    ProcessorConfig fields, e.g. {"mean": [...], "std": [...]} ({} when it had neither)."""
    moved = {new: vision[old] for old, new in OLD_NORMALISATION.items() if old in vision}
    return {k: v for k, v in vision.items() if k not in OLD_NORMALISATION}, moved


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
        D, prefix = cfg.width, int(cfg.cls_token)
        if cfg.cls_token:
            self.class_embedding = nn.Parameter(torch.randn(D) * D**-0.5)
        if cfg.stem == "conv":
            self.patch_embedding: nn.Module = conv_stem(D, cfg.patch_size)
        else:
            self.patch_embedding = nn.Conv2d(
                3, D, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias
            )
        if cfg.pos_embed == "learned":
            self.position_embedding = nn.Embedding(cfg.num_patches + prefix, D)
        else:
            grid = cfg.image_size // cfg.patch_size
            table = torch.cat([torch.zeros(prefix, D), sincos_position_embedding_2d(grid, D)])
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
        patches = self.patch_embedding(pixel_values.to(self.positions().dtype))
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, D)
        if not self.cfg.cls_token:
            return patches + self.positions()  # (B, N, D)
        cls = self.class_embedding.expand(B, 1, -1)  # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.positions()  # (B, 1 + N, D)


@dataclass
class ViTOutput:
    pooled: Tensor | None  # (B, D), None when not asked for
    features: Tensor  # (B, N, D) patch tokens (no CLS) from the chosen layer


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = ViTEmbeddings(cfg)
        # sic: transformers' name; SigLIP has none (Identity: no weights, the same code path)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps) if cfg.pre_norm else nn.Identity()
        self.encoder = EncoderStack(
            cfg.layers, cfg.width, cfg.heads, cfg.mlp_hidden, cfg.act, cfg.eps
        )
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        if cfg.pool == "map":
            self.head = AttentionPoolingHead(cfg)
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

    @property
    def num_prefix(self) -> int:
        """Tokens before the patches in a hidden state: 1 (CLS) or 0."""
        return int(self.config.cls_token)

    def set_pool(self, pool: str) -> None:
        """Pool another way (a recipe's choice for a pretrained tower): a new "map" head starts
        fresh; leaving "map" drops the head, so the saved weights match the config."""
        if pool == self.config.pool:
            return
        self.config = replace(self.config, pool=pool)  # validated: "cls" needs a class token
        if pool == "map":
            self.head = AttentionPoolingHead(self.config)
            self.head.apply(_init_weights)
        elif hasattr(self, "head"):
            del self.head

    def forward(
        self, pixel_values: Tensor, feature_layer: int | None = None, pooled: bool = True
    ) -> ViTOutput:
        """pixel_values (B, 3, S, S), normalized. `feature_layer` indexes hidden states as
        transformers does (0 = embeddings after pre_layrnorm, -1 = last layer, -2 = penultimate).
        With pooled=False the layers after `feature_layer` are skipped."""
        if not (torch.is_grad_enabled() or self.training) and pixel_values.shape[0] > 1:
            # At inference the same image asked about in several rows (questions about one
            # picture) runs once; its outputs are repeated for the rows that hold it.
            unique, inverse = distinct_images(pixel_values)
            if unique.shape[0] < pixel_values.shape[0]:
                out = self.forward(unique, feature_layer, pooled)
                pooled_out = out.pooled[inverse] if out.pooled is not None else None
                return ViTOutput(pooled=pooled_out, features=out.features[inverse])
        cfg = self.config
        layer = cfg.feature_layer if feature_layer is None else feature_layer
        layer = layer % (cfg.layers + 1)  # as a non-negative hidden-states index
        last = cfg.layers if pooled else layer

        plan = self._inference_plan(pixel_values)
        if plan is not None and plan.embed is not None and not self._embeddings_hooked():
            x = plan.embed(pixel_values)  # (B, 1 + N, D), pre_layrnorm applied
        else:
            x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, 1 + N, D)
        blocks = self.encoder.layers if plan is None else plan.blocks
        features = x if layer == 0 else None
        for i, block in enumerate(blocks[:last], start=1):
            x = block(x)
            if i == layer:
                features = x
        assert features is not None
        pooled_out = None
        prefix = self.num_prefix
        if pooled and cfg.pool == "map":
            pooled_out = self.head(self.post_layernorm(x))  # SigLIP: norm every token, then pool
        elif pooled:
            token = x[:, 0] if cfg.pool == "cls" else x[:, prefix:].mean(dim=1)  # (B, D)
            pooled_out = self.post_layernorm(token)
        return ViTOutput(pooled=pooled_out, features=features[:, prefix:])  # no CLS: (B, N, D)

    def _blocks(self, x: Tensor) -> Sequence[Callable[[Tensor], Tensor]]:
        """The encoder's blocks, or at inference on the CPU (no autograd, eval mode) their
        fused copies (`FusedEncoderBlock`: one q/k/v matmul, weights pre-transposed),
        made on first use and remade when a parameter or layer changes."""
        plan = self._inference_plan(x)
        return self.encoder.layers if plan is None else plan.blocks

    def _embeddings_hooked(self) -> bool:
        """Whether hooks watch the embedding's modules (they then run as modules)."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in
                   (self.embeddings, self.embeddings.patch_embedding, self.pre_layrnorm))  # fmt: skip

    def _inference_plan(self, x: Tensor) -> _InferencePlan | None:
        """The tower as inference runs it on the CPU (no autograd, eval mode), or None where
        its modules run (training, autograd, another device, int8 or LoRA layers). Made on
        first use, a plain attribute (not in the state dict), remade when a parameter or a
        layer changes (`InferenceWatch`)."""
        if torch.is_grad_enabled() or self.training or x.device.type != "cpu":
            return None
        cache = self.__dict__.get("_plan")
        if cache is None or not cache[0].current():
            # What the plan copies (post_layernorm and a pooling head run as modules).
            watch = InferenceWatch(self.embeddings, self.pre_layrnorm, self.encoder)
            blocks = self.encoder.layers
            plan = _InferencePlan(self) if all(block.fusable() for block in blocks) else None
            cache = (watch, plan)
            self.__dict__["_plan"] = cache
        return cache[1]


_DATA_PTR = Tensor.data_ptr
_VERSION = operator.attrgetter("_version")


class InferenceWatch:
    """Tells whether inference copies made from modules (fused or transposed weights) are
    still those modules' numbers: `current()` is False once a module or a parameter of the
    tree was replaced (a layer swapped for int8 or LoRA changes its parent's entry), or a
    parameter or buffer was changed in place (an optimizer step, a load: its version),
    replaced, cast or moved (its storage). The tree is walked once, when the copies are
    made; each check then reads two prebuilt lists (at batch 1 the walk over the module
    dicts, which the check did at every call, took 2-3% of the vision tower's time)."""

    def __init__(self, *roots: nn.Module) -> None:
        entries: list[tuple[dict, str, object]] = []
        stack = list(roots)
        while stack:
            module = stack.pop()
            for table in (module._modules, module._parameters, module._buffers):
                entries += [(table, name, child) for name, child in table.items()]
            stack.extend(m for m in module._modules.values() if m is not None)
        self._entries = entries
        self._tensors = [c for _, _, c in entries if isinstance(c, Tensor)]
        self._state = self._tensor_state()

    def _tensor_state(self) -> tuple[list[int], list[int]]:
        # Two C-level maps, no tuple per tensor: the tower's check (69 tensors) 16.9 -> 14.5
        # us in a hot loop (bench/README.md, seventh pass).
        return list(map(_DATA_PTR, self._tensors)), list(map(_VERSION, self._tensors))

    def current(self) -> bool:
        for table, name, child in self._entries:
            if table.get(name) is not child:
                return False
        return self._tensor_state() == self._state


class _InferencePlan:
    """A ViT's weights as inference on the CPU reads them: the blocks as `FusedEncoderBlock`
    and, for the linear patch stem, the embedding as one matmul: each patch flattened
    (channel, row, column, the conv weight's order) times the conv weight, plus a table that
    holds the position embeddings (and the conv bias) with the class token's row (class
    embedding + its position) first, the class token's input row being zeros. At 64 patches
    of 8x8 the conv (oneDNN) took twice the time of this embedding (0.2 ms against 0.1 ms of
    a 2 ms tower); numbers equal up to float rounding (the sums run in another order)."""

    def __init__(self, vit: ViT) -> None:
        self.blocks = [_TowerBlock(block) for block in vit.encoder.layers]
        self.embed: Callable[[Tensor], Tensor] | None = None
        embeddings, cfg = vit.embeddings, vit.config
        conv = embeddings.patch_embedding
        if cfg.stem != "patch" or type(conv) is not nn.Conv2d:
            return
        with torch.no_grad():
            table = embeddings.positions().detach().clone()  # (prefix + N, D)
            if conv.bias is not None:
                table[vit.num_prefix :] += conv.bias.detach()
            if cfg.cls_token:
                table[0] = embeddings.class_embedding.detach() + embeddings.positions()[0]
            weight_t = conv.weight.detach().flatten(1).t().contiguous()  # (3 p p, D)
        self.table, self.weight_t = table, weight_t
        self.prefix, self.patch, self.size = vit.num_prefix, cfg.patch_size, cfg.image_size
        norm = vit.pre_layrnorm
        self.norm = None if isinstance(norm, nn.Identity) else (norm.weight, norm.bias, norm.eps)
        self.embed = self._embed

    def _embed(self, pixel_values: Tensor) -> Tensor:
        B, C, H, W = pixel_values.shape
        S, p = self.size, self.patch
        assert (C, H, W) == (3, S, S), (
            f"ViT expects pixels (B, 3, {S}, {S}), got {tuple(pixel_values.shape)}"
        )
        g, (K, D) = S // p, self.weight_t.shape
        patches = pixel_values.to(self.table.dtype).reshape(B, 3, g, p, g, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5)  # (B, g, g, 3, p, p)
        rows = torch.zeros(B, self.prefix + g * g, K, dtype=self.table.dtype)
        rows[:, self.prefix :].unflatten(1, (g, g)).unflatten(-1, (3, p, p)).copy_(patches)
        if B == 1:
            x = torch.addmm(self.table, rows[0], self.weight_t)[None]
        else:
            x = torch.matmul(rows, self.weight_t).add_(self.table)
        if self.norm is None:
            return x
        return torch.layer_norm(x, (D,), self.norm[0], self.norm[1], self.norm[2])


class _TowerBlock(FusedEncoderBlock):
    """`FusedEncoderBlock`'s weights, run with fewer tensors made: the residual stream as rows
    (B * T, C), each residual added in place into its projection's output and the activation
    in place on the first MLP matmul's output (each block made three tensors of its size
    more). The same operations on the same numbers, so the same bits as the block's call (an
    IEEE sum is the same either way round; tested equal)."""

    INPLACE = {"gelu": lambda a: torch.ops.aten.gelu_(a),
               "gelu_tanh": lambda a: torch.ops.aten.gelu_(a, approximate="tanh"),
               "silu": lambda a: F.silu(a, inplace=True)}  # fmt: skip

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block)
        self.act_inplace = self.INPLACE.get(block.mlp.act_name) if block.mlp.act is \
            activation(block.mlp.act_name) else None  # fmt: skip

    def __call__(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        H, hd = self.heads, self.head_dim
        rows = x.reshape(B * T, C)
        h = torch.layer_norm(rows, (C,), self.ln1[0], self.ln1[1], self.ln1[2])
        qkv = _matmul(h, self.qkv).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, T, hd)
        rows = _matmul(y.transpose(1, 2).reshape(B * T, C), self.out).add_(rows)
        h = torch.layer_norm(rows, (C,), self.ln2[0], self.ln2[1], self.ln2[2])
        a = _matmul(h, self.fc1)
        a = self.act(a) if self.act_inplace is None else self.act_inplace(a)
        return _matmul(a, self.fc2).add_(rows).view(B, T, C)


def _matmul(rows: Tensor, weight: tuple[Tensor, Tensor | None]) -> Tensor:
    """rows (N, in) @ weight_t (in, out) + bias, a new tensor."""
    weight_t, bias = weight
    return torch.mm(rows, weight_t) if bias is None else torch.addmm(bias, rows, weight_t)


def distinct_images(pixel_values: Tensor) -> tuple[Tensor, Tensor]:
    """The batch's distinct images (B', ...) in order of first appearance, and for each row
    the index of its image among them (B,). Rows are compared exactly, only those whose sums
    agree (one cheap pass over the pixels)."""
    sums = pixel_values.reshape(pixel_values.shape[0], -1).sum(dim=1).tolist()
    keep: list[int] = []
    inverse: list[int] = []
    for row, total in enumerate(sums):
        match = next((i for i, k in enumerate(keep) if sums[k] == total
                      and torch.equal(pixel_values[k], pixel_values[row])), None)  # fmt: skip
        if match is None:
            keep.append(row)
            match = len(keep) - 1
        inverse.append(match)
    index = torch.tensor(inverse, device=pixel_values.device)
    if len(keep) == len(sums):
        return pixel_values, index
    return pixel_values[torch.tensor(keep, device=pixel_values.device)], index


class AttentionPoolingHead(nn.Module):
    """SigLIP's multihead attention pooling, with transformers' names (`probe`, `attention`,
    `layernorm`, `mlp`): (B, T, D) -> (B, D)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, cfg.width) * cfg.width**-0.5)
        self.attention = nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
        self.layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg.width, cfg.mlp_hidden, act=cfg.act)

    def forward(self, x: Tensor) -> Tensor:
        probe = self.probe.expand(x.shape[0], -1, -1)  # (B, 1, D)
        h = self.attention(probe, x, x, need_weights=False)[0]  # (B, 1, D)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, std=0.02)


# --------------------------------------------------------------------------------------------
# transformers' CLIPVisionModel <-> ViT


CLIP_TYPES = ("clip", "clip_vision_model")
SIGLIP_TYPES = ("siglip", "siglip_vision_model")


def vit_config_from_transformers(cfg: dict) -> ViTConfig:
    """A ViTConfig from a transformers CLIP(Vision)Config or SigLIP(Vision)Config dict (a
    two-tower config works too: its vision_config is read)."""
    siglip = cfg.get("model_type") in SIGLIP_TYPES
    cfg = cfg.get("vision_config", cfg)
    siglip = siglip or cfg.get("model_type") in SIGLIP_TYPES
    return ViTConfig(
        image_size=cfg.get("image_size", 224),
        patch_size=cfg.get("patch_size", 16 if siglip else 32),
        width=cfg.get("hidden_size", 768),
        layers=cfg.get("num_hidden_layers", 12),
        heads=cfg.get("num_attention_heads", 12),
        mlp_hidden=cfg.get("intermediate_size", 3072),
        act=act_from_hf(cfg.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu")),
        eps=float(cfg.get("layer_norm_eps", 1e-6 if siglip else 1e-5)),
        pool=("map" if cfg.get("vision_use_head", True) else "mean") if siglip else "cls",
        pos_embed="learned",
        cls_token=not siglip,
        pre_norm=not siglip,
        patch_bias=siglip,
    )


_VIT_TOP_LEVEL = {"embeddings", "pre_layrnorm", "encoder", "post_layernorm", "head"}


def load_transformers_vision(directory: str | Path) -> ViT:
    """Our ViT with the weights of a transformers CLIP or SigLIP model saved in `directory`
    (the vision model alone or the two-tower model, whose text tower is left unread).

    Our ViT is named as transformers names both, so the key map is the identity."""
    from visto.nn.weights import load_by_key_map, read_config_json

    directory = Path(directory)
    config = read_config_json(directory)
    model_type = config.get("model_type")
    if model_type not in CLIP_TYPES + SIGLIP_TYPES:
        raise UserError(
            f"{directory} holds a transformers {model_type!r} model; a vision tower is read from "
            f"a CLIP or SigLIP directory (model_type one of {list(CLIP_TYPES + SIGLIP_TYPES)})"
        )
    vit = ViT(vit_config_from_transformers(config))
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


def load_transformers_clip_vision(directory: str | Path) -> ViT:
    """`load_transformers_vision` (the name it had when it read CLIP alone)."""
    return load_transformers_vision(directory)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
