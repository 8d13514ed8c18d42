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
_NOT_SCHEMAS = ("enum", "const", "default", "examples")  # values there are data, not schemas


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

    def compile_json(self, schema: dict[str, Any] | None) -> Any:
        """A compiled grammar of JSON under `schema`, or of any JSON object when it is None.
        A schema that does not compile raises what xgrammar raises (RuntimeError, ...)."""
        with self._lock:
            if schema is None:
                return self._compiler.compile_builtin_json_grammar()
            return self._compiler.compile_json_schema(
                json.dumps(plain_strings(schema)), **JSON_STYLE
            )

    def constraint(self, compiled: Any) -> JSONConstraint:
        """A fresh logits processor for one generated sequence."""
        return JSONConstraint(self._xgr, compiled, self.vocab_size, self._forbidden)


class JSONConstraint:
    """`(generated ids, logits (V,)) -> logits (V,)` with every token the grammar rejects at -inf."""

    def __init__(self, xgr: Any, compiled: Any, vocab_size: int, forbidden: Tensor) -> None:
        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.forbidden = forbidden
        self.consumed = 0  # generated tokens already fed to the matcher
        self._shifts = torch.arange(32, dtype=torch.int32)

    def __call__(self, generated: list[int], logits: Tensor) -> Tensor:
        for token in generated[self.consumed :]:
            accepted = self.matcher.accept_token(token)
            assert accepted, f"token {token} was sampled although the grammar forbids it"
        self.consumed = len(generated)
        self.matcher.fill_next_token_bitmask(self.bitmask)
        # The bitmask packs 32 tokens per int32, bit i of word w = token 32 * w + i. Unpacked
        # here in torch: xgrammar's own CPU kernel hung when called from a server thread.
        V = logits.shape[-1]
        words = self.bitmask[0]  # (ceil(V / 32),) int32
        allowed = ((words[:, None] >> self._shifts) & 1).bool().flatten()[:V]  # (V,)
        blocked = ~allowed | self.forbidden[:V]
        return logits.float().masked_fill(blocked, float("-inf"))
