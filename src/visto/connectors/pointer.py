"""Pointer head: an answer copies the tokens the question focus put in its `<focus>` slots.

The focus hands a grounding answer the named object's box as 4 `<focus>` slots right before
the answer, and an OCR answer what the reader read as the slots after those (focus.py): the
answer is a copy from a fixed distance back. Learned through attention, the quickstart's
decoder did not learn that copy in 400 + 200 steps (OCR exact 0.013, the reader alone 0.92),
and a probe of the same decoder copies 4 tokens after 60 with a plain LM head at 0.000 after
300 steps but at 1.000 after 50 with a pointer (bench/copy_probe.py). So the copy goes
through a head of its own (M4C's dynamic pointer network, Hu et al. 2020; the
pointer-generator of See et al. 2017):

    score_k = (W_q h_t) . key_k + log succ_k    h_t: the decoder's last hidden state (normed),
                                                key_k: a learned key per slot (whether to copy
                                                now, and which run an answer starts with);
                                                succ_k: how much slot k - 1 of the same run
                                                holds the current token (a run's first slot:
                                                whether the current token opens the answer),
                                                so a copy goes on in order; 0 = not eligible
    with `question` (ProjectorConfig.question_pointer), W_q h_t + W_u u in place of W_q h_t:
    u the answer's question pooled by the focus (its words' mean, in the decoder's word space,
    `CopySlots.question`), W_u zero at first (a fresh pointer scores as without it); which run
    an answer copies (its colour or its shape) is then one linear read of the question's
    words, not something the decoder's hidden state must learn to separate
    p(. | t) = softmax([vocabulary logits, score_1..K])   one softmax over both
    p(w | t) = p_vocab(w) + sum_k p_slot(k) * slot_k(w)   slot_k: what slot k holds, as a
                                                distribution over token ids (a box slot: each
                                                object's location token, weighted as the focus
                                                weights the objects; a read slot: one token)

With a script (`copy_json`), an answer may also copy a whole structured answer that the
connector wrote from what it detected (the world's JSON: every object's shape, colour, size
and box, the counts, the text), token by token. Its slots are too many, and too alike (every
object's colour follows the same `":"`), for the successor rule, so the script has one column
of its own, which offers the token at a cursor: where the answer written so far is in the
script. The cursor moves on when the answer writes the token it offers, jumps ahead to the
next place within `SCRIPT_RESYNC` tokens that holds the token written where the answer wrote
something else (a box number of another length), and waits otherwise (`advance_cursor`):

    score_script = (W_q h_t) . key_script    eligible while the cursor is inside the script

The cursor is computed over the answer's tokens in training (`script_cursors`) and carried
per generating row in generation (`CopySlots.cursor`, moved on at each decode step).

Empty slots take no probability. Each answer copies from its own slots only (`CopySlots`,
one row per answer), in training as in generation; the engine keeps each generating row's
slots (`CopySlots` is the runner's per-row context: it has `select` and `merge`) and mixes
them into every decode step's logits (`Llava.output_logits`). The result is log-probabilities,
which the engine's sampling, grammars and the loss take as logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

SCRIPT_RESYNC = 8  # how far ahead the script's cursor looks for the token an answer wrote


@dataclass
class CopySlots:
    """What each of K slots holds, per answer (or per generating row): token ids (N, K, M) and
    their weights (N, K, M) (a slot's weights sum to 1 where it holds a token, 0 where empty).
    For generating rows, also the prompt's last token (N,): the position prefill predicts from."""

    ids: Tensor
    weights: Tensor
    prompt_last: Tensor | None = None
    # With a script: its token ids (N, L), -1 past its end (which holds the end token), and
    # for generating rows the cursor into it (N,): how much of it the answer has written.
    script: Tensor | None = None
    cursor: Tensor | None = None
    # With a question-aware pointer (`PointerHead(question=True)`): each answer's question,
    # pooled (N, D) (connectors.focus); None: no question term
    question: Tensor | None = None
    # What `PointerHead.decode` computes once per generating rows' slots (not per step); a
    # new CopySlots (select, merge) starts without it.
    decoding: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def __getitem__(self, index: Tensor) -> CopySlots:
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return CopySlots(self.ids[index], self.weights[index], pick(self.prompt_last),
                         pick(self.script), pick(self.cursor), pick(self.question))  # fmt: skip

    def select(self, rows: Tensor) -> CopySlots:
        return self[rows.to(self.ids.device)]

    @staticmethod
    def merge(slots: list[CopySlots]) -> CopySlots:
        """One batch of every part's rows (the objects' axis M padded to the widest)."""
        last = script = cursor = None
        if all(s.prompt_last is not None for s in slots):
            last = torch.cat([s.prompt_last for s in slots])
        if all(s.script is not None for s in slots):
            width = max(s.script.shape[1] for s in slots)
            script = torch.cat([nn.functional.pad(s.script, (0, width - s.script.shape[1]), value=-1)
                                for s in slots])  # fmt: skip
            cursor = torch.cat([s.cursor if s.cursor is not None else s.script.new_zeros(len(s.script))
                                for s in slots])  # fmt: skip
        ids, weights = _joined([s.ids for s in slots], [s.weights for s in slots], 0)
        question = None
        given = [s.question for s in slots if s.question is not None]
        if given:  # rows without a question (no image: nothing to copy) get none (zeros)
            question = torch.cat([s.question if s.question is not None else given[0].new_zeros(len(s.ids), given[0].shape[1])
                                  for s in slots])  # fmt: skip
        return CopySlots(ids, weights, last, script, cursor, question)

    def decoding_cache(self) -> dict[str, Any]:
        """What `PointerHead.decode` keeps for these rows between steps (made on first use)."""
        if self.decoding is None:
            self.decoding = {}
        return self.decoding

    def script_next(self, tokens: Tensor | None) -> Tensor | None:
        """For generating rows: move each row's cursor past `tokens` (N,), what it wrote last
        (None: nothing yet, at prefill), and return the script token each row may copy next
        (N,) (-1: none). Called once per decode step (`PointerHead.decode`). The cursors move
        in Python on the script's token lists: the cursors `advance_cursor` and `script_token`
        give teacher-forced training, without ~17 small tensor operators per step (about
        50 us of a batch-1 step)."""
        if self.script is None:
            return None
        cache = self.decoding_cache()
        if "script" not in cache:  # padded with -1 as the tensor is: the same positions
            cache["script"] = self.script.tolist()
        scripts = cache["script"]
        cursors = [0] * len(scripts) if self.cursor is None else self.cursor.tolist()
        if tokens is not None:
            cursors = [_advanced(script, at, token)
                       for script, at, token in zip(scripts, cursors, tokens.tolist(), strict=True)]  # fmt: skip
        self.cursor = torch.tensor(cursors, dtype=self.script.dtype, device=self.script.device)
        return torch.tensor([script[at] if at < len(script) else -1 for script, at in zip(scripts, cursors, strict=True)],
                            dtype=self.script.dtype, device=self.script.device)  # fmt: skip


@dataclass
class CopyingState:
    """A decoder state and the rows' slots: the state of a model with a pointer head on the
    engine's generic path (the model's own prefill and decode_step)."""

    decoder: Any  # has select(rows)
    slots: CopySlots

    def select(self, rows: Tensor) -> CopyingState:
        return CopyingState(self.decoder.select(rows), self.slots.select(rows))


class PointerHead(nn.Module):
    """(hidden, vocabulary logits, slots, current tokens) -> log-probabilities with the slots'
    tokens mixed in. The slots come in runs (the box's 4 location tokens; the read tokens),
    each followed by an end slot that holds the end token right after the run's last token
    (`copy_runs`), so a copy ends as it was copied."""

    def __init__(self, width: int, runs: tuple[int, ...], script: bool = False, question: bool = False) -> None:
        super().__init__()
        self.runs = tuple(runs)
        self.query = nn.Linear(width, width, bias=False)
        self.keys = nn.Parameter(torch.randn(self.slots, width) * 0.02)
        # the script's column (module doc); absent in checkpoints without one
        self.script_key = nn.Parameter(torch.randn(width) * 0.02) if script else None
        # W_u, the question's term in the query (module doc); zero: a fresh pointer is unchanged.
        # A parameter, not a Linear (build_projector re-initialises every Linear).
        self.question = nn.Parameter(torch.zeros(width, width)) if question else None
        self.start_id = -1  # the token that opens an answer (`<|assistant|>`); set_vocabulary

    @property
    def slots(self) -> int:
        return sum(length + 1 for length in self.runs)  # each run and its end slot

    def run_starts(self) -> list[int]:
        starts, at = [], 0
        for length in self.runs:
            starts.append(at)
            at += length + 1
        return starts

    def forward(
        self, hidden: Tensor, logits: Tensor, slots: CopySlots, tokens: Tensor,
        script_next: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """hidden (N, C), logits (N, V), slots of N answers, the tokens at those N positions
        (N,), and with a script the token each may copy from it (N,) (-1: none) ->
        log-probabilities (N, V) of the next token."""
        weights = slots.weights.to(logits.dtype)
        successor, eligible = self._successor(slots.ids, weights, weights.sum(-1) > 0, self.run_starts(), tokens)
        query = self.query(hidden.to(self.keys.dtype))
        if self.question is not None and slots.question is not None:
            query = query + slots.question.to(self.question.dtype) @ self.question
        return self._mixed(query, successor, eligible, logits, weights, slots.ids.flatten(1), script_next)

    def _successor(self, ids: Tensor, weights: Tensor, held: Tensor, starts: Any,
                   tokens: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
        """How much each slot's predecessor holds the current token, and which slots may be
        copied now ((N, K) each; `held`: the slots that hold a token). A copy goes on in order:
        the slot after the one that holds the current token (a run's first slot when the
        current token opens the answer), weighted by how much it holds it (box slots are
        spread over objects). With learned keys alone the decoder had to count where it was,
        and lost its place in words of several tokens."""
        holds = ((ids == tokens[:, None, None]) * weights).sum(-1)  # (N, K)
        successor = torch.cat([torch.zeros_like(holds[:, :1]), holds[:, :-1]], 1)
        successor[:, starts] = (tokens == self.start_id).to(holds.dtype)[:, None]
        return successor, (successor > 0) & held

    @torch.inference_mode()
    def decode(self, hidden: Tensor, logits: Tensor, slots: CopySlots, tokens: Tensor | None) -> Tensor:
        """`forward` for generating rows (the engine's hook after the LM head), moving each
        row's script cursor past `tokens` (None: the prompt's last, at prefill) first: the
        same log-probabilities, bit for bit, with what does not change from one step to the
        next (the slots' weights and which are held, their ids flattened, the question's term
        in the query) computed once per rows' slots, and the cursors moved in Python. At
        batch 1 `forward` is ~65 small operators, a tenth of a decode step."""
        script_next = slots.script_next(tokens)
        tokens = slots.prompt_last if tokens is None else tokens
        cache = slots.decoding_cache()
        if "weights" not in cache or cache["weights"].dtype != logits.dtype:
            weights = slots.weights.to(logits.dtype)
            cache["weights"] = weights
            cache["held"] = weights.sum(-1) > 0  # (N, K)
            cache["starts"] = torch.tensor(self.run_starts(), device=weights.device)
            cache["ids"] = slots.ids.flatten(1)
            cache["question"] = None
            if self.question is not None and slots.question is not None:
                cache["question"] = slots.question.to(self.question.dtype) @ self.question
        weights = cache["weights"]
        successor, eligible = self._successor(slots.ids, weights, cache["held"], cache["starts"], tokens)
        query = self.query(hidden.to(self.keys.dtype))
        if cache["question"] is not None:
            query = query + cache["question"]
        return self._mixed(query, successor, eligible, logits, weights, cache["ids"], script_next)

    def _mixed(self, query: Tensor, successor: Tensor, eligible: Tensor, logits: Tensor,
               weights: Tensor, ids: Tensor, script_next: Tensor | None) -> Tensor:  # fmt: skip
        """The slots' scores from the query, one softmax over them and the vocabulary, and
        each slot's share scattered onto the tokens it holds -> log-probabilities (N, V)."""
        scores = query @ self.keys.T  # (N, K): whether to copy
        scores = (scores.to(logits.dtype) + successor.clamp(min=1e-30).log()).masked_fill(~eligible, float("-inf"))
        K = scores.shape[1]
        if self.script_key is not None and script_next is not None:  # the script's column
            script_score = (query @ self.script_key).to(logits.dtype).masked_fill(script_next < 0, float("-inf"))
            scores = torch.cat([scores, script_score[:, None]], -1)
            ids = torch.cat([ids, script_next.clamp(min=0)[:, None]], -1)
        joint = torch.cat([logits, scores], -1).log_softmax(-1)  # one softmax over both
        V = logits.shape[-1]
        p_slot = joint[:, V:].exp()  # (N, K [+ 1]); 0 on empty slots
        share = (p_slot[:, :K, None] * weights).flatten(1)  # (N, K * M)
        if p_slot.shape[1] > K:
            share = torch.cat([share, p_slot[:, K:]], -1)
        copied = p_slot.new_zeros(logits.shape).scatter_add(-1, ids, share)  # (N, V)
        # log(p_vocab + copied); copied is 0 for most tokens (clamped: no infinite gradient)
        return torch.logaddexp(joint[:, :V], copied.clamp(min=1e-30).log())


def _advanced(script: list[int], cursor: int, token: int) -> int:
    """`advance_cursor` for one row, on the script's token list."""
    if token < 0:
        return cursor
    for offset in range(SCRIPT_RESYNC + 1):
        at = cursor + offset
        if at < len(script) and script[at] == token:
            return at + 1
    return cursor


def copy_runs(runs: list[tuple[Tensor, Tensor]], end_id: int) -> CopySlots:
    """Runs of slots, each (P, L, M) ids and weights filled from the front, -> the pointer's
    slots: each run followed by an end slot, and the end token in the slot right after the
    run's last held one (none in an empty run)."""
    out_ids, out_weights = [], []
    for ids, weights in runs:
        P, L, M = ids.shape
        ids = torch.cat([ids, ids.new_zeros(P, 1, M)], 1)
        weights = torch.cat([weights, weights.new_zeros(P, 1, M)], 1)
        n = (weights.sum(-1) > 0).sum(1)  # (P,) held slots
        rows = torch.arange(P, device=ids.device)
        ids[rows, n, 0] = end_id
        weights[rows, n, 0] = (n > 0).to(weights.dtype)
        out_ids.append(ids)
        out_weights.append(weights)
    return CopySlots(*_joined(out_ids, out_weights, 1))


def advance_cursor(script: Tensor, cursor: Tensor, tokens: Tensor) -> Tensor:
    """Cursors (N,) into scripts (N, L) moved past the tokens written (N,): one on where the
    script holds the token there, to just after the first place within SCRIPT_RESYNC ahead
    that holds it otherwise, unchanged where none does."""
    L = script.shape[1]
    at = cursor[:, None] + torch.arange(SCRIPT_RESYNC + 1, device=script.device)  # (N, W)
    held = script.gather(1, at.clamp(max=L - 1)) if L else script.new_full(at.shape, -1)
    found = (held == tokens[:, None]) & (at < L) & (tokens[:, None] >= 0)
    first = found.to(torch.uint8).argmax(1)
    return torch.where(found.any(1), cursor + first + 1, cursor)


def script_token(script: Tensor, cursor: Tensor) -> Tensor:
    """The token each cursor points at (N,) (-1 past the script)."""
    L = script.shape[1]
    if L == 0:
        return cursor.new_full(cursor.shape, -1)
    token = script.gather(1, cursor.clamp(max=L - 1)[:, None])[:, 0]
    return torch.where(cursor < L, token, -1)


def script_cursors(script: Tensor, written: Tensor, real: Tensor) -> Tensor:
    """Teacher forcing: for A answers' scripts (A, L) and the tokens each answer wrote (A, T)
    (its `<|assistant|>` token first; `real` (A, T) marks them), the cursor at each of those
    positions (A, T): 0 at the `<|assistant|>` token, then moved past each token written, as
    generation moves it (`CopySlots.script_next`, on token lists)."""
    A, T = written.shape
    cursors = written.new_zeros(A, T)
    cursor = written.new_zeros(A)
    for t in range(1, T):
        cursor = torch.where(real[:, t], advance_cursor(script, cursor, written[:, t]), cursor)
        cursors[:, t] = cursor
    return cursors


def _joined(ids: list[Tensor], weights: list[Tensor], dim: int) -> tuple[Tensor, Tensor]:
    """Slot ids and weights (..., M_i) concatenated along `dim`, their last axis (the objects a
    slot is spread over) zero-padded to the widest: a padded entry holds nothing."""
    width = max(t.shape[-1] for t in ids)

    def cat(parts: list[Tensor]) -> Tensor:
        return torch.cat([nn.functional.pad(t, (0, width - t.shape[-1])) for t in parts], dim)

    return cat(ids), cat(weights)


def answer_of_position(input_ids: Tensor, assistant_id: int) -> Tensor:
    """(B, T) -> (B, T) the index of each position's answer: the last `<|assistant|>` token at
    or before it, numbered in row-major order as `nonzero` lists them (-1: none yet)."""
    is_open = input_ids == assistant_id
    number = is_open.flatten().long().cumsum(0).view(input_ids.shape) - 1
    seen = is_open.long().cummax(1).values.bool()  # an answer opened earlier in this row
    return torch.where(seen, number, -1)


__all__ = ["SCRIPT_RESYNC", "CopySlots", "CopyingState", "PointerHead", "advance_cursor",
           "answer_of_position", "copy_runs", "script_cursors", "script_token"]  # fmt: skip
