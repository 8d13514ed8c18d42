"""Object tokens: one visual token per detected object instead of one per patch.

Bottom-up region features (Anderson et al. 2018) with object tags in the language model's own
word space (OSCAR, Li et al. 2020). A decoder trained from scratch must *bind* a question's
words to the object they name ("which colour does the star have?": find the star, then read
it), and with 64 patch tokens it sits on a long plateau. Measured with bench/binding_probe.py
(ideal features, the quickstart's 4 x 256 decoder): one token per object whose embedding is
the sum of the decoder's word embeddings of its attributes crosses that plateau; patch grids
and learned projections of the same attributes do not in the same steps.

    patch features (B, N, D_v)
      -> dense heads (per patch: shape, colour, size, centre, box; trained on the world's
         masks by `visto.train.dense`, frozen here)
      -> the `slots` most confident centres (CenterNet: a centre is a peak of the centre head)
      -> per object: Linear(its centre patch's feature)
                     + p(colour) @ E[colour words] + p(shape) @ E[shape words]
                     + p(size) @ E[size words]       (E: the decoder's input embeddings of
                       the word as a question names it, " star", and as an answer says it)
                     + Linear(Fourier features of its box)
                     + mean of E[<loc_k>] over its box's four location tokens (Pix2Seq bins:
                       the tokens a grounding answer writes and a box question reads)
      -> slots without an object get a learned `empty` token         (B, slots, D_lm)
      -> with `box_tokens`, each object token is followed by E[<loc_x1>], E[<loc_y1>],
         E[<loc_x2>], E[<loc_y2>] of its box: the tokens a grounding answer writes, so
         "where is the red star?" is a copy, not a decode   (B, slots * 5, D_lm)
      -> with `focus`, each answer's question scores the objects, and the ones it names
         reach the decoder pooled, right before the answer: written into the processor's
         `<focus>` slots (the object, then its box's 4 location tokens), or added to the
         `<|assistant|>` token without slots (connectors.focus: top-down attention, so the
         decoder need not search for the named object itself)
      -> with `text_slots`, the lines of text the OCR reader (connectors.text_reader) finds
         and reads, each as the decoder's embeddings of its tokens (as the OCR answer writes
         them: later lines with their leading space) + a learned "read text" vector,
         `text_tokens` per line, `empty` where there is none (M4C's OCR tokens)
                                                  (B, slots * 5 + text_slots * text_tokens, D_lm)
      -> with `read_slots` (and `focus`), what the reader read goes instead into `<focus>`
         slots after the box's: all lines joined as an OCR answer writes them, one token a
         slot, so an answer that reads copies from a fixed distance back (`read_words`)

The word ids come from the tokenizer once a processor is attached (`set_vocabulary`). The
heads only know the synthetic world's attributes: on other images they find no objects and
every slot is `empty`, so use a patch projector for real photos.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor, nn

from visto.connectors.focus import Objects, QuestionFocus
from visto.connectors.named import ANSWER_RUNS, TEXT_KINDS, VERDICT_RUNS, box_iou, split_by_kind
from visto.connectors.pointer import PointerHead
from visto.connectors.script import detected_json, script_ids
from visto.data.synth.vocab import COLOURS, SHAPE_PLURALS, SHAPES, SIZES

SHAPE_NAMES: tuple[str, ...] = SHAPES
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"  # the world's words are upper case; numbers
BOX_FREQUENCIES = 6  # Fourier features per box coordinate: sin/cos at 2^0..2^5 pi


class DenseHeads(nn.Module):
    """Linear heads on a ViT's patch features: (B, N, D) -> a dict of per-patch logits.

    Index 0 of shape/colour/size/centre_shape is "background" / "no object centre here"."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.shape = nn.Linear(width, 1 + len(SHAPE_NAMES))
        self.colour = nn.Linear(width, 1 + len(COLOUR_NAMES))
        self.size = nn.Linear(width, 1 + len(SIZE_NAMES))
        self.centre = nn.Linear(width, 1)
        self.centre_shape = nn.Linear(width, 1 + len(SHAPE_NAMES))
        self.box = nn.Linear(width, 4)
        self.chars = nn.Linear(width, 2 * (1 + len(CHARS)))

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        x = self.norm(features)  # (B, N, D)
        B, N, _ = x.shape
        return {
            "shape": self.shape(x),  # (B, N, 8)
            "colour": self.colour(x),  # (B, N, 9)
            "size": self.size(x),  # (B, N, 4)
            "centre": self.centre(x).squeeze(-1),  # (B, N)
            "centre_shape": self.centre_shape(x),  # (B, N, 8)
            "box": self.box(x).sigmoid(),  # (B, N, 4) in 0..1
            "chars": self.chars(x).view(B, N, 2, 1 + len(CHARS)),  # (B, N, 2, 37)
        }


