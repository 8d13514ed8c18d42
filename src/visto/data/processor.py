"""The processor: one `Sample` in, the tensors a model trains on out.

    Sample(images, turns)
      -> chat template (visto.data.chat)          <s><|user|><image>\\nHow many?<|end|><|assistant|>2<|end|>
      -> placeholder expansion                     <image> -> <im_start> <image>*n <im_end>
      -> tokenizer (visto.data.tokenizer)          input_ids, and labels = ids on answer tokens only
      -> truncation that never cuts an image       pixel_values for the images still in the text
      -> Collator                                  padded batch + attention mask + image index

Invariants every model may rely on (property-tested in tests/test_processor_props.py):

- `(input_ids == tokenizer.image_id).sum() == sum(image_token_counts)`: one `<image>` id per
  visual feature vector, in order; the model overwrites those embeddings with its features.
- `pixel_values` holds exactly the images whose spans are in `input_ids` (see below for the
  "patch" mode layout).
- Labels are *not shifted* (the model shifts, as in transformers): `labels[t] == input_ids[t]`
  on the content tokens of assistant turns and on the `<|end|>` closing each of them, -100
  everywhere else (bos, role markers, system and user turns, image spans, padding).

Truncation to `max_length` keeps a prefix. If the cut would fall inside an image span
(`<im_start> ... <im_end>`), it moves back to just before that span, so the sequence may come
out shorter than `max_length`; images whose spans are gone are dropped from `pixel_values`.
Labels are cut at the same place: an answer cut in the middle keeps its loss on the tokens
that remain (it has no `<|end|>`), and an answer cut away entirely contributes nothing, so a
heavily truncated sample can have no label at all (`Encoded.num_loss_tokens == 0`).
In inference mode (`train=False`) a prompt is never truncated: a `UserError` says it is too long.

Image modes (`ProcessorConfig.resize_mode`):
- "pad" (LLaVA's expand2square): resize keeping the aspect ratio so the longer side is
  `image_size`, centre on a square filled with the mean colour (about 0 after normalizing).
- "resize": plain resize to `image_size` x `image_size` (CLIP-style; distorts the aspect).
- "patch" (Fuyu, Bavishi et al. 2023): keep the aspect ratio, shrink only if the longer side
  exceeds `image_size`, pad right/bottom to a multiple of `patch_size`. An image becomes a grid
  of rows x cols patches; its span is `<im_start> (<image>*cols <im_newline>)*rows <im_end>`, and
  `pixel_values` holds the flattened patches, (sum of rows*cols, 3*p*p), row-major, each patch
  flattened as (channel, y, x) like a Conv2d(kernel=stride=p) weight viewed as (D, 3*p*p).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps

from visto.config import from_dict, to_dict
from visto.data.chat import JINJA_CHAT_TEMPLATE, render_chat
from visto.data.images import normalise_pixels, open_image, to_rgb
from visto.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
from visto.data.tokenizer import (
    DEFAULT_LOC_BINS,
    Tokenizer,
    corpus_texts,
    format_box,
    parse_boxes,
    train_tokenizer,
)
from visto.data.tool_calls import TOOL_RESPONSE_START
from visto.errors import UserError
from visto.utils.io import atomic_write_json

__all__ = [
    "IGNORE_INDEX",
    "JINJA_CHAT_TEMPLATE",
    "Batch",
    "Collator",
    "Encoded",
    "ImageMemo",
    "Processor",
    "ProcessorConfig",
    "Tokenizer",
    "corpus_texts",
    "format_box",
    "image_transform",
    "letterbox_geometry",
    "load_rgb",
    "parse_boxes",
    "patch_geometry",
    "patch_image_transform",
    "patchify",
    "render_chat",
    "train_tokenizer",
]

IGNORE_INDEX = -100  # the label value torch's cross_entropy skips
RESIZE_MODES = ("pad", "resize", "patch")
ImageSource = Image.Image | bytes | str | os.PathLike


@dataclass
class ProcessorConfig:
    image_size: int = 64  # square side for "pad"/"resize"; longest side cap for "patch"
    resize_mode: str = "pad"  # one of RESIZE_MODES (module docstring)
    patch_size: int = 8  # "patch" mode pads each side to a multiple of this
    # The one image normalisation, (x / 255 - mean) / std per channel: a tower takes pixels as
    # its processor made them (transformers keeps these in preprocessor_config.json).
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_tokens: int = 16  # visual feature vectors per image ("pad"/"resize" modes)
    image_delimiters: bool = True  # wrap each image in <im_start> ... <im_end>
    max_length: int | None = None  # default truncation length for encode()
    loc_bins: int = DEFAULT_LOC_BINS  # number of <loc_k> box tokens
    vocab_size: int = 1024  # target size when training the tokenizer
    # `<focus>` slots before every answer (after the user turn's <|end|>, before <|assistant|>),
    # in which a model with a question focus writes the named object and its box
    # (visto.connectors.focus). Not part of the chat template's text: the processor adds them,
    # as it expands <image>. Needs a tokenizer with the token (tokenizer.with_focus_token).
    focus_tokens: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.resize_mode not in RESIZE_MODES:
            problems.append(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.image_size < 1 or self.patch_size < 1 or self.image_tokens < 1:
            problems.append("image_size, patch_size and image_tokens must be positive")
        if self.resize_mode == "patch" and self.image_size < self.patch_size:
            problems.append(
                f"image_size {self.image_size} is smaller than patch_size {self.patch_size}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append("mean and std need 3 values each (R, G, B), std > 0")
        if self.max_length is not None and self.max_length < 1:
            problems.append(f"max_length must be positive or null, got {self.max_length}")
        if self.focus_tokens < 0:
            problems.append(f"focus_tokens must be 0 or more, got {self.focus_tokens}")
        if not 1 <= self.loc_bins <= 1000:
            problems.append(f"loc_bins must be in 1..1000, got {self.loc_bins}")
        if problems:
            raise UserError("processor config: " + "; ".join(problems))
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]


# ----------------------------------------------------------------------------- images


def load_rgb(source: ImageSource) -> Image.Image:
    """An RGB image from a PIL image, encoded bytes or a path, EXIF orientation applied.

    Bytes and paths go through `open_image` (bounded decoding of untrusted input).
    """
    if not isinstance(source, Image.Image):
        return open_image(source)
    # Idempotent: open_image already transposed (and dropped the tag); a raw Image.open has not.
    # Upright images are used as they are: exif_transpose would return a copy of them.
    if source.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        source = ImageOps.exif_transpose(source)
    return to_rgb(source)


def _fill_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    # Pad with the mean colour so padding normalizes to ~0 (LLaVA's expand2square does the same).
    r, g, b = (round(255 * m) for m in mean)
    return (r, g, b)


def _normalize(pixels: np.ndarray, config: ProcessorConfig) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 (x / 255 - mean) / std (`normalise_pixels`)."""
    return normalise_pixels(pixels, config.mean, config.std)


