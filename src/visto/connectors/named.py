"""What a question names, and which detected objects it names: filter, count, relate.

The question focus (focus.py) finds the named object by the cosine between the mean of the
question's word embeddings and each object's tags. That picks one named object well (0.85-0.94
of the time) but counts badly: "How many hexagons are there?" needs every hexagon in and every
other object out, and the soft count of the cosine scores rounded to the answer 0.518 of the
time on n0 (bench/focus_pick.py, 60 test images), though counted objects scored above the others
in 0.987 of pairs. A relation names two objects, and the side heads (question words weighted
toward its first and last words) picked the subject 0.48 of the time.

A scene parse executed by the question's words is what solves this (NS-VQA, Yi et al. 2018:
filter, count, exist, relate over a de-rendered scene; neural module networks, Andreas et al.
2016). The region connector's dense heads already give each object a distribution over the
world's shapes, colours and sizes; this module reads which of those words a question names,
by token identity, and scores each object by how well it has them:

    phrases    runs of consecutive attribute words ("the small red circle" -> [small, red,
               circle]); the first phrase names the subject (what a colour, count or existence
               question asks about), the last one the object of a relation
    match_m    = prod over the kinds the phrase names of p_kind(m) . named_kind
               (a phrase without a colour leaves colour free: "How many circles?")
    count      = sum_m present_m * match_m                 ("How many red objects?": 0..9)
    relation   = which of left / right / above / below the question names
    verdict    = with `copy_verdicts` (focus.py), the executed yes/no as one more slot the
                 pointer copies (`verdict_run`): a named relation's `holds` where the question
                 names one, else whether the named subject is there (`exists`: the best present
                 object's match); an empty slot where the question names nothing
    answers    = with `copy_answers` (focus.py), the words an answer about the subject writes,
                 as slots the pointer copies: "large red hexagon" (size, colour, shape), the
                 colour, the shape, the size alone, and the count as a digit; each slot a
                 distribution over those words, the subject's weights times its detected
                 attribute probabilities (`answer_runs`), so an answer about an unseen
                 colour-shape pair copies the detector's words instead of decoding them
    side       = "on the left" / "on the right" right after a phrase (how the world tells two
                 identical objects apart: "the purple star on the left"): of the objects the
                 phrase matches, the leftmost / rightmost; those words are no relation
    box        = a box the question writes ("What is in the box [695, 226, 866, 382]?"): the
                 subject is the object whose detected box overlaps it most (IoU above 0.3)
    text kind  = "word" or "number" ("What number is written in the image?"): the focus's
                 read slots then hold only the lines of that kind (focus.py), so the answer
                 is a copy from the slots' start, as when the image has one text

A question that names no attribute ("How many objects are there?", a box question) matches
every object; the focus then keeps its cosine scores (it falls back where nothing is named).
On images outside the world the heads find no objects, so every count is 0: use a patch
projector for real photos (regions.py says the same).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import Tensor

from visto.data.synth.vocab import COLOURS, SHAPE_PLURALS, SHAPES, SIZES
from visto.data.tokenizer import BOX_RANGE

KINDS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES)}
VALUES = sum(len(v) for v in KINDS.values())  # the width of `Objects.attributes`: 7 + 8 + 3
RELATIONS = ("left", "right", "above", "below")
TEXT_KINDS = ("word", "number")  # what a reading question may ask for (the world's text kinds)
# The pointer's runs of answer slots (`answer_runs`): "size colour shape", colour, shape, size, count
ANSWER_RUNS = (3, 1, 1, 1, 1)
# The pointer's run of the yes/no verdict (`verdict_run`), after the answer runs: one slot
VERDICT_RUNS = (1,)
VERDICTS = ("yes", "no")  # the world's yes/no answers, as an answer's first word writes them
BOX_MATCH_IOU = 0.3  # a question's box names the object it overlaps most, if by more than this
_BOX_RE = re.compile(r"\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]")


class Named(NamedTuple):
    """What each of P questions names: the first phrase's values (P, VALUES), the last
    phrase's (P, VALUES), and the relation words (P, len(RELATIONS)), each 0 or 1; the kind
    of text it asks to read (P, len(TEXT_KINDS)) 0 or 1; the box it writes (P, 4) in 0..1,
    and whether it writes one (P,) bool."""

    first: Tensor
    last: Tensor
    relation: Tensor
    text_kind: Tensor | None = None
    box: Tensor | None = None
    has_box: Tensor | None = None
    first_side: Tensor | None = None  # (P, 2): "on the left" / "on the right" after the first phrase
    last_side: Tensor | None = None  # (P, 2): ... after the last phrase


class AttributeWords:
    """The tokens that name the world's attribute values and relations, from a tokenizer.

    A value is named by its word as a sentence has it mid-way (" star", and the plural
    " stars" for a shape) or at its start ("star"); only forms that are one token are used
    (every world word is one in visto's tokenizer), so a match is a token identity."""

    def __init__(self, tokenizer) -> None:
        ids, values = [], []
        offset = 0
        for kind, names in KINDS.items():
            for v, name in enumerate(names):
                forms = [" " + name, name] + ([" " + SHAPE_PLURALS[name]] if kind == "shape" else [])
                for form in forms:
                    pieces = tokenizer.encode(form)
                    if len(pieces) == 1:
                        ids.append(pieces[0])
                        values.append(offset + v)
            offset += len(names)
        self.ids = torch.tensor(ids, dtype=torch.long)  # (F,)
        self.values = torch.nn.functional.one_hot(torch.tensor(values, dtype=torch.long), VALUES).float()  # (F, VALUES)
        rel_ids, rel_values = [], []
        for r, word in enumerate(RELATIONS):
            for form in (" " + word, word):
                pieces = tokenizer.encode(form)
                if len(pieces) == 1:
                    rel_ids.append(pieces[0])
                    rel_values.append(r)
        self.relation_ids = torch.tensor(rel_ids, dtype=torch.long)
        self.relation_values = torch.nn.functional.one_hot(torch.tensor(rel_values, dtype=torch.long), len(RELATIONS)).float()
        self.text_kind_ids, self.text_kind_values = self._one_token_forms(tokenizer, TEXT_KINDS)
        # The words an answer writes (`answer_runs`): each value as an answer's first word
        # ("red") and as a later one (" red"), and the digits of a count; -1 where not one token
        self.answer_ids = {
            kind: (self._ids_or_missing(tokenizer, names), self._ids_or_missing(tokenizer, [" " + n for n in names]))
            for kind, names in KINDS.items()
        }  # fmt: skip
        self.digit_ids = self._ids_or_missing(tokenizer, [str(d) for d in range(10)])
        self.verdict_ids = self._ids_or_missing(tokenizer, list(VERDICTS))  # "yes", "no"
        # "on the left" / "on the right": a side, not a relation ("to the left of")
        self.on_ids = self._one_token_forms(tokenizer, ("on",))[0]
        self.the_ids = self._one_token_forms(tokenizer, ("the",))[0]
        self.side_ids, self.side_values = self._one_token_forms(tokenizer, ("left", "right"))
        # A box is written as text ("[695, 226, 866, 382]"), its numbers split into tokens as
        # the BPE merged them: questions with a "[" are decoded and parsed.
        self.tokenizer = tokenizer
        self.bracket_ids = torch.tensor(
            [i for form in ("[", " [") for i in tokenizer.encode(form) if tokenizer.decode([i]).strip() == "["]
        )

    @staticmethod
    def _ids_or_missing(tokenizer, forms: list[str]) -> Tensor:
        """Each form's token id, -1 where it is not one token."""
        pieces = [tokenizer.encode(form) for form in forms]
        return torch.tensor([p[0] if len(p) == 1 else -1 for p in pieces], dtype=torch.long)

    @staticmethod
    def _one_token_forms(tokenizer, words: tuple[str, ...]) -> tuple[Tensor, Tensor]:
        """The one-token forms of each word (" word", "word", " words") -> (ids (F,), one-hot
        (F, len(words)) of the word each names)."""
        ids, values = [], []
        for w, word in enumerate(words):
            for form in (" " + word, word, " " + word + "s"):
                pieces = tokenizer.encode(form)
                if len(pieces) == 1:
                    ids.append(pieces[0])
                    values.append(w)
        one_hot = torch.nn.functional.one_hot(torch.tensor(values, dtype=torch.long), len(words)).float()
        return torch.tensor(ids, dtype=torch.long), one_hot

    def named(self, ids: Tensor, real: Tensor) -> Named:
        """Question token ids (P, L) and which are real words (P, L) -> `Named`."""
        dtype = self.values.dtype
        hit = (ids[..., None] == self.ids.to(ids.device)).to(dtype) @ self.values.to(ids.device)  # (P, L, VALUES)
        hit = hit * real[..., None]
        word = hit.sum(-1) > 0  # (P, L): an attribute word
        start = word.clone()
        start[:, 1:] &= ~word[:, :-1]
        phrase = start.long().cumsum(1) * word  # (P, L): 1, 2, ... for each run; 0 elsewhere
        last = phrase.max(1, keepdim=True).values
        first_named = (hit * (phrase == 1)[..., None]).amax(1)  # (P, VALUES)
        last_named = (hit * ((phrase == last) & (last > 0))[..., None]).amax(1)
        side = self.sides(ids, real)  # (P, L, 2)
        is_side = side.sum(-1) > 0
        upto = phrase.cummax(1).values  # (P, L): the last phrase at or before each word
        first_side = (side * ((upto == 1) & is_side)[..., None]).amax(1)  # (P, 2)
        last_side = (side * ((upto == last) & (last > 0) & is_side)[..., None]).amax(1)
        rel = (ids[..., None] == self.relation_ids.to(ids.device)).to(dtype) @ self.relation_values.to(ids.device)
        relation = (rel * (real * ~is_side)[..., None]).amax(1)  # (P, len(RELATIONS))
        kind = (ids[..., None] == self.text_kind_ids.to(ids.device)).to(dtype) @ self.text_kind_values.to(ids.device)
        text_kind = (kind * real[..., None]).amax(1)  # (P, len(TEXT_KINDS))
        box, has_box = self.boxes(ids, real)
        return Named(first_named, last_named, relation, text_kind, box, has_box, first_side, last_side)

    def sides(self, ids: Tensor, real: Tensor) -> Tensor:
        """(P, L) -> (P, L, 2): at the last word of each "on the left" / "on the right", which."""
        dtype = self.side_values.dtype

        def one_of(table: Tensor) -> Tensor:
            return (ids[..., None] == table.to(ids.device)).any(-1) & real.bool()

        side = (ids[..., None] == self.side_ids.to(ids.device)).to(dtype) @ self.side_values.to(ids.device)
        after = torch.zeros_like(real, dtype=torch.bool)
        after[:, 2:] = one_of(self.on_ids)[:, :-2] & one_of(self.the_ids)[:, 1:-1]
        return side * (after & real.bool())[..., None]

    def boxes(self, ids: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
        """The box each question writes, as `tokenizer.format_box` / the world's questions
        write one ("[x1, y1, x2, y2]", 0..BOX_RANGE) -> ((P, 4) in 0..1, (P,) bool: it writes
        one). Only questions holding a "[" token are decoded."""
        box = torch.zeros(ids.shape[0], 4, device=ids.device)
        has = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        bracket = ((ids[..., None] == self.bracket_ids.to(ids.device)).any(-1) & real.bool()).any(1)
        for p in bracket.nonzero().flatten().tolist():
            text = self.tokenizer.decode(ids[p][real[p].bool()].tolist())
            found = _BOX_RE.search(text)
            if found:
                box[p] = torch.tensor([int(v) for v in found.groups()], dtype=box.dtype) / BOX_RANGE
                has[p] = True
        return box, has


def match(named: Tensor, attributes: Tensor) -> Tensor:
    """How well each object has the named values: named (P, VALUES) 0/1 and the objects'
    attribute probabilities (P, M, VALUES) -> (P, M) in 0..1 (1 where nothing is named)."""
    out = attributes.new_ones(attributes.shape[:2])
    at = 0
    for names in KINDS.values():
        part = slice(at, at + len(names))
        asked = named[:, part]  # (P, n)
        has = (attributes[..., part] * asked[:, None, :]).sum(-1).clamp(max=1)  # (P, M)
        out = out * torch.where(asked.sum(-1, keepdim=True) > 0, has, torch.ones_like(has))
        at += len(names)
    return out


def names_any(named: Tensor) -> Tensor:
    """(P, VALUES) -> (P,) bool: the phrase names at least one value."""
    return named.sum(-1) > 0


def relation_holds(relation: Tensor, offset: Tensor, sharpness: float = 20.0) -> Tensor:
    """Whether the named relation holds between the subject and the object: relation words
    (P, 4) and the subject's centre minus the object's (P, 2), image y pointing down ->
    (P,) in 0..1 (0 where no relation is named). `sharpness` turns a distance in image
    widths into a soft sign (0.12 of the width, the world's smallest asked gap: 0.92)."""
    dx, dy = offset.unbind(-1)
    sign = torch.stack([-dx, dx, -dy, dy], -1)  # left, right, above, below hold where > 0
    return (relation * torch.sigmoid(sharpness * sign)).sum(-1).clamp(max=1)


class Executed(NamedTuple):
    """A question run on one image's objects (`execute`): weights over the objects (P, M) of
    its subject and of a relation's object, the count of its subject (P,), and whether the
    named relation holds (P,) in 0..1 (-1 where it names no relation); where the subject's
    weights are the named match rather than the fallback (P,) bool; and whether the named
    subject is there (P,) in 0..1: the best present object's match (0 where none matches;
    1 where the first phrase names nothing, as every object matches it then)."""

    subject: Tensor
    object: Tensor
    count: Tensor
    holds: Tensor
    subject_named: Tensor
    exists: Tensor | None = None


def execute(
    named: Named, attributes: Tensor, boxes: Tensor, present: Tensor,
    subject_fallback: Tensor, object_fallback: Tensor,
) -> Executed:  # fmt: skip
    """Filter, count and relate: what P questions name (`Named`), their objects' attribute
    probabilities (P, M, VALUES), boxes (P, M, 4) and which are present (P, M) -> `Executed`.
    A phrase that names nothing, or that no object has, keeps its fallback weights (P, M)."""
    dtype = attributes.dtype
    presentf = present.to(dtype)
    subject = match(named.first.to(dtype), attributes) * presentf  # (P, M)
    other = match(named.last.to(dtype), attributes) * presentf
    if named.first_side is not None:
        subject = by_side(subject, named.first_side.to(dtype), boxes)
        other = by_side(other, named.last_side.to(dtype), boxes)

    def where_named(phrase: Tensor, found: Tensor, fallback: Tensor) -> tuple[Tensor, Tensor]:
        use = names_any(phrase) & (found.sum(-1) > 0.5)  # named, and some object has it
        return torch.where(use[:, None], found / found.sum(-1, keepdim=True).clamp(min=1e-6), fallback), use

    subject_weight, subject_named = where_named(named.first, subject, subject_fallback)
    object_weight, _ = where_named(named.last, other, object_fallback)
    if named.has_box is not None and named.has_box.any():
        by_box, boxed = box_match(named.box, boxes, present)
        use = named.has_box & boxed
        subject_weight = torch.where(use[:, None], by_box.to(dtype), subject_weight)
        subject_named = subject_named | use

    def centre(w: Tensor) -> Tensor:
        box = torch.einsum("pm,pmj->pj", w, boxes.to(w.dtype))
        return (box[:, :2] + box[:, 2:]) / 2

    holds = relation_holds(named.relation.to(dtype), centre(subject_weight) - centre(object_weight))
    holds = torch.where(named.relation.sum(-1) > 0, holds, torch.full_like(holds, -1.0))
    exists = subject.amax(-1) if subject.shape[-1] else subject.new_zeros(subject.shape[0])
    return Executed(subject_weight, object_weight, subject.sum(-1), holds, subject_named, exists)


def verdict_run(words: AttributeWords, named: Named, executed: Executed) -> tuple[Tensor, Tensor]:
    """The yes/no slot the pointer copies (VERDICT_RUNS), for P questions (`Named`) run on their
    objects (`execute`) -> (ids (P, 1, 2), weights (P, 1, 2)) over VERDICTS ("yes", "no"): where
    a relation is named, yes = `holds`; else, where the first phrase names a value, yes =
    `exists` (is there a red star?); no = 1 - yes; weights 0 where the question names neither
    (nothing to affirm: a box question, "How many objects?"), or where the tokenizer does not
    write "yes" / "no" as one token."""
    P = executed.holds.shape[0]
    device, dtype = executed.holds.device, executed.holds.dtype
    related = named.relation.to(device).sum(-1) > 0
    exists = executed.exists if executed.exists is not None else torch.zeros_like(executed.holds)
    yes = torch.where(related, executed.holds, exists).clamp(0, 1)
    said = (related | names_any(named.first.to(device))).to(dtype)  # (P,): the question names something
    table = words.verdict_ids.to(device)
    weights = torch.stack([yes, 1 - yes], -1) * said[:, None] * (table >= 0).to(dtype)  # (P, 2)
    ids = table.clamp(min=0).expand(P, -1)
    return ids[:, None, :], weights[:, None, :]


def answer_runs(
    words: AttributeWords, weight: Tensor, attributes: Tensor, count_histogram: Tensor
) -> list[tuple[Tensor, Tensor]]:  # fmt: skip
    """The answer slots the pointer copies (ANSWER_RUNS), for P answers whose subject is weighted
    (P, M) over objects with attribute probabilities (P, M, VALUES), and the count's histogram
    over 0..9 (P, 10: the focus's `soft_histogram` of the executed count) -> runs of (ids (P, L,
    W), weights (P, L, W)), each slot's weights summing to 1 (0: an empty slot):
    ["size colour shape"], [colour], [shape], [size], [count digit]."""
    P, M, _ = attributes.shape
    slots: dict[tuple[str, bool], tuple[Tensor, Tensor]] = {}  # (kind, spaced) -> ids, weights (P, M * n)
    at = 0
    for kind, names in KINDS.items():
        p = attributes[..., at : at + len(names)] * weight[..., None]  # (P, M, n)
        at += len(names)
        for spaced, table in zip((False, True), words.answer_ids[kind], strict=True):
            table = table.to(attributes.device)
            ids = table.clamp(min=0).expand(P, M, -1).flatten(1)
            slots[kind, spaced] = (ids, (p * (table >= 0)).flatten(1))
    digits = words.digit_ids.to(attributes.device)
    near = count_histogram * (digits >= 0) / count_histogram.sum(-1, keepdim=True).clamp(min=1e-6)
    count_slot = (digits.clamp(min=0).expand(P, -1), near)

    def run(*parts: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        width = max(ids.shape[1] for ids, _ in parts)
        pad = [(torch.nn.functional.pad(i, (0, width - i.shape[1])), torch.nn.functional.pad(w, (0, width - w.shape[1])))
               for i, w in parts]  # fmt: skip
        return torch.stack([i for i, _ in pad], 1), torch.stack([w for _, w in pad], 1)

    return [
        run(slots["size", False], slots["colour", True], slots["shape", True]),
        run(slots["colour", False]),
        run(slots["shape", False]),
        run(slots["size", False]),
        run(count_slot),
    ]


def by_side(found: Tensor, side: Tensor, boxes: Tensor) -> Tensor:
    """Matches (P, M) narrowed by a side (P, 2: left, right; 0 = none): the leftmost (or
    rightmost) of the objects that match by more than half keeps its match, the rest drop
    to 0. Rows that name no side, or match nothing, stay as they were."""
    x = (boxes[..., 0] + boxes[..., 2]).to(found.dtype) / 2  # (P, M) centres
    matched = found > 0.5
    left = x.masked_fill(~matched, float("inf")).argmin(-1)
    right = x.masked_fill(~matched, float("-inf")).argmax(-1)
    pick = torch.where(side[:, 1] > side[:, 0], right, left)  # (P,)
    keep = torch.nn.functional.one_hot(pick, found.shape[1]).to(found.dtype) * found
    use = (side.sum(-1) > 0) & matched.any(-1)
    return torch.where(use[:, None], keep, found)


def box_match(box: Tensor, boxes: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """The object a written box names: (P, 4) boxes and the objects' (P, M, 4), present (P, M)
    -> (one-hot weights (P, M) on the present object that overlaps it most, (P,) bool: it
    overlaps by more than BOX_MATCH_IOU)."""
    iou = box_iou(box[:, None].to(boxes.dtype), boxes)[:, 0].masked_fill(~present, -1.0)  # (P, M)
    best = iou.max(-1)
    weights = torch.nn.functional.one_hot(best.indices, iou.shape[1]).to(boxes.dtype)
    return weights, best.values > BOX_MATCH_IOU


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """(B, K, 4) and (B, J, 4) boxes (x1, y1, x2, y2) -> (B, K, J) pairwise IoU."""
    lo = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    hi = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter).clamp(min=1e-9)


def split_by_kind(lines: list[str]) -> list[str]:
    """The lines a reader read, in reading order -> what an answer writes for each reading
    question: [everything (lines joined by a space, as an OCR answer), then per TEXT_KINDS
    only the texts of that kind (numbers: all digits; words: the rest)]."""
    texts = [t for line in lines for t in line.split()]
    numbers = [t for t in texts if t.isdigit()]
    words = [t for t in texts if not t.isdigit()]
    return [" ".join(lines), " ".join(words), " ".join(numbers)]


__all__ = [
    "ANSWER_RUNS", "AttributeWords", "BOX_MATCH_IOU", "Executed", "KINDS", "Named", "RELATIONS", "TEXT_KINDS", "VALUES",
    "VERDICTS", "VERDICT_RUNS", "answer_runs", "box_iou", "box_match", "by_side", "execute", "match", "names_any",
    "relation_holds", "split_by_kind", "verdict_run",
]  # fmt: skip
