"""Question focus: top-down attention over object tokens, by the question being answered.

Bottom-up object tokens (`connectors.regions`) leave the decoder a two-hop search: find the
object the question names, then read it. A from-scratch decoder sits on a long plateau before
it learns the first hop (bench/binding_probe.py; bench/README.md, "Quickstart"), and whether
it crosses within the quickstart's budget depends on the seed. Top-down attention (Anderson
et al. 2018, "Bottom-up and top-down attention for image captioning and VQA"; InstructBLIP's
instruction-aware queries, Dai et al. 2023) does the first hop outside the decoder: the
question scores every object, and the objects it names arrive, pooled, right where the answer
starts. The decoder then only reads one vector, which it learns as fast as it learns
one-object images.

    question  = mean of the decoder's input embeddings of the user turn's text tokens
    score_i   = scale * cos(question @ W_q, tag_i @ W_k)      tag_i: the object's attribute words
                                                              and box tokens, in the same
                                                              embedding space (regions.py)
    focus     = (softmax_i score_i) @ object tokens @ W_out
              + Linear(soft histogram of sum_i sigmoid(score_i - scale * threshold))
                                                              (how many objects match: counting)
              + Linear(soft histogram of max_i cos_i)         (how well the best one matches:
                                                              "is there a red circle?" when
                                                              only a red square is there)
              + sum over the side heads h of (softmax_i score_h,i) @ object tokens @ W_h
                                                              (the same scores for a question
                                                              pooled toward its first / last
                                                              words: the two objects of "is the
                                                              star left of the circle?")
              + Linear(where the first side head's object lies from the last one's: the
                       centres' offset dx, dy and tanh(8 dx), tanh(8 dy))
                                                              (left of / above, as a sign the
                                                              decoder reads, not a comparison
                                                              of two positions it must learn)
              + Linear(soft histogram of the number of objects) ("how many objects?")
    added to the input embedding of the `<|assistant|>` token that opens each answer; with 4
    `<focus>` slots before it (ProcessorConfig.focus_tokens), the slots hold the embeddings of
    the named object's 4 box location tokens, x1 y1 x2 y2 (weighted as the objects are): what
    a grounding answer writes, so that answer is a copy from a fixed distance back (Pix2Seq
    tokens in the input, as OFA and Kosmos-2). Slots after those 4 (the connector's
    `read_slots`) hold the tokens of what the OCR reader read, so an answer that reads copies
    them from a fixed distance back too (M4C's OCR tokens).

With `named` (ProjectorConfig.named; the quickstart's default), the question is also run on
the objects by the attribute words it names (connectors.named: filter, count, relate, as NS-VQA
executes a question on a scene parse): where a question names something, the subject's and
the relation object's matches replace the cosine weights and the side heads' weights, the count
of matching objects replaces the soft cosine count in the count histogram (the cosine count
rounded to the answer 0.43-0.52 of the time, the named count 0.95), and whether the named
relation holds between the two enters through its own map (`relate`: yes, no).

W_q and W_k are the identity, so a question word and the same word in an object's tag match
(the tags are the decoder's own word embeddings), and the scores take no gradient: the first
hop is a fixed lookup by word identity, and only what it hands on is learned. Trained, the
scores drifted off the named object in stage 1 twice (bench/README.md, "Question focus"):
with the object in a slot of its own and the box path training them (picks 0.90 -> 0.45), and
with grounding and OCR answers in stage 1 (colour picks 0.92 -> 0.62-0.79, shape 0.94 -> 0.46-0.50,
three seeds), while untrained they pick the named object 0.92-0.94 of the time. W_out and the
other maps start at zero, so a fresh focus changes nothing until training finds it useful.
Every answer gets the focus of its own user turn, so shared-prefix packing (independent
turns), multi-turn chat and generation (the prompt ends with `<|assistant|>`) all see the same
thing; the answer after a tool's result (a user turn `<tool_response>...`) gets the question
before the call, not the result (`answer_questions`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visto.connectors.named import (
    ANSWER_RUNS,
    VERDICT_RUNS,
    AttributeWords,
    Executed,
    Named,
    answer_runs,
    execute,
    verdict_run,
)
from visto.connectors.pointer import CopySlots, copy_runs
from visto.data.tool_calls import TOOL_RESPONSE_START

COUNT_BINS = 10  # the world has at most 9 objects
MATCH_BINS = 11  # the best object's cosine with the question, at 0, 0.1, ..., 1
SIDE_RAMPS = (-4.0, 4.0)
RELATION_FEATURES = 4  # the offset between the side heads' objects: dx, dy, tanh(8 dx), tanh(8 dy)  # side heads: question words weighted by exp(ramp * place in question)


class Objects(NamedTuple):
    """Object tokens of a batch of images (`RegionConnector.objects`)."""

    tokens: Tensor  # (N_img, S, D_lm) what the decoder sees of each object
    tags: Tensor  # (N_img, S, D_lm) its attribute words and box tokens, as the focus scores them
    box_words: Tensor  # (N_img, S, 4, D_lm) the embeddings of its box's 4 location tokens
    boxes: Tensor  # (N_img, S, 4) its box (x1, y1, x2, y2) in 0..1, as the detector predicts it
    present: Tensor  # (N_img, S) bool: a detected object (else an empty slot)
    # (N_img, S, D_lm) the tags counting scores (plus the shape's plural); None: `tags`
    count_tags: Tensor | None = None
    # (N_img, S, 4) the ids of its box's 4 location tokens (what the pointer copies); None: none
    box_ids: Tensor | None = None
    # (N_img, S, connectors.named.VALUES) its predicted shape, colour and size probabilities
    attributes: Tensor | None = None


def answer_questions(
    input_ids: Tensor, user_id: int, assistant_id: int, focus_id: int, first_text_id: int,
    segment_ids: Tensor | None = None, tool_result_ids: Sequence[int] = (), end_id: int | None = None,
    newline_ids: Sequence[int] = (), question_ids: Sequence[int] = (),
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Every `<|assistant|>` token's question: (rows (P,), columns (P,), the positions of its
    text tokens (P, L), and which of those L are real (P, L)). A question is the text (ids from
    `first_text_id` on, `<focus>` excepted) since the last `<|user|>` token before the answer,
    or since its exchange began when exchanges are packed (`segment_ids`: later exchanges share
    the first one's `<|user|>` token, in the prefix, but must not read its question).

    With `tool_result_ids` (the ids a tool result's user turn starts with: `<tool_response`,
    `tool_result_prefix`) and `end_id`, a user turn that holds a tool's result is not a
    question: the answer after a result has the question of the user turn before its call,
    and a question ends at its turn's end (so it leaves out the call and the result). Without
    them, or in a conversation without tool results, the questions are as before.

    With `newline_ids` (the ids whose text holds a line break), a question is its turn's last
    line: text in front of it on lines of its own (format instructions, a task description)
    is not read as the question. A line break counts only after a word of the turn (not the
    one after `<image>`) and only when a word follows it before the answer, so a question on
    one line is as before.

    With `question_ids` too (the ids whose text holds a "?"), a turn that asks with a question
    mark has as its question the line of its last "?", up to that "?": instructions after the
    question, on its line ("... circle? Answer in one word.") or on lines of their own (format
    instructions), are not read either. A turn without a "?" ("Describe the image.") keeps its
    last line; a world question, which ends at its "?", is as before."""
    B, T = input_ids.shape
    is_text = (input_ids >= first_text_id) & (input_ids != focus_id)  # (B, T)
    position = torch.arange(T, device=input_ids.device).expand(B, T)
    asks = input_ids == user_id
    if len(tool_result_ids) and end_id is not None:
        asks = asks & ~starts_with(input_ids, position, tool_result_ids)
    # `begin`: the first position a token's question may include
    begin = torch.where(asks, position + 1, 0).cummax(1).values
    if segment_ids is not None:
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        begin = torch.maximum(begin, torch.where(starts, position, 0).cummax(1).values)
    rows, cols = (input_ids == assistant_id).nonzero(as_tuple=True)
    first = begin[rows, cols]  # (P,)
    stop = cols
    if len(tool_result_ids) and end_id is not None:
        # the question's turn ends at the first `<|end|>` from its first position on
        ends = torch.where(input_ids == end_id, position, T).flip(1).cummin(1).values.flip(1)
        stop = torch.minimum(cols, ends[rows, first.clamp(max=T - 1)])
    if len(question_ids):
        stop = up_to_last_mark(input_ids, is_text, position, rows, first, stop, question_ids)
    if len(newline_ids):
        first = last_line(input_ids, is_text, position, begin, rows, first, stop, newline_ids)
    width = int((stop - first).clamp(min=0).max()) if rows.numel() else 0
    at = first[:, None] + torch.arange(width, device=input_ids.device)  # (P, L)
    inside = at < stop[:, None]
    at = at.clamp(max=T - 1)
    return rows, cols, at, inside & is_text[rows[:, None], at]