# A downscale by this factor or more (source over target, on the axis shrunk most) runs
# torch's antialiased bicubic on the uint8 pixels instead of PIL's bicubic: the same filter
# (PIL's kernel, a = -0.5, widened by the factor; torchvision's resize runs it too) in other
# integer arithmetic, 3.2-3.7x faster on photos at 1 thread. On photos 0.2-0.4% of the values
# are 1 level off PIL's, none more; on noise, the worst case, a rare one is a few levels off; both
# are within rounding of the exact filter (bench/README.md, "Photo preprocessing: a reduced
# resample"). Below it PIL's own pixels are kept (bit-equal to transformers' PIL image
# processors, which the parity tests compare at 1.5x). math.inf: PIL's always.
FAST_DOWNSCALE_FROM = 2.0


def resized_pixels(image: Image.Image, width: int, height: int) -> np.ndarray:
    """An RGB image resized (bicubic) to width x height, as uint8 (3, height, width)."""
    if image.size == (width, height):
        return np.asarray(image).transpose(2, 0, 1)
    if max(image.width / width, image.height / height) >= FAST_DOWNSCALE_FROM:
        # a writable copy: PIL's own array is a read-only view, which torch warns about, and a
        # warnings filter around it is not thread-safe (the server preprocesses in threads)
        hwc = torch.from_numpy(np.array(image))
        chw = hwc.permute(2, 0, 1)  # channels-last, as torch's uint8 kernel takes it
        out = F.interpolate(chw[None], size=(height, width), mode="bicubic", antialias=True)
        return out[0].numpy()
    return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


