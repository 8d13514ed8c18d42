"""Grammar-constrained decoding for `response_format` and tool calls: JSON that always parses.

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
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from visto.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from visto.data.tool_calls import TOOL_CALL_END, TOOL_CALL_START
from visto.serve.errors import APIError

if TYPE_CHECKING:
    from visto.serve.tools import ToolPlan


# No free whitespace: a small model could otherwise spend its whole budget on spaces between
# tokens that the grammar allows. Compact separators, as json.dumps(separators=(",", ":"))
# writes and the synthetic world trains: xgrammar's default ", " / ": " forces a format the
# model never saw and ~20% more tokens per answer.
JSON_STYLE: dict[str, Any] = {"any_whitespace": False, "strict_mode": True, "separators": (",", ":")}
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
    if out.get("type") == "string" and bounded and not set(out) & {"pattern", "format", "enum", "const"}:
        # the lengths move into the pattern (xgrammar ignores them beside one, with a warning)
        low, high = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        out["pattern"] = f'^[^"\\\\\\u0000-\\u001f]{{{low},{"" if high is None else int(high)}}}$'
    return out


def _response_schema(response_format: dict[str, Any]) -> Any:
    """None (plain text), "json_object", or the JSON schema of a `response_format`."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object"
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON Schema object",
                           "response_format.json_schema.schema")  # fmt: skip
        return plain_strings(schema)
    raise APIError(400, "response_format.type must be 'text', 'json_object' or 'json_schema', "
                   f"got {kind!r}", "response_format.type")  # fmt: skip


def _schema_error(e: Exception) -> APIError:
    return APIError(400, f"the JSON schema could not be compiled into a grammar: {e}",
                    "response_format.json_schema.schema")  # fmt: skip


class GrammarFactory:
    """Compiles response formats for one tokenizer and vocabulary size; compiled grammars are
    cached by xgrammar, so a repeated schema costs nothing."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: list[int]) -> None:
        try:
            import xgrammar as xgr
        except ImportError:
            raise APIError(
                501,
                "response_format json_object/json_schema and tool calls need xgrammar on the "
                "server: "
                "pip install --no-deps xgrammar apache-tvm-ffi",
                "response_format",
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

    def compile(self, response_format: dict[str, Any]) -> Any:
        """A compiled grammar for an OpenAI `response_format`, or None for plain text."""
        schema = _response_schema(response_format)
        with self._lock:
            if schema is None:
                return None
            if schema == "json_object":
                return self._compiler.compile_builtin_json_grammar()
            try:
                return self._compiler.compile_json_schema(json.dumps(schema), **JSON_STYLE)
            except Exception as e:  # xgrammar raises RuntimeError/InvalidJSONError/...
                raise _schema_error(e) from None

    def _answer_grammar(self, response_format: dict[str, Any] | None) -> str | None:
        """The EBNF of a `response_format` answer, to combine with tool calls; None for text."""
        schema = _response_schema(response_format) if response_format else None
        if schema is None:
            return None
        if schema == "json_object":
            return str(self._xgr.Grammar.builtin_json_grammar())
        try:
            return str(self._xgr.Grammar.from_json_schema(json.dumps(schema), **JSON_STYLE))
        except Exception as e:
            raise _schema_error(e) from None

    def compile_tool_calls(self, plan: ToolPlan, response_format: dict[str, Any] | None = None) -> Any:
        """A grammar for an answer under `plan` (serve/tools.py): with "auto", free text in which
        a `<tool_call>` opens a call of one of the tools, or, with a JSON `response_format`,
        either calls or that JSON; with "required" (or a named tool), calls and nothing else.
        Either way a call's arguments follow its tool's JSON schema."""
        from xgrammar.structural_tag import (
            GrammarFormat,
            OrFormat,
            StructuralTag,
            TagFormat,
            TagsWithSeparatorFormat,
            TriggeredTagsFormat,
        )

        answer = self._answer_grammar(response_format)

        tags = []
        for name in plan.callable:
            try:
                # compact JSON as response_format writes it (see compile); names are [A-Za-z0-9_-]
                arguments = self._xgr.Grammar.from_json_schema(
                    json.dumps(plain_strings(plan.parameters[name])), **JSON_STYLE
                )
            except Exception as e:
                raise APIError(400, f"the parameters of the function {name!r} could not be "
                               f"compiled into a grammar: {e}", "tools") from None  # fmt: skip
            tags.append(TagFormat(begin=f'{TOOL_CALL_START}{{"name":"{name}","arguments":',
                                  content=GrammarFormat(grammar=str(arguments)),
                                  end="}" + TOOL_CALL_END))  # fmt: skip
        one_call = not plan.parallel
        calls = TagsWithSeparatorFormat(tags=tags, separator="", at_least_one=True,
                                        stop_after_first=one_call)  # fmt: skip
        if plan.mode != "auto":
            fmt = calls
        elif answer is not None:
            fmt = OrFormat(elements=[calls, GrammarFormat(grammar=answer)])
        else:
            fmt = TriggeredTagsFormat(triggers=[TOOL_CALL_START], tags=tags,
                                      stop_after_first=one_call)  # fmt: skip
        with self._lock:
            return self._compiler.compile_structural_tag(StructuralTag(format=fmt))

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