def box_fourier(box: Tensor) -> Tensor:
    """(..., 4) in 0..1 -> (..., 4 * 2 * BOX_FREQUENCIES): sin and cos of each coordinate at
    octave frequencies, so a linear map can read both coarse and fine position."""
    freqs = (2.0 ** torch.arange(BOX_FREQUENCIES, device=box.device, dtype=box.dtype)) * math.pi
    angles = box[..., None] * freqs  # (..., 4, F)
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)


def word_forms(tokenizer, word: str) -> list[list[int]]:
    """The ids of `word` as a question names it mid-sentence (" star") and as an answer starts
    with it ("star"): two different tokens in a byte-level BPE."""
    return [tokenizer.encode(" " + word), tokenizer.encode(word)]


class RegionConnector(nn.Module):
    """Patch features (B, N, D_v) -> `slots` object tokens (B, slots, D_lm); see the module doc."""

    def __init__(
        self, input_dim: int, output_dim: int, slots: int, box_tokens: bool = False,
        text_slots: int = 0, text_tokens: int = 6, focus: bool = False, read_slots: int = 0,
        pointer: bool = False, box_nms: float = 0.0, named: bool = False, count_width: float = 1.0,
        object_order: str = "raster", copy_answers: bool = False, copy_json: bool = False,
        copy_verdicts: bool = False, question_pointer: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.slots = slots
        self.box_nms = box_nms
        self.object_order = object_order
        self.box_tokens = box_tokens
        self.text_slots, self.text_tokens = text_slots, text_tokens
        self.read_slots = read_slots
        if text_slots or read_slots:
            from visto.connectors.text_reader import TextReader

            self.reader = TextReader(frozen=True)
        if text_slots:
            self.text_marker = nn.Parameter(torch.zeros(output_dim))
        # What the frozen reader read, by image content and reader weights: the tower and the
        # reader are frozen in both LLaVA stages, so each image is read once, not every epoch.
        self._read_cache: dict[bytes, list[str]] = {}
        self.tokenizer = None  # encodes what the reader read; set by set_vocabulary
        self.heads = DenseHeads(input_dim)
        self.feature = nn.Linear(input_dim, output_dim)
        self.box = nn.Linear(4 * 2 * BOX_FREQUENCIES, output_dim)
        self.empty = nn.Parameter(torch.zeros(output_dim))
        # (attribute kind -> padded ids (n_values, L) and their mask), from the tokenizer
        self.vocabulary: dict[str, tuple[Tensor, Tensor]] = {}
        self.loc_ids: Tensor | None = None  # (loc_bins,) ids of <loc_0> .. <loc_{bins-1}>
        self.focus = QuestionFocus(output_dim, named=named, count_width=count_width, copy_answers=copy_answers,
                                   copy_verdicts=copy_verdicts, question_pointer=question_pointer and pointer,
                                   ) if focus else None  # fmt: skip
        # Answers copy what the focus's `<focus>` slots hold (connectors.pointer): the box's 4
        # location tokens and the read tokens. It reads the decoder's last hidden state, whose
        # width is this connector's output width.
        runs = (4, read_slots) + (ANSWER_RUNS if copy_answers else ())
        runs += VERDICT_RUNS if copy_answers and copy_verdicts else ()  # the yes/no after them
        self.pointer = PointerHead(output_dim, runs, script=copy_json, question=question_pointer) if pointer else None
        # With `copy_json`, the pointer may also copy the JSON answer these detections write
        # (connectors.script), token by token.
        self.copy_json = copy_json and pointer

    def set_vocabulary(self, tokenizer, focus_slots: int = 0) -> None:
        """Read the attribute words' token ids (and tell the focus how many `<focus>` slots the
        processor puts before each answer). A value's tag is the mean embedding of its two
        forms (`word_forms`), a form of several tokens counting as the mean of its pieces."""
        # kind -> each value's forms; counting questions name shapes in the plural (" stars"),
        # a token of its own
        kinds = {
            "shape": [word_forms(tokenizer, n) for n in SHAPE_NAMES],
            "colour": [word_forms(tokenizer, n) for n in COLOUR_NAMES],
            "size": [word_forms(tokenizer, n) for n in SIZE_NAMES],
            "plural": [[tokenizer.encode(" " + SHAPE_PLURALS[n])] for n in SHAPE_NAMES],
        }
        for kind, values in kinds.items():
            rows = [[(i, 1.0 / (len(forms) * len(f))) for f in forms for i in f] for forms in values]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[i for i, _ in r] + [0] * (width - len(r)) for r in rows])
            weights = torch.tensor([[w for _, w in r] + [0.0] * (width - len(r)) for r in rows])
            self.vocabulary[kind] = (ids, weights)
        self.loc_ids = torch.tensor(tokenizer.loc_ids) if tokenizer.loc_ids else None
        self.tokenizer = tokenizer
        if self.focus is not None:
            if focus_slots not in (0, 4 + self.read_slots) or (self.read_slots and not focus_slots):
                raise ValueError(
                    f"the processor puts {focus_slots} <focus> slots before each answer, but this "
                    f"focus writes {4 + self.read_slots} (the box's 4 and {self.read_slots} read "
                    "tokens)" + ("" if self.read_slots else " or none")
                )
            self.focus.set_vocabulary(tokenizer, focus_slots)
        if self.pointer is not None:
            self.pointer.start_id = tokenizer.role_ids["assistant"]

    def word_table(self, embed: nn.Embedding, kind: str) -> Tensor:
        """(n_values, D_lm): each attribute value's tag embedding."""
        ids, weights = self.vocabulary[kind]
        weights = weights.to(embed.weight.device, embed.weight.dtype)
        return (embed(ids.to(embed.weight.device)) * weights[..., None]).sum(1)  # (n, D)

    def box_ids(self, box: Tensor) -> Tensor | None:
        """(B, S, 4) boxes in 0..1 -> (B, S, 4) the ids of their 4 location tokens (None: the
        tokenizer has no location tokens)."""
        if self.loc_ids is None:
            return None
        bins = len(self.loc_ids)
        k = (box * bins).long().clamp(0, bins - 1)  # the bin tokenizer.format_box writes
        return self.loc_ids.to(box.device)[k]

    def box_words(self, box: Tensor, embed: nn.Embedding) -> Tensor:
        """(B, S, 4) boxes in 0..1 -> (B, S, 4, D_lm): the embeddings of their 4 location tokens."""
        ids = self.box_ids(box)
        if ids is None:  # a tokenizer without location tokens: nothing to tie to
            return box.new_zeros(*box.shape, embed.weight.shape[1])
        return embed(ids)

    def select(self, heads: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(patch index (B, slots), present (B, slots)): the most confident centres, in raster
        order (top-left first; with `object_order` "left_to_right", by their boxes' left edge,
        then top edge), real objects before empty slots. With `box_nms`, a centre whose
        box overlaps a more confident centre's box by more than that IoU is the same object
        seen from a neighbouring patch, and is dropped (greedy NMS; most of the detector's
        miscounts were one object found twice: bench/README.md, "Named words")."""
        score = heads["centre"]  # (B, N) logits
        k = min(self.slots, score.shape[1])
        top = score.topk(k, dim=1)
        present = top.values > 0  # sigmoid > 0.5
        if self.box_nms > 0:
            present = present & ~overlapped(heads["box"].gather(1, top.indices[..., None].expand(-1, -1, 4)),
                                            present, self.box_nms)  # fmt: skip
        # Raster order (or left to right) among present ones; absent ones sort last.
        key = top.indices.to(torch.float64)
        if self.object_order == "left_to_right":  # the order the world's JSON lists objects in
            box = heads["box"].gather(1, top.indices[..., None].expand(-1, -1, 4)).to(torch.float64)
            box = box.clamp(0, 0.999)
            key = (box[..., 0] * 1000).floor() + box[..., 1]  # left edge (in 0..999), then top
        key = key + (~present) * (score.shape[1] + 1000.0)
        order = key.argsort(dim=1)
        index, present = top.indices.gather(1, order), present.gather(1, order)
        if k < self.slots:  # fewer patches than slots: pad with absent slots
            pad = self.slots - k
            index = torch.cat([index, index.new_zeros(index.shape[0], pad)], 1)
            present = torch.cat([present, present.new_zeros(present.shape[0], pad)], 1)
        return index, present

    def read_lines(self, pixels: Tensor) -> list[list[str]]:
        """(B, 3, S, S) -> per image, the lines of text the reader read, in reading order. Each
        image is read once while the reader's weights stay the same (`_read_cache`)."""
        weights = repr([(p.data_ptr(), p._version) for p in self.reader.parameters()]).encode()
        keys = [hashlib.blake2b(weights + image.detach().cpu().numpy().tobytes(), digest_size=16).digest()
                for image in pixels]  # fmt: skip
        missing = [b for b, key in enumerate(keys) if key not in self._read_cache]
        if missing:
            if len(self._read_cache) > 50_000:  # a long run over many images: start over
                self._read_cache.clear()
            read = self.reader(pixels[missing])
            for b, lines in zip(missing, read, strict=True):
                self._read_cache[keys[b]] = [text for text, _ in lines]
        return [self._read_cache[key] for key in keys]

    def text_words(self, pixels: Tensor, embed: nn.Embedding) -> Tensor:
        """(B, 3, S, S) -> (B, text_slots * text_tokens, D_lm): what the reader read, as tokens."""
        B, D = pixels.shape[0], embed.weight.shape[1]
        ids = torch.zeros(B, self.text_slots, self.text_tokens, dtype=torch.long)
        filled = torch.zeros(B, self.text_slots, self.text_tokens, dtype=torch.bool)
        for b, lines in enumerate(self.read_lines(pixels)):
            for k, text in enumerate(lines[: self.text_slots]):
                pieces = self.tokenizer.encode((" " if k else "") + text)[: self.text_tokens]
                ids[b, k, : len(pieces)] = torch.tensor(pieces, dtype=torch.long)
                filled[b, k, : len(pieces)] = True
        device = embed.weight.device
        words = embed(ids.to(device)) + self.text_marker.to(embed.weight.dtype)
        words = torch.where(filled.to(device)[..., None], words, self.empty.to(words.dtype))
        return words.view(B, self.text_slots * self.text_tokens, D)

    def read_tokens(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, S, S) -> ((B, 1 + len(TEXT_KINDS), read_slots) the token ids of what the reader
        read, cut at `read_slots`: everything, joined as an OCR answer writes it (lines in
        reading order, one space between), then only its words, only its numbers
        (`named.split_by_kind`: what "What number is written?" copies); (B, 1 + len(TEXT_KINDS),
        read_slots) which slots hold a token)."""
        B = pixels.shape[0]
        ids = torch.zeros(B, 1 + len(TEXT_KINDS), self.read_slots, dtype=torch.long)
        filled = torch.zeros(B, 1 + len(TEXT_KINDS), self.read_slots, dtype=torch.bool)
        for b, lines in enumerate(self.read_lines(pixels)):
            for v, text in enumerate(split_by_kind(lines)):
                pieces = self.tokenizer.encode(text)[: self.read_slots] if text else []
                ids[b, v, : len(pieces)] = torch.tensor(pieces, dtype=torch.long)
                filled[b, v, : len(pieces)] = True
        return ids.to(pixels.device), filled.to(pixels.device)

    def scripts(self, objects: Objects, pixels: Tensor) -> Tensor:
        """(N_img, L) token ids of the JSON answer each image's detections write
        (connectors.script), -1 past its end token."""
        if self.focus is None or objects.attributes is None:
            raise RuntimeError("a RegionConnector writes JSON answers with its focus and detector")
        reads = self.read_slots or self.text_slots
        lines = self.read_lines(pixels) if reads else [[] for _ in range(pixels.shape[0])]
        answers = [detected_json(objects.attributes[b], objects.boxes[b], objects.present[b], lines[b])
                   for b in range(pixels.shape[0])]  # fmt: skip
        return script_ids(self.tokenizer, answers, self.focus.end_id).to(pixels.device)

    def read_words(self, pixels: Tensor, embed: nn.Embedding) -> tuple[Tensor, Tensor, Tensor]:
        """`read_tokens` with their embeddings first: ((B, 1 + len(TEXT_KINDS), read_slots,
        D_lm), filled, ids)."""
        ids, filled = self.read_tokens(pixels)
        device = embed.weight.device
        return embed(ids.to(device)), filled.to(device), ids.to(device)

    def forward(self, features: Tensor, embed: nn.Embedding, pixels: Tensor | None = None) -> Tensor:
        return self.visual_tokens(self.objects(features, embed), embed, pixels)

    def visual_tokens(self, objects: Objects, embed: nn.Embedding, pixels: Tensor | None = None) -> Tensor:
        """Objects -> the visual tokens spliced at the `<image>` ids (N_img, n, D_lm)."""
        present = objects.present
        empty = self.empty.to(objects.tokens.dtype)
        if self.box_tokens:  # object, x1, y1, x2, y2 for each slot in turn
            tokens = torch.cat([objects.tokens[:, :, None], objects.box_words], 2)  # (B, S, 5, D_lm)
            tokens = torch.where(present[..., None, None], tokens, empty).flatten(1, 2)
        else:
            tokens = torch.where(present[..., None], objects.tokens, empty)
        if not self.text_slots:
            return tokens
        if pixels is None:
            raise RuntimeError("a RegionConnector with text_slots reads the image: pass pixels")
        return torch.cat([tokens, self.text_words(pixels, embed)], 1)

    def objects(self, features: Tensor, embed: nn.Embedding) -> Objects:
        """Patch features (B, N, D_v) -> the `slots` most confident objects (connectors.focus.Objects)."""
        if not self.vocabulary:
            raise RuntimeError("RegionConnector needs set_vocabulary(tokenizer) before use")
        with torch.no_grad():  # the heads are a frozen detector: selection needs no gradient
            heads = self.heads(features)
            index, present = self.select(heads)  # (B, S)

        def at(t: Tensor) -> Tensor:  # (B, N, ...) -> (B, S, ...) at the selected patches
            idx = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
            return t.gather(1, idx)

        p_shape = at(heads["centre_shape"])[..., 1:].softmax(-1)  # (B, S, 7): the centred object's shape
        p_colour = at(heads["colour"])[..., 1:].softmax(-1)  # (B, S, 8)
        p_size = at(heads["size"])[..., 1:].softmax(-1)  # (B, S, 3)
        box = at(heads["box"])  # (B, S, 4) in 0..1
        box_words = self.box_words(box, embed)  # (B, S, 4, D_lm)
        box_ids = self.box_ids(box)  # (B, S, 4) or None

        def tags_in(table: nn.Embedding, box_words: Tensor) -> Tensor:  # (B, S, D_lm): the object in words
            return (p_shape @ self.word_table(table, "shape") + p_colour @ self.word_table(table, "colour")
                    + p_size @ self.word_table(table, "size") + box_words.mean(-2))  # fmt: skip

        tags = tags_in(embed, box_words)
        tokens = self.feature(at(features)) + tags + self.box(box_fourier(box))  # (B, S, D_lm)
        attributes = torch.cat([p_shape, p_colour, p_size], -1)  # (B, S, 18): connectors.named's layout
        if self.focus is None:
            return Objects(tokens, tags, box_words, box, present, None, box_ids, attributes)
        # What the focus scores: the same words in its fixed lookup table (focus.lookup_embedding),
        # and for counting the shape's plural too (added to the tags that pick one object, the
        # plural lowered those picks: bench/README.md, "Question focus").
        lookup = self.focus.lookup_embedding(embed)
        score_tags = tags_in(lookup, self.box_words(box, lookup))
        count_tags = score_tags + p_shape @ self.word_table(lookup, "plural")
        return Objects(tokens, score_tags, box_words, box, present, count_tags, box_ids, attributes)


def overlapped(boxes: Tensor, present: Tensor, threshold: float) -> Tensor:
    """Greedy NMS over candidates sorted by confidence: (B, K, 4) boxes, (B, K) which are
    candidates -> (B, K) bool: overlaps a kept, more confident candidate by more than
    `threshold` IoU."""
    iou = box_iou(boxes, boxes)  # (B, K, K)
    dropped = torch.zeros_like(present)
    for i in range(1, boxes.shape[1]):  # K <= slots: a short loop
        kept_before = present[:, :i] & ~dropped[:, :i]
        dropped[:, i] = (kept_before & (iou[:, i, :i] > threshold)).any(1)
    return dropped


__all__ = ["CHARS", "COLOUR_NAMES", "DenseHeads", "RegionConnector", "SHAPE_NAMES", "SIZE_NAMES", "box_fourier", "overlapped"]