def _on_canvas(
    pixels: np.ndarray, width: int, height: int, left: int, top: int, config: ProcessorConfig
) -> np.ndarray:
    """`pixels` (3, h, w) placed at (left, top) on a width x height canvas of the mean colour."""
    canvas = np.empty((3, height, width), dtype=np.uint8)
    canvas[:] = np.asarray(_fill_colour(config.mean), dtype=np.uint8)[:, None, None]
    canvas[:, top : top + pixels.shape[1], left : left + pixels.shape[2]] = pixels
    return canvas


def letterbox_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top): the aspect-preserving fit of an image centred in size x size."""
    scale = size / max(width, height)
    new_w = min(size, max(1, round(width * scale)))
    new_h = min(size, max(1, round(height * scale)))
    return new_w, new_h, (size - new_w) // 2, (size - new_h) // 2


def image_transform(source: ImageSource, config: ProcessorConfig) -> torch.Tensor:
    """One image -> float32 (3, image_size, image_size), "pad" or "resize" mode."""
    assert config.resize_mode in ("pad", "resize"), "use patch_image_transform for patch mode"
    image = load_rgb(source)
    size = config.image_size
    if config.resize_mode == "resize":
        return _normalize(resized_pixels(image, size, size), config)
    new_w, new_h, left, top = letterbox_geometry(image.width, image.height, size)
    pixels = resized_pixels(image, new_w, new_h)
    if (new_w, new_h) != (size, size):
        pixels = _on_canvas(pixels, size, size, left, top, config)
    return _normalize(pixels, config)


def patch_geometry(width: int, height: int, max_size: int, patch: int) -> tuple[int, int, int, int]:
    """(new_w, new_h, rows, cols) for "patch" mode: shrink to fit max_size, never enlarge."""
    scale = min(1.0, max_size / max(width, height))
    new_w = max(1, round(width * scale))
    new_h = max(1, round(height * scale))
    return new_w, new_h, math.ceil(new_h / patch), math.ceil(new_w / patch)


def patch_image_transform(
    source: ImageSource, config: ProcessorConfig
) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image -> float32 (3, rows*p, cols*p) padded right/bottom, and its grid (rows, cols)."""
    image = load_rgb(source)
    p = config.patch_size
    new_w, new_h, rows, cols = patch_geometry(image.width, image.height, config.image_size, p)
    pixels = _on_canvas(resized_pixels(image, new_w, new_h), cols * p, rows * p, 0, 0, config)
    return _normalize(pixels, config), (rows, cols)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(3, rows*p, cols*p) -> (rows*cols, 3*p*p), patches row-major, each as (channel, y, x)."""
    c, h, w = x.shape
    assert h % patch == 0 and w % patch == 0, f"image {h}x{w} is not a multiple of patch {patch}"
    rows, cols = h // patch, w // patch
    x = x.view(c, rows, patch, cols, patch).permute(1, 3, 0, 2, 4)  # (rows, cols, 3, p, p)
    return x.reshape(rows * cols, c * patch * patch)


class ImageMemo:
    """Each distinct image of one batch decoded and transformed once: a batch of questions
    about one picture (the same PIL image, bytes or path in every row) preprocesses it once
    and every row reads the same pixel values (a resize of a 500 px photo costs milliseconds).
    An image is known by its source: a PIL image by identity (the memo holds it, so its id is
    not reused while the memo lives), bytes by their value, a path by its string. For one
    batch: an image changed in place, or a file rewritten, after it was read is not read again."""

    def __init__(self) -> None:
        self._made: dict[Hashable, Any] = {}
        self._held: list[ImageSource] = []

    def get(self, what: str, source: ImageSource, make: Callable[[Any], Any]) -> Any:
        """`make(source)`, made once per `what` and source."""
        if isinstance(source, Image.Image):
            key: Hashable = (what, "image", id(source))
        elif isinstance(source, (bytes, bytearray)):
            key = (what, "bytes", bytes(source))
        else:
            try:
                key = (what, "path", os.fspath(source))
            except TypeError:  # not an image source: `make` says so, as without a memo
                return make(source)
        if key not in self._made:
            self._made[key] = make(source)
            self._held.append(source)
        return self._made[key]


# ----------------------------------------------------------------------------- encoding


def _long_tensor(values: list[int] | None) -> torch.Tensor | None:
    return None if values is None else torch.tensor(values, dtype=torch.long)


@dataclass
class Encoded:
    """One encoded sample (see the module docstring for the invariants)."""

    input_ids: torch.Tensor  # (T,) int64
    labels: torch.Tensor  # (T,) int64, IGNORE_INDEX off the answers
    pixel_values: torch.Tensor  # (N_img, 3, H, W); "patch" mode: (sum rows*cols, 3*p*p)
    image_token_counts: list[int]  # <image> ids (= feature vectors) per kept image
    image_grids: list[tuple[int, int]] = field(default_factory=list)  # (rows, cols), patch mode
    truncated: bool = False  # True if max_length cut anything (tokens or images)
    # Samples with independent_turns: 0 on the shared prefix (up to the last image), k on the
    # tokens of exchange k; positions restart after the prefix for every exchange.
    segment_ids: torch.Tensor | None = None  # (T,) int64
    position_ids: torch.Tensor | None = None  # (T,) int64

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens, 0 on padding
    position_ids: torch.Tensor  # (B, T) 0.. over real tokens (matters with left padding)
    labels: torch.Tensor  # (B, T) IGNORE_INDEX on padding
    pixel_values: torch.Tensor  # all images of the batch, concatenated along dim 0
    image_sample_index: torch.Tensor  # (N_img,) which row of the batch each image belongs to
    image_token_counts: torch.Tensor  # (N_img,) feature vectors per image
    image_grids: torch.Tensor | None = None  # (N_img, 2) rows, cols in "patch" mode
    # (B, T) when a sample has independent_turns: a token sees the prefix (0) and its own
    # exchange only (the decoder's `segment_ids`); None = plain causal attention.
    segment_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move to `device`; `dtype` (e.g. bf16 on GPU) applies to pixel_values only."""
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        if dtype is not None:
            moved["pixel_values"] = moved["pixel_values"].to(dtype)
        return Batch(**moved)


