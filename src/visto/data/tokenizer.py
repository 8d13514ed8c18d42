"""The text side of the processor: a byte-level BPE with visto's special tokens, and box tokens.

The tokenizer is trained offline on our own corpus with the `tokenizers` library (GPT-2 style
byte-level BPE: every string, in any script, round-trips exactly, and there is no unknown token).
Its vocabulary starts with visto's special tokens, in a fixed order so that their ids never
move (`visto.data.special_tokens` holds them, with their table).

After the learnt merges come `loc_bins` location tokens `<loc_0>` ... `<loc_{bins-1}>` (Pix2Seq,
Chen et al. 2022; PaliGemma uses the same idea with 1024 bins). A user-facing box coordinate
v in 0..999 goes to bin k = v * bins // 1000 and back to the middle integer of that bin, so a
box costs four tokens instead of ~12 digits and commas. Location tokens are ordinary (not
"special") added tokens: `decode(..., skip_special=True)` keeps them, so box answers survive.

Text given to `encode` is content, never structure: a special token's spelling inside it
("<|end|>", "<s>") is tokenized as plain bytes, so user text cannot forge turn markers.
`<image>` placeholders are split out by the processor before text reaches here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from visto.data.sample import IMAGE_PLACEHOLDER, Sample
from visto.data.special_tokens import (
    BOS,
    END_OF_TURN,
    EOS,
    FOCUS,
    IM_END,
    IM_NEWLINE,
    IM_START,
    IMAGE,
    PAD,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
)
from visto.errors import UserError
from visto.utils.io import atomic_write_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEFAULT_LOC_BINS = 100
BOX_RANGE = 1000  # user-facing box coordinates are ints in 0..999 (DESIGN.md)
_LOC_RE = re.compile(r"<loc_(\d+)>")
_LOC_BOX_RE = re.compile(r"<loc_(\d+)>\s*<loc_(\d+)>\s*<loc_(\d+)>\s*<loc_(\d+)>")
_PLAIN_BOX_RE = re.compile(r"\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]")
_STRAY_LOC_RE = re.compile(r"\s*<loc_\d+>")
_TRAILING_LOCS_RE = re.compile(r"(?:<loc_\d+>\s*)+$")


# ----------------------------------------------------------------------------- boxes


def loc_token(k: int) -> str:
    return f"<loc_{k}>"


def coord_to_bin(v: int, loc_bins: int = DEFAULT_LOC_BINS) -> int:
    """A box coordinate 0..999 -> its location bin 0..loc_bins-1."""
    if not 0 <= v < BOX_RANGE:
        raise ValueError(f"box coordinate {v} is outside 0..{BOX_RANGE - 1}")
    return v * loc_bins // BOX_RANGE


def bin_to_coord(k: int, loc_bins: int = DEFAULT_LOC_BINS) -> int:
    """A location bin -> the middle integer of the coordinates that fall in it."""
    if not 0 <= k < loc_bins:
        raise ValueError(f"location bin {k} is outside 0..{loc_bins - 1}")
    lo = -(-k * BOX_RANGE // loc_bins)  # smallest v with v * bins // 1000 == k
    hi = -(-(k + 1) * BOX_RANGE // loc_bins) - 1  # largest such v
    return (lo + hi) // 2


def format_box(box: Sequence[int], loc_bins: int = DEFAULT_LOC_BINS) -> str:
    """[x1, y1, x2, y2] in 0..999 -> "<loc_a><loc_b><loc_c><loc_d>"."""
    if len(box) != 4:
        raise ValueError(f"a box has 4 coordinates (x1, y1, x2, y2), got {list(box)}")
    return "".join(loc_token(coord_to_bin(int(v), loc_bins)) for v in box)


def parse_boxes(text: str, loc_bins: int = DEFAULT_LOC_BINS) -> list[list[int]]:
    """Every box in `text`, in order of appearance, as [x1, y1, x2, y2] ints in 0..999.

    Reads both four location tokens in a row and plain "[x1, y1, x2, y2]" lists, so it
    parses our model's answers and those of a model that writes numbers. Plain values above
    999 are clamped to 999; location tokens outside the bin range are skipped.
    """
    found: list[tuple[int, list[int]]] = []
    for m in _LOC_BOX_RE.finditer(text):
        bins = [int(g) for g in m.groups()]
        if all(0 <= k < loc_bins for k in bins):
            found.append((m.start(), [bin_to_coord(k, loc_bins) for k in bins]))
    for m in _PLAIN_BOX_RE.finditer(text):
        found.append((m.start(), [min(int(g), BOX_RANGE - 1) for g in m.groups()]))
    return [box for _, box in sorted(found, key=lambda item: item[0])]


def boxes_to_loc(text: str, loc_bins: int) -> str:
    """Every plain "[x1, y1, x2, y2]" (0..999) in `text` -> four `<loc_k>` tokens; a list
    with a number outside 0..999 is not a box and stays as it is."""

    def loc(m: re.Match) -> str:
        box = [int(g) for g in m.groups()]
        return format_box(box, loc_bins) if max(box) < BOX_RANGE else m.group()

    return _PLAIN_BOX_RE.sub(loc, text)


def loc_to_boxes(text: str, loc_bins: int) -> str:
    """Every run of four `<loc_k>` tokens in `text` -> a plain "[x1, y1, x2, y2]" (0..999)."""

    def plain(m: re.Match) -> str:
        found = parse_boxes(m.group(), loc_bins)
        return f"[{', '.join(str(v) for v in found[0])}]" if found else m.group()

    return _LOC_BOX_RE.sub(plain, text)


def loc_to_text(text: str, loc_bins: int) -> str:
    """`text` as users read it: every run of four `<loc_k>` tokens a plain "[x1, y1, x2, y2]"
    (0..999), and a location token that is not part of one (a stray in a caption) left out.
    A vocabulary without location tokens (`loc_bins` 0) wrote any "<loc_k>" as plain text."""
    return _STRAY_LOC_RE.sub("", loc_to_boxes(text, loc_bins)) if loc_bins else text


class LocText:
    """`loc_to_text` over a streamed answer: `feed` each piece and send what it returns, then
    `finish`. A trailing run of location tokens that may still become a box (fewer than four
    so far) and trailing whitespace (a stray token after it would take it along) are held
    back; the pieces add up to `loc_to_text` of the whole answer."""

    def __init__(self, loc_bins: int) -> None:
        self.loc_bins = loc_bins
        self.raw = self.shown = ""

    def feed(self, piece: str) -> str:
        self.raw += piece
        text = self.raw
        run = _TRAILING_LOCS_RE.search(text)
        if run:
            tokens = [m.start() for m in _LOC_RE.finditer(text, run.start())]
            if len(tokens) % 4:  # the last box is still open
                text = text[: tokens[len(tokens) - len(tokens) % 4]]
        return self._advance(loc_to_text(text, self.loc_bins).rstrip())

    def finish(self) -> str:
        return self._advance(loc_to_text(self.raw, self.loc_bins))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.shown):  # cannot happen (see the class doc); never resend
            return ""
        piece, self.shown = text[len(self.shown) :], text
        return piece


# ----------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """A trained byte-level BPE plus the ids of visto's special and location tokens."""

    def __init__(self, raw: tokenizers.Tokenizer):
        self.raw = raw  # what is saved; parses special tokens like any HF client would
        # A twin that reads special-token spellings as plain text, for content (see module doc).
        self._content = tokenizers.Tokenizer.from_str(raw.to_str())
        self._content.encode_special_tokens = True
        ids = [raw.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise UserError(
                "this tokenizer.json was not made by visto (its special tokens are missing or "
                f"out of order: expected {list(SPECIAL_TOKENS)} at ids 0..{len(SPECIAL_TOKENS) - 1}); "
                "train one with visto.data.tokenizer.train_tokenizer"
            )
        self.pad_id, self.bos_id, self.eos_id = ids[0], ids[1], ids[2]
        self.image_id, self.im_start_id, self.im_end_id, self.im_newline_id = ids[3:7]
        self.role_ids = {role: raw.token_to_id(t) for role, t in ROLE_TOKENS.items()}
        self.end_id = raw.token_to_id(END_OF_TURN)
        self.loc_ids: list[int] = []
        while (i := raw.token_to_id(loc_token(len(self.loc_ids)))) is not None:
            self.loc_ids.append(i)
        self.loc_bins = len(self.loc_ids)
        self.focus_id: int | None = raw.token_to_id(FOCUS)  # None: made without one

    @property
    def vocab_size(self) -> int:
        return self.raw.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Content text -> ids (special-token spellings stay text; `<loc_k>` become loc ids)."""
        return self._content.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """ids -> text. `skip_special` drops pad/bos/eos/image/turn tokens but keeps `<loc_k>`."""
        return self.raw.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int:
        i = self.raw.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return i

    def format_box(self, box: Sequence[int]) -> str:
        return format_box(box, self.loc_bins)

    def parse_boxes(self, text: str) -> list[list[int]]:
        return parse_boxes(text, self.loc_bins)

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` (the `tokenizers` format that transformers and vLLM read)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        return atomic_write_text(path, self.raw.to_str(pretty=True))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(
                f"tokenizer file not found: {path}; a checkpoint holds one as tokenizer.json"
            )
        try:
            raw = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise UserError(f"{path} is not a readable tokenizer.json: {e}") from None
        return cls(raw)

    def to_hf_tokenizer(self) -> PreTrainedTokenizerFast:
        """This tokenizer as a transformers `PreTrainedTokenizerFast`, chat template included.

        `eos_token` is the end-of-turn token, because that is where generation stops (the same
        choice as Llama 3 instruct, whose eos is <|eot_id|>). `image_token` is `<image>`.
        """
        from transformers import PreTrainedTokenizerFast

        from visto.data.chat import JINJA_CHAT_TEMPLATE

        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizers.Tokenizer.from_str(self.raw.to_str()),
            bos_token=BOS,
            eos_token=END_OF_TURN,
            pad_token=PAD,
            # Named so that e.g. `hf.image_token_id` and `hf.im_start_token_id` exist.
            extra_special_tokens={
                "image_token": IMAGE,
                "im_start_token": IM_START,
                "im_end_token": IM_END,
                "im_newline_token": IM_NEWLINE,
                "system_token": ROLE_TOKENS["system"],
                "user_token": ROLE_TOKENS["user"],
                "assistant_token": ROLE_TOKENS["assistant"],
                "end_of_text_token": EOS,
            },
            chat_template=JINJA_CHAT_TEMPLATE,
        )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    loc_bins: int = DEFAULT_LOC_BINS,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE on `texts`; `vocab_size` counts every token, special and location.

    Deterministic: the same texts in the same order give the same tokenizer. On a small corpus
    the vocabulary may come out smaller than asked (BPE stops when no pair occurs
    `min_frequency` times); size model embeddings with `Tokenizer.vocab_size`.
    """
    if not 1 <= loc_bins <= BOX_RANGE:
        raise UserError(f"loc_bins must be in 1..{BOX_RANGE}, got {loc_bins}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(alphabet) + len(SPECIAL_TOKENS) + loc_bins
    if vocab_size < smallest:
        raise UserError(
            f"vocab_size {vocab_size} is too small: 256 bytes + {len(SPECIAL_TOKENS)} special "
            f"tokens + {loc_bins} location tokens need at least {smallest}"
        )
    raw = tokenizers.Tokenizer(models.BPE())
    # No normalizer and no prefix space: decode(encode(s)) == s for every string.
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - loc_bins,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    raw.train_from_iterator(_strip_placeholders(texts), trainer)
    raw.add_tokens(
        [AddedToken(loc_token(k), special=False, normalized=False) for k in range(loc_bins)]
    )
    return Tokenizer(raw)


def with_focus_token(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` plus the `<focus>` token (after every other id, so none moves); itself if it
    has one already. Models with `ProcessorConfig.focus_tokens` need it."""
    if tokenizer.focus_id is not None:
        return tokenizer
    raw = tokenizers.Tokenizer.from_str(tokenizer.raw.to_str())
    raw.add_special_tokens([AddedToken(FOCUS, special=True, normalized=False)])
    return Tokenizer(raw)


def _strip_placeholders(texts: Iterable[str]) -> Iterator[str]:
    # Placeholders are special tokens; leaving them in would teach merges around their bytes.
    for text in texts:
        yield text.replace(IMAGE_PLACEHOLDER, "")


def corpus_texts(samples: Iterable[Sample]) -> Iterator[str]:
    """The texts to train a tokenizer on: every turn of every sample, placeholders removed."""
    for sample in samples:
        for turn in sample.turns:
            text = turn.content.replace(IMAGE_PLACEHOLDER, "")
            if text:
                yield text
