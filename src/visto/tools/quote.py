"""Quoting a tool's text: the answer after a tool result that holds text is made of its words.

A model that calls the OCR tool still has to copy the tool's text into its answer, and the
quickstart's 4-layer decoder has no way to copy from its context: its pointer head copies only
what its own connector put in its slots (the image's text reader), and plain attention did not
learn the copy in thousands of answers (bench/README.md, "A generative model calling the OCR
tool": 0 of 117 teacher-forced). So visto can do the copy at decoding time, as a constraint:

    words = quoted_words(results)          # ["22", "CAT"]: the words of the results' "text"
    params.logits_processor = QuoteConstraint(tokenizer, words, stop_ids)

The answer is then one or more of those words, separated by single spaces or line breaks (as
the tool separates its lines), each used at most as often as the results hold it, and the stop
token: which words, in what order, and when to stop is still the model's choice (greedy or sampled over the allowed tokens). A tool's text
that is the whole answer (an OCR question, "What is written on the sign?") fits it; an answer
that says more than the text ("The price is above ten") does not, so quoting is a choice of the
caller (`ToolLoop(quote=True)`), never the default. Results without text leave the answer free.

`visto chat` and `visto serve` choose with `--quote-results {auto,always,never}` (`quotes`):
auto quotes for the OCR task, where the answer is the text (`visto chat --task ocr`; in
`visto serve`, a request whose question is that task's prompt).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from visto.errors import UserError
from visto.tools.registry import ToolResult

QUOTE_RESULTS = ("auto", "always", "never")  # --quote-results of visto chat and visto serve


def quotes(how: str, task: str | None) -> bool:
    """Whether the answer after a tool result with text quotes it, under --quote-results `how`
    for a question of `task` (visto.tasks' name, None for a free question): always; never;
    auto for "ocr", where the answer is the text."""
    if how not in QUOTE_RESULTS:
        raise UserError(f"--quote-results {how!r}: give one of {', '.join(QUOTE_RESULTS)}")
    return how == "always" or (how == "auto" and task == "ocr")


def quoted_words(results: Sequence[ToolResult]) -> list[str]:
    """The words an answer may quote: of every successful result whose output has a "text"
    string (the OCR tool's), its whitespace-separated words, in order."""
    words: list[str] = []
    for result in results:
        output = result.output
        if result.ok and isinstance(output, dict) and isinstance(output.get("text"), str):
            words += output["text"].split()
    return words


SEPARATORS = (" ", "\n")  # between quoted words: a space, or a line break as the tool writes


class QuoteConstraint:
    """`(generated ids, logits (V,)) -> logits (V,)`: every token that does not go on quoting
    `words` at -inf (module doc). The quote is read as text, whatever tokens spell it (a
    tokenizer that merged " DOG" writes "LAMP DOG" as two tokens): the text so far must be
    words of `words` joined by one of SEPARATORS each, the last one maybe unfinished, no word
    used more often than `words` holds it; the stop tokens come only after a whole word.
    Tokens that spell other characters, and visto's special and location tokens, are never
    allowed. One instance per answer (it reads the ids generated so far)."""

    def __init__(self, tokenizer: Any, words: Sequence[str], stop_ids: Sequence[int]) -> None:
        from visto.data.special_tokens import SPECIAL_TOKENS

        if not words:
            raise UserError("a quote needs at least one word to quote")
        if not stop_ids:
            raise UserError("a quote needs a stop token to end the answer")
        if any(not w or any(c in w for c in SEPARATORS) for w in words):
            raise UserError(f"quoted words must be non-empty and hold no space: {list(words)!r}")
        self.stop_ids = [int(i) for i in stop_ids]
        self.counts = Counter(words)
        self._decode = tokenizer.decode
        chars = set("".join(words)) | set(SEPARATORS)
        never = {*range(len(SPECIAL_TOKENS)), *tokenizer.loc_ids, tokenizer.focus_id}
        self.pieces: dict[int, str] = {}  # the tokens that spell only the quote's characters
        for i in range(tokenizer.vocab_size):
            if i not in never and (piece := tokenizer.decode([i])) and set(piece) <= chars:
                self.pieces[i] = piece

    def _left(self, text: str) -> tuple[Counter, str] | None:
        """(the words not yet used up, the unfinished last one) after `text`; None when `text`
        begins no quote."""
        *done, last = re.split("[ \n]", text)
        left = Counter(self.counts)
        for word in done:
            if left[word] <= 0:  # not a word of the quote, used up, or "" (two separators)
                return None
            left[word] -= 1
        if not any(n > 0 and w.startswith(last) for w, n in left.items()):
            return None
        return left, last

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """The token ids that may come next after `generated`; [] once the text has left the
        quote (which the mask never lets it do)."""
        text = self._decode(list(generated))
        state = self._left(text)
        if state is None:
            return []
        out = [i for i, piece in self.pieces.items() if self._left(text + piece) is not None]
        left, last = state
        if last and left[last] > 0:  # a whole word: the answer may end here
            out += self.stop_ids
        return sorted(out)

    def __call__(self, generated: list[int], logits: Tensor) -> Tensor:
        allowed = self.allowed(generated)
        if not allowed:  # past the quote's end: only a stop token
            allowed = self.stop_ids
        mask = torch.ones_like(logits, dtype=torch.bool)
        mask[[i for i in allowed if i < logits.shape[-1]]] = False
        return logits.float().masked_fill(mask, float("-inf"))