@dataclass
class Collator:
    """Pads encoded samples into a batch: right padding for training, left for generation."""

    pad_id: int
    padding_side: str = "right"

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def __call__(self, items: Sequence[Encoded]) -> Batch:
        assert items, "cannot collate an empty batch"
        lengths = [len(e.input_ids) for e in items]
        width, b = max(lengths), len(items)
        # A fixed number of tensor ops whatever the batch size (a prompt's collation is part of
        # its time to first token): rows as they are when none is padded, else each row's
        # tokens scattered into its real columns (masked_scatter fills them row-major).
        if min(lengths) == width:
            input_ids = torch.stack([e.input_ids for e in items]).long()
            labels = torch.stack([e.labels for e in items]).long()
            attention_mask = torch.ones((b, width), dtype=torch.long)
            position_ids = torch.arange(width).repeat(b, 1)
        else:
            real = torch.tensor(lengths)[:, None]
            columns = torch.arange(width)
            mask = columns < real if self.padding_side == "right" else columns >= width - real
            input_ids = torch.full((b, width), self.pad_id, dtype=torch.long).masked_scatter_(
                mask, torch.cat([e.input_ids for e in items]).long()
            )
            labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long).masked_scatter_(
                mask, torch.cat([e.labels for e in items]).long()
            )
            attention_mask = mask.long()
            position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_(min=0)
        segment_ids = None
        if any(e.segment_ids is not None for e in items):
            assert self.padding_side == "right", (
                "independent_turns is a training layout (right padding)"
            )
            segment_ids = torch.zeros((b, width), dtype=torch.long)
            for row, e in enumerate(items):
                if e.segment_ids is not None:
                    segment_ids[row, : len(e.segment_ids)] = e.segment_ids
                    position_ids[row, : len(e.position_ids)] = e.position_ids
        counts = [c for e in items for c in e.image_token_counts]
        grids = [g for e in items for g in e.image_grids]
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            pixel_values=items[0].pixel_values if b == 1 else torch.cat(
                [e.pixel_values for e in items], dim=0
            ),
            image_sample_index=torch.tensor(
                [row for row, e in enumerate(items) for _ in e.image_token_counts], dtype=torch.long
            ),
            image_token_counts=torch.tensor(counts, dtype=torch.long),
            image_grids=torch.tensor(grids, dtype=torch.long).view(-1, 2) if grids else None,
            segment_ids=segment_ids,
        )