def last_line(
    input_ids: Tensor, is_text: Tensor, position: Tensor, begin: Tensor, rows: Tensor,
    first: Tensor, stop: Tensor, newline_ids: Sequence[int],
) -> Tensor:  # fmt: skip
    """(P,) where each question's last line begins (`answer_questions`' `newline_ids`): after
    the last line break in [first, stop) that follows a word of the turn, if a word comes
    after it before `stop`; else `first`."""
    newline = torch.isin(input_ids, torch.tensor(list(newline_ids), device=input_ids.device))
    words = (is_text & ~newline).long().cumsum(1)  # (B, T) words up to and including t
    before = torch.cat([words.new_zeros(words.shape[0], 1), words[:, :-1]], 1)  # words before t
    since = words - before.gather(1, begin.clamp(max=words.shape[1] - 1))  # words of t's turn up to t
    breaks = newline & (since > 0)
    after = torch.where(breaks, position + 1, 0).cummax(1).values  # (B, T)
    line = torch.maximum(first, after[rows, (stop - 1).clamp(min=0)])
    total = words[rows, (stop - 1).clamp(min=0)]
    worded = total - before[rows, line.clamp(max=words.shape[1] - 1)] > 0
    return torch.where(worded & (line < stop), line, first)


def up_to_last_mark(
    input_ids: Tensor, is_text: Tensor, position: Tensor, rows: Tensor, first: Tensor,
    stop: Tensor, mark_ids: Sequence[int],
) -> Tensor:  # fmt: skip
    """(P,) each question's end (`answer_questions`' `question_ids`): just after the last text
    token in [first, stop) whose text holds a mark ("?"); `stop` where there is none."""
    marks = torch.isin(input_ids, torch.tensor(list(mark_ids), device=input_ids.device)) & is_text
    last = torch.where(marks, position, -1).cummax(1).values  # (B, T) the last mark at or before t
    at = last[rows, (stop - 1).clamp(min=0)]
    return torch.where((at >= first) & (stop > first), at + 1, stop)


