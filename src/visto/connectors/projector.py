"""Projectors: vision features (B, N, D_v) -> visual tokens (B, N', D_lm) the language model reads.

Three kinds, from the simplest up:

    linear         one Linear                                  LLaVA 1.0 (Liu et al. 2023)
    mlp            Linear -> GELU -> Linear                     LLaVA 1.5 (Liu et al. 2023b, "mlp2x_gelu")
    pixel_shuffle  space-to-depth by r, then one Linear          nanoVLM / Idefics3 (Laurençon et al. 2024)
    regions        one token per detected object, tied to the   OSCAR (Li et al. 2020); see
                   decoder's word embeddings                     visto.connectors.regions

Pixel shuffle folds each r x r block of neighbouring patches into one token of r*r*D_v
channels, so an image costs N / r^2 tokens instead of N: fewer tokens, shorter sequences,
faster training, which is what a CPU budget needs.

Module names follow transformers' `LlavaMultiModalProjector` (`linear_1`, `act`, `linear_2`),
so the `mlp` kind exports to that format by key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from visto.errors import UserError

KINDS = ("linear", "mlp", "pixel_shuffle", "regions")


@dataclass
class ProjectorConfig:
    # The input and output widths are not settings: the towers fix them (build_projector's
    # input_dim = vision width D_v, output_dim = language model width D_lm).
    kind: str = "mlp"  # one of KINDS
    hidden_dim: int | None = None  # mlp only; default output_dim (as LLaVA 1.5)
    scale_factor: int = 2  # pixel_shuffle only: r, tokens shrink by r^2
    slots: int = 10  # regions only: objects per image (the world has at most 9 objects)
    # regions only: each object token is followed by its box's 4 location tokens, the very
    # embeddings a grounding answer writes, so the decoder copies a box instead of decoding
    # it from a sum (Pix2Seq tokens in the input, as OFA and Kosmos-2 ground).
    box_tokens: bool = False
    # regions only: lines of text read by the connector's OCR reader (connectors.text_reader),
    # each given as up to `text_tokens` of the decoder's own token embeddings (M4C's OCR tokens)
    text_slots: int = 0
    text_tokens: int = 6
    # regions only: each answer's question scores the objects, and the ones it names are added,
    # pooled, where the answer starts (connectors.focus: top-down attention, Anderson et al.
    # 2018), so the decoder reads the named object instead of searching for it
    focus: bool = False
    # regions with focus only: after the focus's 4 box slots, `read_slots` more `<focus>` slots
    # hold what the OCR reader read (every line, joined as an OCR answer writes them), so
    # reading is a copy from a fixed distance back, as grounding is (M4C's OCR tokens, placed
    # where the answer can copy them)
    read_slots: int = 0
    # regions with focus slots only: answers copy the slots' tokens through a pointer head
    # beside the LM head (connectors.pointer: M4C's dynamic pointer), not through attention
    pointer: bool = False
    # regions only: a detected centre whose box overlaps a more confident one's by more than
    # this IoU is dropped as the same object found twice (greedy NMS); 0 = off
    box_nms: float = 0.0
    # regions with focus only: the focus reads which attribute words a question names and
    # matches them against each object's predicted attributes (connectors.named: filter,
    # count, relate), instead of the cosine of the question's mean embedding alone
    named: bool = False
    # regions with focus only: the bump width of the focus's count histograms (a count c
    # lights bin k by exp(-((c - k) / width)^2)); 1.0 in checkpoints from before it was a
    # setting, narrower in the quickstart (connectors.focus: each count its own bin)
    count_width: float = 1.0
    # regions only: the order of the object tokens: "raster" (their centres' patches, top-left
    # first) or "left_to_right" (their boxes' left edges: the order the world's JSON answer
    # lists objects in, so writing it is a scan over the tokens, not a sort)
    object_order: str = "raster"
    # regions with named words and a pointer only: the pointer may also copy the words an
    # answer about the named subject writes ("large red hexagon", its colour, shape or size
    # alone, its count as a digit) from the detector's attribute probabilities
    # (connectors.named.answer_runs), as it copies a box
    copy_answers: bool = False
    # regions with copy_answers only: the pointer may also copy the executed yes/no of an
    # existence or relation question (connectors.named.verdict_run: whether the named relation
    # holds, else whether the named subject is there), as one more run after the answer runs;
    # off in checkpoints from before it (their pointer has one run fewer)
    copy_verdicts: bool = False
    # regions with a pointer only: the pointer's slot scores also read each answer's question
    # itself (its words pooled by the focus, through a zero-initialised map: connectors.pointer),
    # so which run an answer copies is one linear read of the question's words
    question_pointer: bool = False
    # regions with a pointer only: the pointer may also copy the JSON answer the connector
    # writes from its detections and what it read (connectors.script), token by token
    copy_json: bool = False
    act: str = "gelu"  # mlp only: "gelu" (exact, erf) as transformers' projector_hidden_act
    bias: bool = True
    # LayerNorm on each vision feature before the projection (InternVL's projector does
    # this): frozen features of a tower trained from scratch can be large and nearly
    # collinear, which the language model then has trouble telling apart.
    norm: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"projector kind must be one of {KINDS}, got {self.kind!r}")
        if self.act not in ACTIVATIONS:
            raise UserError(f"projector act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
        if self.slots < 1:
            raise UserError(f"projector slots must be at least 1, got {self.slots}")
        if self.focus and self.kind != "regions":
            raise UserError(f"projector focus needs kind 'regions' (object tokens), got {self.kind!r}")
        if self.read_slots < 0 or (self.read_slots and not self.focus):
            raise UserError("projector read_slots must be >= 0, and needs focus (they are <focus> slots)")
        if self.pointer and not self.focus:
            raise UserError("projector pointer needs focus (it copies the <focus> slots' tokens)")
        if self.named and not self.focus:
            raise UserError("projector named needs focus (it is how the focus reads the question)")
        if self.copy_answers and not (self.named and self.pointer):
            raise UserError("projector copy_answers needs named and pointer (the named words pick what the pointer copies)")
        if self.copy_verdicts and not self.copy_answers:
            raise UserError("projector copy_verdicts needs copy_answers (with named and pointer: the verdict is "
                            "one more answer run the pointer copies)")  # fmt: skip
        if self.question_pointer and not self.pointer:
            raise UserError("projector question_pointer needs pointer (it adds the question to the pointer's scores)")
        if self.copy_json and not self.pointer:
            raise UserError("projector copy_json needs pointer (it copies the JSON the detections write)")
        if self.object_order not in ("raster", "left_to_right"):
            raise UserError(f"projector object_order must be 'raster' or 'left_to_right', got {self.object_order!r}")
        if self.count_width <= 0:
            raise UserError(f"projector count_width must be > 0 (a histogram bump's width), got {self.count_width}")
        if not 0 <= self.box_nms < 1:
            raise UserError(f"projector box_nms is an IoU in [0, 1) (0 = off), got {self.box_nms}")
        if self.text_slots < 0 or self.text_tokens < 1:
            raise UserError("projector text_slots must be >= 0 and text_tokens >= 1")
        if self.scale_factor < 1 or (self.hidden_dim is not None and self.hidden_dim < 1):
            raise UserError("projector scale_factor and hidden_dim must be positive")

    def num_tokens(self, num_patches: int) -> int:
        """Visual tokens per image for `num_patches` vision features."""
        if self.kind == "regions":
            return self.slots * (5 if self.box_tokens else 1) + self.text_slots * self.text_tokens
        if self.kind != "pixel_shuffle":
            return num_patches
        side = math.isqrt(num_patches)
        r = self.scale_factor
        if side * side != num_patches or side % r:
            raise UserError(
                f"pixel_shuffle needs a square grid of patches whose side is a multiple of "
                f"scale_factor {r}; got {num_patches} patches"
            )
        return num_patches // (r * r)


ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU}


def pixel_shuffle(x: Tensor, r: int) -> Tensor:
    """Space-to-depth: (B, N, D) on a sqrt(N) x sqrt(N) grid -> (B, N / r^2, r^2 * D).

    Output token (i, j) (row-major over the (side/r) x (side/r) grid) is the concatenation of
    the features of patches (i*r + a, j*r + b) for a, b in 0..r-1, a outer (nanoVLM's order).
    """
    B, N, D = x.shape
    side = math.isqrt(N)
    assert side * side == N and side % r == 0, f"{N} patches are not a square grid divisible by {r}"
    x = x.reshape(B, side // r, r, side // r, r, D)  # (B, h, a, w, b, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, h, w, a, b, D)
    return x.reshape(B, (side // r) ** 2, r * r * D)  # (B, N / r^2, r^2 * D)


def input_norm(cfg: ProjectorConfig, input_dim: int) -> nn.Module:
    return nn.LayerNorm(input_dim) if cfg.norm else nn.Identity()


class LinearProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, input_dim: int, output_dim: int) -> None:
        super().__init__()
        self.pre_norm = input_norm(cfg, input_dim)
        self.linear_1 = nn.Linear(input_dim, output_dim, bias=cfg.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear_1(self.pre_norm(features))  # (B, N, D_lm)


class MLPProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, input_dim: int, output_dim: int) -> None:
        super().__init__()
        hidden = cfg.hidden_dim or output_dim
        self.pre_norm = input_norm(cfg, input_dim)
        self.linear_1 = nn.Linear(input_dim, hidden, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.act]()
        self.linear_2 = nn.Linear(hidden, output_dim, bias=cfg.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(self.pre_norm(features))))  # (B, N, D_lm)


class PixelShuffleProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, input_dim: int, output_dim: int) -> None:
        super().__init__()
        self.scale_factor = cfg.scale_factor
        self.pre_norm = input_norm(cfg, input_dim)
        self.linear_1 = nn.Linear(input_dim * cfg.scale_factor**2, output_dim, bias=cfg.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear_1(pixel_shuffle(self.pre_norm(features), self.scale_factor))  # (B, N / r^2, D_lm)


def build_projector(cfg: ProjectorConfig, input_dim: int, output_dim: int) -> nn.Module:
    """A projector from `input_dim` vision features to `output_dim` visual tokens."""
    assert input_dim >= 1 and output_dim >= 1, (input_dim, output_dim)
    if cfg.kind == "regions":
        from visto.connectors.regions import RegionConnector

        module: nn.Module = RegionConnector(
            input_dim, output_dim, cfg.slots, box_tokens=cfg.box_tokens,
            text_slots=cfg.text_slots, text_tokens=cfg.text_tokens, focus=cfg.focus,
            read_slots=cfg.read_slots, pointer=cfg.pointer, box_nms=cfg.box_nms, named=cfg.named,
            count_width=cfg.count_width, object_order=cfg.object_order, copy_answers=cfg.copy_answers,
            copy_json=cfg.copy_json, copy_verdicts=cfg.copy_verdicts, question_pointer=cfg.question_pointer,
        )  # fmt: skip
    else:
        kinds = {"linear": LinearProjector, "mlp": MLPProjector, "pixel_shuffle": PixelShuffleProjector}
        module = kinds[cfg.kind](cfg, input_dim, output_dim)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


__all__ = [
    "KINDS",
    "LinearProjector",
    "MLPProjector",
    "PixelShuffleProjector",
    "ProjectorConfig",
    "build_projector",
    "pixel_shuffle",
]