class Processor:
    """Image transform + chat template + tokenizer + placeholder expansion + label mask."""

    def __init__(self, config: ProcessorConfig, tokenizer: Tokenizer):
        if tokenizer.loc_bins != config.loc_bins:
            raise UserError(
                f"the tokenizer has {tokenizer.loc_bins} location tokens but the processor config "
                f"says loc_bins={config.loc_bins}; retrain the tokenizer or fix processor.json"
            )
        if config.focus_tokens and tokenizer.focus_id is None:
            raise UserError(
                f"the processor config asks for {config.focus_tokens} <focus> slots per answer but "
                "the tokenizer has no <focus> token; add it with "
                "visto.data.tokenizer.with_focus_token (and size the decoder to the new vocabulary)"
            )
        self.config = config
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], config: ProcessorConfig) -> Processor:
        """Train the tokenizer on `texts` (e.g. `corpus_texts(samples)`) with `config`'s sizes."""
        return cls(config, train_tokenizer(texts, config.vocab_size, loc_bins=config.loc_bins))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def training_batch(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor | None]:
        """What every generative family's `collate` returns: whole conversations (or shared-prefix
        packs), labels on the answers, right padding; the `Batch` fields as a dict."""
        batch = self.collator("right")([self.encode(s, train=True) for s in samples])
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}

    def collator(self, padding_side: str = "right") -> Collator:
        return Collator(pad_id=self.tokenizer.pad_id, padding_side=padding_side)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Generated ids -> answer text (turn and image tokens dropped, `<loc_k>` kept)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special=True)

    def render(self, turns: Sequence[Turn], add_generation_prompt: bool = False) -> str:
        """The chat template text, before placeholder expansion (what HF clients see)."""
        return render_chat(turns, add_generation_prompt)

    # -- images

    def _image_span(self, count: int, grid: tuple[int, int] | None) -> list[int]:
        tok = self.tokenizer
        if grid is None:
            body = [tok.image_id] * count
        else:
            rows, cols = grid
            body = ([tok.image_id] * cols + [tok.im_newline_id]) * rows
        if self.config.image_delimiters:
            return [tok.im_start_id, *body, tok.im_end_id]
        return body

    def pixel_values(
        self, images: Sequence[ImageSource], memo: ImageMemo | None = None
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Images -> the `pixel_values` tensor of `Encoded` (and grids in "patch" mode).
        `memo`: the batch's `ImageMemo` (each distinct image transformed once)."""
        cfg = self.config
        if cfg.resize_mode == "patch":
            p = cfg.patch_size
            patch = lambda im: patch_image_transform(im, cfg)  # noqa: E731
            out = [patch(im) if memo is None else memo.get("patch", im, patch) for im in images]
            grids = [grid for _, grid in out]
            if not out:
                return torch.zeros(0, 3 * p * p), []
            return torch.cat([patchify(x, p) for x, _ in out], dim=0), grids
        if not images:
            return torch.zeros(0, 3, cfg.image_size, cfg.image_size), []
        square = lambda im: image_transform(im, cfg)  # noqa: E731
        pixels = [square(im) if memo is None else memo.get("square", im, square) for im in images]
        if len(pixels) == 1:  # a view: the collator copies it into the batch
            return pixels[0][None], []
        return torch.stack(pixels), []

    # -- text

    def _tokens(
        self,
        turns: Sequence[Turn],
        counts: Sequence[int],
        grids: Sequence[tuple[int, int] | None],
        train: bool,
    ) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        """The chat template as ids, its labels, and [start, end) of each image span.

        Each content piece is tokenized alone; the template puts a special token at every
        boundary, so this equals tokenizing the rendered string (tested against HF), plus
        the `focus_tokens` slots before each answer, which the template does not spell.
        """
        tok = self.tokenizer
        ids: list[int] = [tok.bos_id]
        labels: list[int] = [IGNORE_INDEX]
        spans: list[tuple[int, int]] = []  # [start, end) of each image span in ids
        focus = [tok.focus_id] * self.config.focus_tokens  # before every answer; never labels
        for turn in turns:
            learn = train and turn.role == "assistant"
            if turn.role == "assistant" and focus:
                ids += focus
                labels += [IGNORE_INDEX] * len(focus)
            ids.append(tok.role_ids[turn.role])
            labels.append(IGNORE_INDEX)
            for j, piece in enumerate(turn.content.split(IMAGE_PLACEHOLDER)):
                if j > 0:
                    i = len(spans)
                    span = self._image_span(counts[i], grids[i])
                    spans.append((len(ids), len(ids) + len(span)))
                    ids += span
                    labels += [IGNORE_INDEX] * len(span)  # features are inputs, never targets
                if piece:
                    piece_ids = tok.encode(piece)
                    ids += piece_ids
                    labels += piece_ids if learn else [IGNORE_INDEX] * len(piece_ids)
            ids.append(tok.end_id)
            labels.append(tok.end_id if learn else IGNORE_INDEX)
        if not train:
            ids += [*focus, tok.role_ids["assistant"]]
            labels += [IGNORE_INDEX] * (len(focus) + 1)
        return ids, labels, spans

    def encode(
        self,
        sample: Sample,
        max_length: int | None = None,
        train: bool = True,
        image_token_counts: Sequence[int] | None = None,
        memo: ImageMemo | None = None,
    ) -> Encoded:
        """A sample -> ids, labels and pixels.

        `train=True`: the whole conversation, with labels on the assistant answers.
        `train=False`: a prompt for generation: a final assistant turn (a reference answer) is
        left out, the generation prompt is added, and labels are all IGNORE_INDEX.
        `max_length` (default `config.max_length`) truncates as the module docstring says.
        `image_token_counts` overrides `config.image_tokens` per image, for models whose
        feature count varies by image ("pad"/"resize" modes only).
        `memo`: an `ImageMemo` shared by the samples of one batch, so that an image several
        samples hold is decoded and transformed once (`prompt_batch`).
        """
        try:
            sample = sample.normalized()
        except ValueError as e:
            raise UserError(str(e)) from None
        cfg = self.config
        max_length = cfg.max_length if max_length is None else max_length
        turns = list(sample.turns)
        if not train and turns and turns[-1].role == "assistant":
            turns.pop()
        if train and sample.independent_turns:
            return self._encode_independent(sample, max_length, memo)
        n_images = sum(t.content.count(IMAGE_PLACEHOLDER) for t in turns)
        images, counts, grids = self._image_layout(
            sample.images[:n_images], image_token_counts, memo
        )

        ids, labels, spans = self._tokens(turns, counts, grids, train)
        assert len(spans) == len(images) and len(ids) == len(labels)

        truncated = False
        if max_length is not None and len(ids) > max_length:
            if not train:
                raise UserError(
                    f"the prompt is {len(ids)} tokens (images included) but max_length is "
                    f"{max_length}; shorten the text, send fewer images, or raise max_length"
                )
            cut = max_length
            for start, end in spans:
                if start < cut < end:
                    cut = start  # never split an image span
            ids, labels = ids[:cut], labels[:cut]
            kept = sum(1 for _, end in spans if end <= cut)
            images, counts, grids = images[:kept], counts[:kept], grids[:kept]
            truncated = True

        return self._encoded(ids, labels, images, counts, truncated, memo=memo)

    def prompt_batch(self, samples: Sequence[Sample]) -> Batch:
        """Prompts for generation (`encode(train=False)`), left padded: what every generative
        family's `prompt_batch` returns. An image several samples hold (questions about one
        picture) is preprocessed once (`ImageMemo`)."""
        memo = ImageMemo()
        return self.collator("left")([self.encode(s, train=False, memo=memo) for s in samples])

    def _encoded(
        self,
        ids: list[int],
        labels: list[int],
        images: list[ImageSource],
        counts: list[int],
        truncated: bool,
        segments: list[int] | None = None,
        positions: list[int] | None = None,
        memo: ImageMemo | None = None,
    ) -> Encoded:
        pixel_values, pixel_grids = self.pixel_values(images, memo)
        return Encoded(
            input_ids=_long_tensor(ids),
            labels=_long_tensor(labels),
            pixel_values=pixel_values,
            image_token_counts=counts,
            image_grids=pixel_grids,
            truncated=truncated,
            segment_ids=_long_tensor(segments),
            position_ids=_long_tensor(positions),
        )

    def _image_layout(
        self,
        images: list[ImageSource],
        image_token_counts: Sequence[int] | None,
        memo: ImageMemo | None = None,
    ) -> tuple[list[ImageSource], list[int], list[tuple[int, int] | None]]:
        """The images, their feature counts and (patch mode) grids, known before any pixel
        work (patch mode: from each image's size)."""
        cfg = self.config
        grids: list[tuple[int, int] | None]
        if cfg.resize_mode == "patch":
            if image_token_counts is not None:
                raise ValueError(
                    "patch mode derives token counts from image sizes; do not pass them"
                )
            images = [load_rgb(im) if memo is None else memo.get("rgb", im, load_rgb)
                      for im in images]  # fmt: skip
            grids = [
                patch_geometry(im.width, im.height, cfg.image_size, cfg.patch_size)[2:]
                for im in images
            ]
            counts = [rows * cols for rows, cols in grids]  # type: ignore[misc]
        else:
            grids = [None] * len(images)
            counts = (
                list(image_token_counts)
                if image_token_counts is not None
                else [cfg.image_tokens] * len(images)
            )
            if len(counts) != len(images) or min(counts, default=1) < 1:
                raise ValueError(
                    f"need one positive token count per image ({len(images)}), got {counts}"
                )
        return images, counts, grids

    def _encode_independent(
        self, sample: Sample, max_length: int | None, memo: ImageMemo | None = None
    ) -> Encoded:
        """Shared-prefix packing (`Sample.independent_turns`): the tokens up to the end of the
        last image span once, then each exchange's tokens exactly as if it were the only one
        (same ids, labels and positions), in a segment of its own. Exchanges that would pass
        `max_length` are left out (`truncated`); if even the first does not fit, the sample
        is the first exchange alone, truncated as usual.

        A tool exchange is one exchange: a user turn holding a tool's result
        (`<tool_response>...`) and the answer after it belong to the pairs before them, since
        the answer must see its call and the result (and nothing of the other exchanges)."""
        turns = list(sample.turns)
        system = turns[:1] if turns and turns[0].role == "system" else []
        pairs = turns[len(system) :]
        roles = [t.role for t in pairs]
        if not pairs or roles != ["user", "assistant"] * (len(pairs) // 2):
            raise UserError(
                f"sample {sample.id!r} has independent_turns, so its turns must be user/assistant "
                f"pairs after an optional system turn; got roles {roles}"
            )
        exchanges: list[list[Turn]] = []
        for k in range(0, len(pairs), 2):
            if exchanges and pairs[k].content.startswith(TOOL_RESPONSE_START):
                exchanges[-1] += pairs[k : k + 2]
            else:
                exchanges.append(pairs[k : k + 2])
        first = pairs[0].content
        lead_end = first.rfind(IMAGE_PLACEHOLDER) + len(IMAGE_PLACEHOLDER)
        if lead_end < len(IMAGE_PLACEHOLDER) or any(
            IMAGE_PLACEHOLDER in t.content for t in [*system, *pairs[1:]]
        ):
            raise UserError(
                f"sample {sample.id!r} has independent_turns: its images belong at the start of "
                f"the first user turn and nowhere else (every exchange shares them)"
            )
        while lead_end < len(first) and first[lead_end].isspace():
            lead_end += 1
        lead = first[:lead_end]
        images, counts, grids = self._image_layout(
            sample.images[: lead.count(IMAGE_PLACEHOLDER)], None, memo
        )
        ids, labels, spans = self._tokens(system + exchanges[0], counts, grids, True)
        if max_length is not None and len(ids) > max_length:
            single = dataclasses.replace(
                sample, turns=system + exchanges[0], independent_turns=False
            )
            return self.encode(single, max_length, train=True, memo=memo)
        prefix = spans[-1][1]
        segments = [0] * prefix + [1] * (len(ids) - prefix)
        positions = list(range(len(ids)))
        truncated = False
        for k, (question, *rest) in enumerate(exchanges[1:], start=2):
            exchange = [*system, Turn("user", lead + question.content), *rest]
            ids_k, labels_k, _ = self._tokens(exchange, counts, grids, True)
            assert ids_k[:prefix] == ids[:prefix], "exchanges must share the prefix"
            tail = len(ids_k) - prefix
            if max_length is not None and len(ids) + tail > max_length:
                truncated = True
                continue  # a shorter exchange further on may still fit
            ids += ids_k[prefix:]
            labels += labels_k[prefix:]
            segments += [k] * tail
            positions += range(prefix, prefix + tail)
        return self._encoded(ids, labels, images, counts, truncated, segments, positions, memo)

    def encode_text(self, text: str, max_length: int | None = None) -> torch.Tensor:
        """Plain text -> (T,) ids `<s> text </s>`, for text encoders (CLIP) and caption-only LM data.

        Truncation keeps `</s>` as the last token, since text towers read their summary there.
        """
        ids = self.tokenizer.encode(text)
        if max_length is not None:
            assert max_length >= 2, "room for <s> and </s> is needed"
            ids = ids[: max_length - 2]
        return torch.tensor([self.tokenizer.bos_id, *ids, self.tokenizer.eos_id], dtype=torch.long)

    # -- persistence

    def save(self, directory: str | Path) -> Path:
        """Write processor.json and tokenizer.json into `directory` (each file atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / "processor.json", to_dict(self.config))
        self.tokenizer.save(directory / "tokenizer.json")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Processor:
        directory = Path(directory)
        path = directory / "processor.json"
        if not path.is_file():
            raise UserError(
                f"{path} not found; a checkpoint directory holds processor.json and tokenizer.json"
            )
        try:
            data: Any = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
        config = from_dict(ProcessorConfig, data, where=str(path))
        return cls(config, Tokenizer.load(directory / "tokenizer.json"))