def starts_with(input_ids: Tensor, position: Tensor, prefix: Sequence[int]) -> Tensor:
    """(B, T) bool: the tokens right after position t are `prefix` (a tool result's user turn
    from its `<|user|>` token on, `answer_questions`)."""
    B, T = input_ids.shape
    if not 0 < len(prefix) < T:  # a prefix longer than the row fits nowhere
        return torch.zeros_like(input_ids, dtype=torch.bool)
    hit = position < T - len(prefix)
    for k, token in enumerate(prefix, start=1):
        ahead = torch.full_like(input_ids, -1)
        ahead[:, : T - k] = input_ids[:, k:]
        hit = hit & (ahead == token)
    return hit


def tool_result_prefix(tokenizer) -> tuple[int, ...]:
    """The ids every tool result's user turn starts with (`data.tool_calls.TOOL_RESPONSE_START`
    encoded alone may merge its `>` with what follows: the ids all continuations share)."""
    encoded = [tokenizer.encode(TOOL_RESPONSE_START + rest) for rest in ('{"text":"A"}', "x", "\n", " 1", "[")]
    shared = encoded[0]
    for ids in encoded[1:]:
        n = 0
        while n < min(len(shared), len(ids)) and shared[n] == ids[n]:
            n += 1
        shared = shared[:n]
    return tuple(shared)


