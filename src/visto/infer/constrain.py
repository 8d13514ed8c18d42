"""Grammar-constrained decoding: JSON that always parses.

At every step the allowed next tokens are those that keep the text a prefix of a string in
the grammar (a JSON schema, or any JSON object); all others get logit -inf before sampling,
and once the JSON is complete only the end-of-turn token is left (Willard & Louf 2023,
"Efficient Guided Generation"; xgrammar, Dong et al. 2024, precomputes the token masks of a
pushdown automaton so a step costs microseconds). It plugs into the engine through the
per-request `SamplingParams.logits_processor` hook: the engine knows nothing of grammars.

xgrammar reads our byte-level BPE through its transformers wrapper
(`Tokenizer.to_hf_tokenizer()`). It treats visto's structural special tokens (`<image>`,
`<|user|>`, ...) as plain text, so they are masked here as well: a constrained answer can
only end with a stop token, never contain one.

The answer also closes within the token budget. A grammar alone lets a string or an array run
on until `max_new_tokens` cuts it, and a cut JSON does not parse. So the constraint keeps a
closing path: a way from the current state to the end of the grammar (close the string, the
array, the object, fill in the required keys; `ClosingPath`) and its length in tokens, the stop
token included. After each draw the engine asks the constraint to `settle` the token
(`visto.infer.sampling.Settles`): a draw after which the closing path no longer fits in what is
left of the budget is replaced by the closing path's next token, so the last tokens of a tight
budget write the shortest way out and the answer ends with the stop token, not by length.

    grammars = Grammars(tokenizer, vocab_size, stop_ids=[tokenizer.end_id])
    compiled = grammars.compile_json(schema)            # None: any JSON object
    params = SamplingParams(logits_processor=grammars.constraint(compiled))  # one per answer

The server's `response_format` and tool calls build on this (`visto.serve.grammar`).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch
from torch import Tensor

from visto.data.special_tokens import SPECIAL_TOKENS
from visto.data.tokenizer import Tokenizer
from visto.errors import UserError

# No free whitespace: a small model could otherwise spend its whole budget on spaces between
# tokens that the grammar allows. Compact separators, as json.dumps(separators=(",", ":"))
# writes and the synthetic world trains: xgrammar's default ", " / ": " forces a format the
# model never saw and ~20% more tokens per answer.
JSON_STYLE: dict[str, Any] = {
    "any_whitespace": False,
    "strict_mode": True,
    "separators": (",", ":"),
}
# "Any JSON object" (OpenAI's response_format json_object, compile_json(None)): an object at
# the root, never an array (xgrammar's built-in JSON grammar allows either). Whitespace is free
# as in that grammar: its values are whatever JSON the model writes, compact or spaced
# (JSON_STYLE's compact separators would force xgrammar's ", " in the nested values).
ANY_OBJECT: dict[str, Any] = {"type": "object"}
ANY_OBJECT_STYLE: dict[str, Any] = {"any_whitespace": True, "strict_mode": True}
_NOT_SCHEMAS = ("enum", "const", "default", "examples")  # values there are data, not schemas
# A closing path writes one byte at a time, choosing the first byte the grammar allows in this
# order: end a string, close an object or array, go on to the next required key, then the
# shortest values (a digit; true, false, null), then any other byte. Ending a string comes
# first because inside one every other byte is content, and ',' before the digits so a number
# ends instead of growing.
_CLOSING_BYTES = b'"}],0123456789tfn'
CLOSE_LIMIT = 512  # bytes; a grammar with no way out as short as this gets no budget guarantee


def any_object_grammar(xgr: Any) -> Any:
    """The xgrammar Grammar of any JSON object (ANY_OBJECT)."""
    return xgr.Grammar.from_json_schema(json.dumps(ANY_OBJECT), **ANY_OBJECT_STYLE)


def plain_strings(schema: Any) -> Any:
    """`schema` with each length-bounded string given a pattern of plain characters.

    xgrammar 0.2.8 turns minLength/maxLength into a character class that admits raw control
    characters, which JSON forbids in strings (the answer would not parse); the pattern admits
    the same lengths of any character but quotes, backslashes and controls (no escapes).
    """
    if isinstance(schema, list):
        return [plain_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _NOT_SCHEMAS else plain_strings(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if (
        out.get("type") == "string"
        and bounded
        and not set(out) & {"pattern", "format", "enum", "const"}
    ):
        # the lengths move into the pattern (xgrammar ignores them beside one, with a warning)
        low, high = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        out["pattern"] = f'^[^"\\\\\\u0000-\\u001f]{{{low},{"" if high is None else int(high)}}}$'
    return out


class GrammarUnavailable(UserError):
    """xgrammar is not installed, so nothing can be decoded under a grammar."""


class Grammars:
    """Compiles grammars for one tokenizer and vocabulary size; compiled grammars are cached
    by xgrammar, so a repeated schema costs nothing."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: list[int]) -> None:
        try:
            import xgrammar as xgr
        except ImportError:
            raise GrammarUnavailable(
                "grammar-constrained decoding needs xgrammar: "
                "pip install --no-deps xgrammar apache-tvm-ffi"
            ) from None

        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer.to_hf_tokenizer(), vocab_size=vocab_size, stop_token_ids=stop_ids
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._lock = threading.Lock()  # compile from request threads one at a time
        self._forbidden = torch.zeros(vocab_size, dtype=torch.bool)
        self._forbidden[: len(SPECIAL_TOKENS)] = True
        self._forbidden[stop_ids] = False
        self._closing = ClosingPath(xgr, tokenizer, info.decoded_vocab, vocab_size, stop_ids)

    def compile_json(self, schema: dict[str, Any] | None) -> Any:
        """A compiled grammar of JSON under `schema`, or of any JSON object when it is None.
        A schema that does not compile raises what xgrammar raises (RuntimeError, ...)."""
        with self._lock:
            if schema is None:  # an object, not xgrammar's built-in JSON (object or array)
                return self._compiler.compile_json_schema(json.dumps(ANY_OBJECT),
                                                          **ANY_OBJECT_STYLE)  # fmt: skip
            return self._compiler.compile_json_schema(
                json.dumps(plain_strings(schema)), **JSON_STYLE
            )

    def constraint(self, compiled: Any, open_ended: bool = False) -> JSONConstraint:
        """A fresh logits processor for one generated sequence. `open_ended`: the grammar is
        free text (with structures in it, such as tool calls) that the budget may cut where the
        grammar could end, as it cuts any text ("length"); see JSONConstraint."""
        return JSONConstraint(self._xgr, compiled, self.vocab_size, self._forbidden, self._closing,
                              open_ended)  # fmt: skip

    def fewest_tokens(self, compiled: Any) -> int | None:
        """Tokens (the stop token included) of the closing path from the grammar's start: the
        budget an answer needs at least to be closed by this constraint; None where no path
        of CLOSE_LIMIT bytes was found."""
        path = self._closing(self._xgr.GrammarMatcher(compiled))
        return None if path is None else len(path)


class ClosingPath:
    """The tokens that end a grammar from a matcher's state: one byte at a time, the first byte
    the grammar allows in `_CLOSING_BYTES` order (the forced strings xgrammar reports whole),
    then the bytes re-encoded by the tokenizer, which takes at most as many tokens, and one stop
    token. Not always the shortest way out, but a way out whose length is known, which is what
    closing within a budget needs. A fork of the matcher walks it; the matcher is not moved."""

    def __init__(self, xgr: Any, tokenizer: Tokenizer, decoded_vocab: list[bytes],
                 vocab_size: int, stop_ids: list[int]) -> None:  # fmt: skip
        self._tokenizer = tokenizer
        self.stop_ids = list(stop_ids)
        self._byte_ids = {v[0]: i for i, v in enumerate(decoded_vocab)
                          if len(v) == 1 and i >= len(SPECIAL_TOKENS)}  # fmt: skip
        order = list(_CLOSING_BYTES) + [b for b in range(256) if b not in _CLOSING_BYTES]
        self._order = [(b, self._byte_ids[b]) for b in order if b in self._byte_ids]
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._lock = threading.Lock()  # one scratch bitmask, shared by a server's requests

    def __call__(self, matcher: Any) -> list[int] | None:
        """The closing path as the tokenizer writes it (fewest tokens), or None."""
        walked = self._walk(matcher)
        if walked is None:
            return None
        text, stop = walked
        try:
            return [*self._tokenizer.encode(text.decode("utf-8")), stop]
        except UnicodeDecodeError:  # the answer so far ends inside a character
            return [*(self._byte_ids[b] for b in text), stop]

    def bytewise(self, matcher: Any) -> list[int] | None:
        """The closing path one byte token at a time, each of them the grammar's by making."""
        walked = self._walk(matcher)
        return None if walked is None else [*(self._byte_ids[b] for b in walked[0]), walked[1]]

    def _walk(self, matcher: Any) -> tuple[bytes, int] | None:
        """(the bytes of the way out, the stop token that ends it), or None."""
        walker, text = matcher.fork(), bytearray()
        with self._lock:
            words = self._bitmask[0].numpy()  # bit i of word w: token 32 * w + i may come next
            while len(text) <= CLOSE_LIMIT:
                walker.fill_next_token_bitmask(self._bitmask)
                stop = [i for i in self.stop_ids if words[i >> 5] >> (i & 31) & 1]
                if stop:
                    return bytes(text), stop[0]
                steps = walker.find_jump_forward_string().encode() or self._next_byte(walker, words)
                if not steps or not all(walker.accept_token(self._byte_ids[b]) for b in steps):
                    return None  # nothing may follow, and no stop either: no way out
                text += steps
        return None

    def _next_byte(self, walker: Any, words: Any) -> bytes:
        """The byte the walk writes next (`words`: the walker's bitmask), b"" if none may."""
        allowed = [b for b, i in self._order if words[i >> 5] >> (i & 31) & 1]
        if not allowed:
            return b""
        closer = [b for b in allowed[:3] if b in b"}]"]
        if allowed[0] == ord('"') and closer:
            # A quote either ends the string the walk is in or opens a new one, as after '['
            # where ']' is shorter: it opened one if another quote may follow at once.
            fork = walker.fork()
            fork.accept_token(self._byte_ids[ord('"')])
            fork.fill_next_token_bitmask(self._bitmask)
            i = self._byte_ids[ord('"')]
            if words[i >> 5] >> (i & 31) & 1:
                return bytes([closer[0]])
        return bytes([allowed[0]])