class QuestionFocus(nn.Module):
    """Per answer, the objects its question names, pooled into one added input vector."""

    def __init__(
        self, width: int, named: bool = False, count_width: float = 1.0, copy_answers: bool = False,
        copy_verdicts: bool = False, question_pointer: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        # With `named`, the words a question names pick, count and relate the objects by
        # their predicted attributes (connectors.named); the cosine scores stay where a
        # question names none.
        self.named = named
        # The count histograms' bump width (`soft_histogram`): at 1.0 a count of 2 lights bins
        # 1 and 3 at 0.37 of bin 2 and a soft count of 1.6 lights 1 and 2 alike, and the
        # decoder answered "1" for 2 objects in 33 of 86 questions where the count itself was
        # right (w0, test split); narrower, each count is its own bin.
        self.count_width = count_width
        # With `copy_answers` (and `named`), the copies after the box and the read text also
        # hold the words an answer about the subject writes and its count (named.answer_runs),
        # for the pointer to copy: colour, shape and size words come from the detector's
        # attributes, not from a decoding of the object token that must be learned per pair.
        self.copy_answers = copy_answers
        # With `copy_verdicts` (and `copy_answers`), one more run after the answer runs holds
        # the executed yes/no (named.verdict_run: a named relation's `holds`, else whether the
        # named subject is there): existence and relation answers are a copy too, instead of
        # a reading of the `relate` and `match` signals the decoder must learn.
        self.copy_verdicts = copy_verdicts and copy_answers
        # With `question_pointer`, each answer's copies also carry its question, pooled (the
        # mean of its words in the fixed lookup table, at unit RMS: `CopySlots.question`), for
        # the pointer's question term (connectors.pointer: which run an answer copies from
        # the question's words, not only from the decoder's hidden state).
        self.question_pointer = question_pointer
        self.words: AttributeWords | None = None  # set_vocabulary
        # The scores' settings are fixed (buffers: the scores take no gradient, see the module
        # doc); checkpoints keep them under the same names as when they were parameters.
        self.register_buffer("query", torch.eye(width))
        self.register_buffer("key", torch.eye(width))
        self.register_buffer("log_scale", torch.tensor(math.log(20.0)))
        self.register_buffer("threshold", torch.tensor(0.1))  # cosine above which an object "matches"
        self.out = nn.Parameter(torch.zeros(width, width))
        self.count = nn.Parameter(torch.zeros(COUNT_BINS, width))
        self.match = nn.Parameter(torch.zeros(MATCH_BINS, width))
        # Side heads: a word weighting (zero: none) and a ramp over the question's words
        # (SIDE_RAMPS: first words / last words), fixed as the scores are, each with its own
        # learned value map.
        self.register_buffer("side_words", torch.zeros(len(SIDE_RAMPS), width))
        self.register_buffer("side_ramp", torch.tensor(SIDE_RAMPS))
        self.side_out = nn.Parameter(torch.zeros(len(SIDE_RAMPS), width, width))
        self.relation = nn.Parameter(torch.zeros(RELATION_FEATURES, width))
        self.objects = nn.Parameter(torch.zeros(COUNT_BINS, width))
        # Whether the relation a question names holds between its two named objects (yes, no)
        self.relate = nn.Parameter(torch.zeros(2, width))
        # The word embeddings the scores read (`lookup_embedding`): the decoder's own, as they
        # were when the focus first ran, then fixed (saved with the model).
        self.register_buffer("lookup", torch.zeros(0, width))
        # token ids, from the tokenizer (set_vocabulary)
        self.user_id = self.assistant_id = self.focus_id = self.end_id = -1
        self.first_text_id = 0  # ids below this are special tokens (roles, image, padding)
        # the ids a tool result's user turn starts with: such a turn is not a question (spans)
        self.tool_result_ids: tuple[int, ...] = ()
        self.newline_ids: tuple[int, ...] = ()  # ids whose text holds a line break (spans)
        self.question_ids: tuple[int, ...] = ()  # ids whose text holds a "?" (spans)
        self.slots = 0  # <focus> slots before each answer (the processor's focus_tokens)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints saved before the relation and object-count maps: those maps start at
        # zero, so a missing one is exactly a fresh one.
        for name in ("relation", "objects", "relate"):
            state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        # The lookup table is as large as the vocabulary it was taken from (empty: not yet
        # taken; missing in older checkpoints: taken on first use).
        saved = state_dict.setdefault(prefix + "lookup", self.lookup)
        self.lookup = self.lookup.new_zeros(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def lookup_embedding(self, embed: nn.Embedding) -> nn.Embedding:
        """The embedding table the scores read: the decoder's `embed` as it was on the focus's
        first use, frozen. Scored through the live table, the picks drifted as the decoder's
        embeddings trained (bench/README.md, "Question focus": colour picks 0.92 -> 0.54-0.69 in
        400 stage-1 steps with grounding and OCR answers), while a word-identity lookup in the
        initial table picks the named object 0.92-0.94 of the time. Rows added to the
        vocabulary since (a new special token) are taken from `embed` when first seen."""
        live = embed.weight.detach()
        if self.lookup.shape[0] < live.shape[0]:
            self.lookup = torch.cat([self.lookup.to(live), live[self.lookup.shape[0] :].clone()])
        return nn.Embedding.from_pretrained(self.lookup.to(live), freeze=True)

    def set_vocabulary(self, tokenizer, slots: int = 0) -> None:
        """Token ids from the tokenizer, and the `<focus>` slots the processor puts before
        each answer (0: the focus is added to the `<|assistant|>` token itself; 4: the named
        object's box; more: the box, then what the reader read)."""
        if slots and slots < 4:
            raise ValueError(f"a question focus writes 0 <focus> slots, or 4 (a box) and more, not {slots}")
        self.slots = slots
        self.focus_id = tokenizer.focus_id if tokenizer.focus_id is not None else -1
        self.end_id = tokenizer.end_id  # what ends an answer (the copies' end slots hold it)
        self.user_id = tokenizer.role_ids["user"]
        self.assistant_id = tokenizer.role_ids["assistant"]
        special = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.image_id,
                   tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.im_newline_id,
                   tokenizer.end_id, *tokenizer.role_ids.values()]  # fmt: skip
        self.first_text_id = max(special) + 1
        self.tool_result_ids = tool_result_prefix(tokenizer)
        texts = {i: tokenizer.decode([i]) for i in range(self.first_text_id, tokenizer.vocab_size)}
        self.newline_ids = tuple(i for i, text in texts.items() if "\n" in text)
        self.question_ids = tuple(i for i, text in texts.items() if "?" in text)
        if self.named:
            self.words = AttributeWords(tokenizer)

    def spans(
        self, input_ids: Tensor, segment_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every `<|assistant|>` token's question: (rows (P,), columns (P,), the positions of
        its text tokens (P, L), and which of those L are real (P, L)). A question is the text
        since the last `<|user|>` token before the answer, or since its exchange began when
        exchanges are packed (`segment_ids`: later exchanges share the first one's `<|user|>`
        token, in the prefix, but must not read its question). The answer after a tool's
        result has the question of the user turn before the call (`answer_questions`'
        `tool_result_ids`): the result turn is the tool's, not a question. A question is its
        turn's last line (`newline_ids`), or where it asks with a "?", the line of its last "?"
        up to it (`question_ids`): instructions in front of it or after it are not read."""
        return answer_questions(input_ids, self.user_id, self.assistant_id, self.focus_id,
                                self.first_text_id, segment_ids, self.tool_result_ids,
                                self.end_id, self.newline_ids, self.question_ids)  # fmt: skip

    def questions(
        self, input_ids: Tensor, embed: nn.Embedding, segment_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(rows (P,), columns (P,), question vectors (P, D)): for every `<|assistant|>` token,
        the mean embedding of its question's text tokens (`spans`)."""
        rows, cols, question, _ = self.head_questions(input_ids, embed, segment_ids)
        return rows, cols, question

    def head_questions(
        self, input_ids: Tensor, embed: nn.Embedding, segment_ids: Tensor | None = None,
        spans: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """`questions`, plus each side head's question (H, P, D): the same words weighted by
        softmax(side_words . word + side_ramp * place), place running 0..1 over the question.
        `spans`: `self.spans(input_ids, segment_ids)`, when the caller has it."""
        rows, cols, at, real = spans if spans is not None else self.spans(input_ids, segment_ids)
        words = self.lookup_embedding(embed)(input_ids[rows[:, None], at])  # (P, L, D)
        realf = real.to(words.dtype)
        mean = (words * realf[..., None]).sum(1) / realf.sum(1).clamp(min=1)[:, None]
        rank = (realf.cumsum(1) - 1) * realf  # place of each real word: 0, 1, ...
        place = rank / (realf.sum(1, keepdim=True) - 1).clamp(min=1)  # (P, L) in 0..1
        logits = torch.einsum("hd,pld->hpl", self.side_words, words) + self.side_ramp[:, None, None] * place
        weights = logits.masked_fill(~real, -1e4).softmax(-1) * realf  # (H, P, L)
        side = torch.einsum("hpl,pld->hpd", weights, words)
        return rows, cols, mean, side

    def scores(self, question: Tensor, tags: Tensor) -> Tensor:
        """(P, D) questions and (P, M, D) object tags -> (P, M) scaled cosine scores."""
        q = F.normalize(question @ self.query, dim=-1)
        k = F.normalize(tags @ self.key, dim=-1)
        return self.log_scale.exp() * torch.einsum("pd,pmd->pm", q, k)

    def attention(self, question: Tensor, tags: Tensor, present: Tensor) -> Tensor:
        """(P, M) how each question's focus is spread over the objects (0 on empty slots)."""
        return spread(self.scores(question, tags), present)

    def forward(
        self,
        input_ids: Tensor,
        embed: nn.Embedding,
        objects: Objects,
        image_sample_index: Tensor,
        segment_ids: Tensor | None = None,
        read: tuple[Tensor, ...] | None = None,
    ) -> Tensor:
        """(B, T, D_lm) to add to the input embeddings: zero except at `<|assistant|>` tokens
        (or the `<focus>` slots before them) of rows with an image. `read`: per image, the
        embeddings of the read tokens (N_img, slots - 4, D_lm) and which are real (N_img,
        slots - 4), for the slots after the box (a row with several images reads its first)."""
        return self.with_copies(input_ids, embed, objects, image_sample_index, segment_ids, read)[0]

    def with_copies(
        self,
        input_ids: Tensor,
        embed: nn.Embedding,
        objects: Objects,
        image_sample_index: Tensor,
        segment_ids: Tensor | None = None,
        read: tuple[Tensor, ...] | None = None,
    ) -> tuple[Tensor, CopySlots | None]:
        """`forward`, and what each answer's `<focus>` slots hold as token ids (`CopySlots`,
        one row per `<|assistant|>` token in row-major order; None without slots): the box
        slots each object's location token weighted as the objects are (`objects.box_ids`),
        the read slots the read token (`read`'s third tensor: the ids per variant (N_img, V,
        slots - 4), of which `read_for_questions` picks one per question)."""
        B, T = input_ids.shape
        out = objects.tokens.new_zeros(B, T, objects.tokens.shape[-1])
        spans = self.spans(input_ids, segment_ids)
        rows, cols, question, side = self.head_questions(input_ids, embed, segment_ids, spans)
        if rows.numel() == 0:
            return out, self._copies(0, None, None, None, None, out.device, self._no_answers(0, out.device), question)
        rowed = per_row(objects, image_sample_index, B)  # (B, M, ...)
        tokens, tags, present = rowed.tokens[rows], rowed.tags[rows], rowed.present[rows]  # (P, M, ...)
        count_tags = tags if rowed.count_tags is None else rowed.count_tags[rows]
        # The scores take no gradient (see the module doc: trained, they drifted off the named
        # object); what the focus hands on is learned.
        with torch.no_grad():
            score = self.scores(question, tags)  # (P, M)
            weight = spread(score, present)
            scale = self.log_scale.exp()
            matches = (torch.sigmoid(self.scores(question, count_tags) - scale * self.threshold) * present).sum(-1)
            best = (score / scale).masked_fill(~present, 0).max(-1).values  # (P,) cosine
            side_weights = [self.attention(side[h], tags, present) for h in range(len(SIDE_RAMPS))]
            holds = named = executed = None
            if self.words is not None:
                named = self.words.named(input_ids[rows[:, None], spans[2]], spans[3].to(torch.float32))
            if named is not None and rowed.attributes is not None:
                weight, side_weights, matches, holds, executed = self._by_named_words(
                    named, rowed.attributes[rows], rowed.boxes[rows], present, weight, side_weights
                )
        value = torch.einsum("pm,pmd->pd", weight, tokens)  # (P, D)
        count_histogram = soft_histogram(matches, COUNT_BINS, self.count_width)  # (P, COUNT_BINS)
        focus = (
            value @ self.out
            + count_histogram @ self.count
            + soft_histogram(best * (MATCH_BINS - 1), MATCH_BINS, 1.0) @ self.match
        )  # (P, D)
        centres = []
        for h, side_weight in enumerate(side_weights):
            focus = focus + torch.einsum("pm,pmd->pd", side_weight, tokens) @ self.side_out[h]
            side_box = torch.einsum("pm,pmj->pj", side_weight, rowed.boxes[rows])  # (P, 4)
            centres.append((side_box[:, :2] + side_box[:, 2:]) / 2)
        offset = centres[0] - centres[-1]  # (P, 2): the first-named object from the last-named
        focus = focus + torch.cat([offset, torch.tanh(8 * offset)], -1) @ self.relation
        if holds is not None:
            focus = focus + torch.stack([holds, 1 - holds], -1) * (holds >= 0)[:, None] @ self.relate
        focus = focus + soft_histogram(present.sum(-1).to(score.dtype), COUNT_BINS, self.count_width) @ self.objects
        answers = self._no_answers(len(rows), out.device)
        if answers and named is not None and rowed.attributes is not None:
            answers = answer_runs(self.words, weight, rowed.attributes[rows], count_histogram)
            if self.copy_verdicts:
                answers.append(verdict_run(self.words, named, executed))
        out = out.index_put((rows, cols), focus.to(out.dtype))
        if not self.slots:
            return out, None
        first = cols - self.slots  # the first of each answer's <focus> slots
        span = first[:, None] + torch.arange(self.slots, device=cols.device)  # (P, slots)
        if (first < 0).any() or not (input_ids[rows[:, None], span.clamp(min=0)] == self.focus_id).all():
            raise ValueError(f"every <|assistant|> token must follow {self.slots} <focus> ids "
                             "(the processor's focus_tokens)")  # fmt: skip
        # The named object's box, as the location tokens x1 y1 x2 y2.
        box = torch.einsum("pm,pmjd->pjd", weight, rowed.box_words[rows])  # (P, 4, D)
        box_span = span[:, :4]
        out = out.index_put((rows[:, None].expand_as(box_span), box_span), box.to(out.dtype))
        box_ids = None if rowed.box_ids is None else rowed.box_ids[rows]  # (P, M, 4)
        if self.slots == 4:
            return out, self._copies(len(rows), weight, box_ids, None, None, out.device, answers, question)
        if read is None:
            raise ValueError(f"a focus with {self.slots} slots fills {self.slots - 4} with read text: pass `read`")
        per_row_read = read_per_row(*read, image_sample_index=image_sample_index, rows=B)  # (B, V, R, ...)
        words, filled, *read_ids = read_for_questions([t[rows] for t in per_row_read], named)  # (P, R, ...)
        read_span = span[:, 4:]
        # Added to the `<focus>` token's embedding, as the box is; a slot with nothing read
        # keeps that alone: "no more text".
        out = out.index_put(
            (rows[:, None].expand_as(read_span), read_span),
            (words * filled[..., None]).to(out.dtype),
        )
        ids = read_ids[0] if read_ids else None
        return out, self._copies(len(rows), weight, box_ids, ids, filled, out.device, answers, question)

    def _by_named_words(
        self, named: Named, attributes: Tensor, boxes: Tensor, present: Tensor,
        weight: Tensor, side_weights: list[Tensor],
    ) -> tuple[Tensor, list[Tensor], Tensor, Tensor, Executed]:  # fmt: skip
        """The focus by the words (and box) each question names (connectors.named.execute):
        (the object weights, the side weights [subject, object], the count (P,), whether the
        named relation holds (P,), -1 where none is named, and the executed question itself);
        the cosine weights stay where a question names nothing."""
        sides = execute(named, attributes, boxes, present, side_weights[0], side_weights[-1])
        weight = torch.where(sides.subject_named[:, None], sides.subject, weight)
        return weight, [sides.subject, sides.object], sides.count, sides.holds, sides

    def _no_answers(self, answers: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """Empty answer runs (`copy_answers` without named words or detections; none without
        `copy_answers`), and the empty verdict run after them with `copy_verdicts`."""
        if not self.copy_answers:
            return []
        runs = ANSWER_RUNS + (VERDICT_RUNS if self.copy_verdicts else ())
        return [(torch.zeros(answers, n, 1, dtype=torch.long, device=device), torch.zeros(answers, n, 1, device=device))
                for n in runs]  # fmt: skip

    def _copies(
        self, answers: int, weight: Tensor | None, box_ids: Tensor | None,
        read_ids: Tensor | None, filled: Tensor | None, device: torch.device,
        answer_slots: list[tuple[Tensor, Tensor]] = (), question: Tensor | None = None,
    ) -> CopySlots | None:  # fmt: skip
        """The answers' slots as the pointer copies them (`with_copies`; connectors.pointer):
        the box's 4, the read ones, then the answer runs (`copy_answers`) and the verdict
        (`copy_verdicts`), each run followed by its end slot; with `question_pointer`, each
        answer's pooled `question` (P, D) at unit RMS."""
        if not self.slots:
            return None
        M = weight.shape[1] if weight is not None else 1
        box = (torch.zeros(answers, 4, M, dtype=torch.long, device=device), torch.zeros(answers, 4, M, device=device))
        if box_ids is not None:  # box slot j: object m's j-th location token, weighted as m is
            box = (box_ids.transpose(1, 2), weight[:, None, :].expand(-1, 4, -1))
        R = self.slots - 4
        read = (torch.zeros(answers, R, 1, dtype=torch.long, device=device), torch.zeros(answers, R, 1, device=device))
        if read_ids is not None:  # read slot r: the r-th read token, if there is one
            read = (read_ids[..., None], filled[..., None].to(read[1].dtype))
        slots = copy_runs([box, read, *answer_slots], self.end_id)
        if self.question_pointer and question is not None:
            slots.question = F.normalize(question.detach(), dim=-1) * math.sqrt(question.shape[-1])
        return slots


def soft_histogram(x: Tensor, bins: int, width: float) -> Tensor:
    """(P,) values -> (P, bins): a Gaussian bump per bin 0, 1, ..., bins - 1 (how near x is)."""
    centres = torch.arange(bins, device=x.device, dtype=x.dtype)
    return torch.exp(-(((x[:, None] - centres) / width) ** 2))


def spread(score: Tensor, present: Tensor) -> Tensor:
    """(P, M) scores -> softmax weights over the present objects (0 on empty slots)."""
    return score.masked_fill(~present, -1e4).softmax(-1) * present


def read_for_questions(read: list[Tensor], named: Named | None) -> list[Tensor]:
    """Per answer, the read tokens' variants (P, 1 + len(TEXT_KINDS), R, ...: everything read,
    then only its words, only its numbers; `RegionConnector.read_tokens`) -> the one its
    question asks for (P, R, ...): the kind it names ("What number is written?"), where it
    names one kind and the reader read text of that kind; everything otherwise."""
    filled = read[1]  # (P, V, R)
    rows = torch.arange(filled.shape[0], device=filled.device)
    choice = torch.zeros_like(rows)
    if named is not None and named.text_kind is not None:
        kind = named.text_kind.to(filled.device)
        asked = 1 + kind.argmax(-1)  # (P,) the variant of the named kind
        choice = torch.where((kind.sum(-1) == 1) & filled[rows, asked].any(-1), asked, choice)
    return [t[rows, choice] for t in read]


def read_per_row(*per_image: Tensor, image_sample_index: Tensor, rows: int) -> tuple[Tensor, ...]:
    """Per image (N_img, R, ...) tensors (the read tokens' embeddings, masks, ids) -> per batch
    row (B, R, ...): each row's first image (rows without an image read nothing)."""
    outs = tuple(t.new_zeros(rows, *t.shape[1:]) for t in per_image)
    for i in reversed(range(image_sample_index.shape[0])):  # reversed: a row's first image is written last
        for out, t in zip(outs, per_image, strict=True):
            out[image_sample_index[i]] = t[i]
    return outs


def per_row(objects: Objects, image_sample_index: Tensor, rows: int) -> Objects:
    """Images -> batch rows: every field (N_img, S, ...) as (B, M, ...), where M is the slots
    of the row with the most images (a row's images one after another, empty slots after)."""
    n_img, slots = objects.present.shape
    if n_img == rows and torch.equal(image_sample_index.cpu(), torch.arange(rows)):
        return objects  # one image per row, in order
    per = torch.bincount(image_sample_index, minlength=rows)  # images per row
    m = int(per.max()) * slots if n_img else slots
    # Where each image's slots go: its row, after the row's earlier images.
    places = [(int(row), int((image_sample_index[:i] == row).sum()) * slots)
              for i, row in enumerate(image_sample_index)]  # fmt: skip

    def place(field: Tensor) -> Tensor:
        out = field.new_zeros(rows, m, *field.shape[2:])  # False for `present`
        for i, (row, at) in enumerate(places):
            out[row, at : at + slots] = field[i]
        return out

    return Objects(*(None if field is None else place(field) for field in objects))


__all__ = ["COUNT_BINS", "MATCH_BINS", "Objects", "answer_questions", "QuestionFocus", "SIDE_RAMPS", "per_row",
           "read_for_questions", "read_per_row", "soft_histogram", "spread", "starts_with", "tool_result_prefix"]