class GrammarMask:
    """`(generated ids, logits (V,)) -> logits (V,)` with every token the grammar rejects at -inf
    (and the structural special tokens but the stop tokens). JSONConstraint adds closing within
    the budget."""

    def __init__(self, xgr: Any, compiled: Any, vocab_size: int, forbidden: Tensor) -> None:
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.forbidden = forbidden
        self.consumed = 0  # generated tokens already fed to the matcher
        self._shifts = torch.arange(32, dtype=torch.int32)

    def _catch_up(self, generated: list[int]) -> None:
        for token in generated[self.consumed :]:
            accepted = self.matcher.accept_token(token)
            assert accepted, f"token {token} was sampled although the grammar forbids it"
            self._moved()
        self.consumed = len(generated)

    def _moved(self) -> None:
        """The matcher took a token."""

    def __call__(self, generated: list[int], logits: Tensor) -> Tensor:
        self._catch_up(generated)
        self.matcher.fill_next_token_bitmask(self.bitmask)
        # The bitmask packs 32 tokens per int32, bit i of word w = token 32 * w + i. Unpacked
        # here in torch: xgrammar's own CPU kernel hung when called from a server thread.
        V = logits.shape[-1]
        words = self.bitmask[0]  # (ceil(V / 32),) int32
        allowed = ((words[:, None] >> self._shifts) & 1).bool().flatten()[:V]  # (V,)
        blocked = ~allowed | self.forbidden[:V]
        return logits.float().masked_fill(blocked, float("-inf"))


class JSONConstraint(GrammarMask):
    """A GrammarMask and `settle`, which keeps the answer able to close within the budget
    (module doc). With `open_ended`, a last token drawn where the grammar could end (free
    text, outside any structure) stands: the budget cuts the text there ("length") instead of
    the stop token ending it; a structure begun (a JSON value, a tool call) still closes."""

    def __init__(self, xgr: Any, compiled: Any, vocab_size: int, forbidden: Tensor,
                 closing: ClosingPath, open_ended: bool = False) -> None:  # fmt: skip
        super().__init__(xgr, compiled, vocab_size, forbidden)
        self.open_ended = open_ended
        self._closing = closing
        self._path: list[int] | None = None  # the closing path from the matcher's state

    def _moved(self) -> None:
        self._path = None

    def settle(self, generated: list[int], token: int, left: int) -> int:
        """The token to take after `generated` where `token` was drawn and `left` tokens (this
        one included) remain of the budget: `token` while the closing path still fits after
        it, else the closing path's next token."""
        self._catch_up(generated)
        if token in self._closing.stop_ids:  # the answer ends here (the grammar allowed it, or
            return token  # the request was stopped from outside, which ends it as well)
        path = self._path if self._path is not None else self._closing(self.matcher)
        if path is not None and token == path[0]:
            return self._take(token, path[1:])
        if self.open_ended and left == 1 and path is not None and len(path) == 1:
            # the grammar could end here (its way out is the stop token alone): free text,
            # which the budget cuts after this token like any text
            return self._take(token, [])
        if path is None or len(path) < left:  # room to spare: does the draw leave a way out?
            accepted = self.matcher.accept_token(token)
            assert accepted, f"token {token} was sampled although the grammar forbids it"
            after = self._closing(self.matcher)
            if path is None or (after is not None and len(after) <= left - 1):
                self.consumed, self._path = len(generated) + 1, after
                return token
            self.matcher.rollback(1)
        # the budget only just suffices to close: the closing path and nothing else
        if not self.matcher.accept_token(path[0]):  # the tokenizer's merge was not the grammar's
            path = self._closing.bytewise(self.matcher)
            assert path is not None and self.matcher.accept_token(path[0]), "no way out"
        self.consumed, self._path = len(generated) + 1, path[1:] or None
        return path[0]

    def _take(self, token: int, rest: list[int]) -> int:
        accepted = self.matcher.accept_token(token)
        assert accepted, "the closing path follows the grammar"
        self.consumed += 1
        self._path = rest or None
        return token
