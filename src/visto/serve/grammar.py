"""Constrained decoding in the OpenAI shape: `response_format` and tool calls.

The grammars and the logits processor that applies them are the engine's
(`visto.infer.constrain`); this module reads a request's `response_format` into a schema,
builds the grammar of a tool-call answer (serve/tools.py plans it), and turns what goes
wrong into OpenAI-envelope errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from visto.data.tokenizer import Tokenizer
from visto.data.tool_calls import TOOL_CALL_END, TOOL_CALL_START
from visto.infer.constrain import (
    JSON_STYLE,
    Grammars,
    GrammarUnavailable,
    any_object_grammar,
    plain_strings,
)
from visto.serve.errors import APIError

if TYPE_CHECKING:
    from visto.serve.tools import ToolPlan


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
        return schema
    raise APIError(400, "response_format.type must be 'text', 'json_object' or 'json_schema', "
                   f"got {kind!r}", "response_format.type")  # fmt: skip


def _schema_error(e: Exception) -> APIError:
    return APIError(400, f"the JSON schema could not be compiled into a grammar: {e}",
                    "response_format.json_schema.schema")  # fmt: skip


@dataclass(frozen=True)
class OpenEnded:
    """A compiled grammar of free text (tool calls in it may be), which the budget cuts like
    any text ("length") where the grammar could end, instead of the stop token ending it in
    time as it ends JSON (infer/constrain.py, open_ended)."""

    compiled: Any


class GrammarFactory(Grammars):
    """The engine's grammars for one tokenizer, compiled from OpenAI requests."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: list[int]) -> None:
        try:
            super().__init__(tokenizer, vocab_size, stop_ids)
        except GrammarUnavailable:
            raise APIError(
                501,
                "response_format json_object/json_schema and tool calls need xgrammar on the "
                "server: "
                "pip install --no-deps xgrammar apache-tvm-ffi",
                "response_format",
            ) from None

    def constraint(self, compiled: Any, open_ended: bool = False) -> Any:
        if isinstance(compiled, OpenEnded):
            return super().constraint(compiled.compiled, open_ended=True)
        return super().constraint(compiled, open_ended)

    def fewest_tokens(self, compiled: Any) -> int | None:
        if isinstance(compiled, OpenEnded):
            compiled = compiled.compiled
        return super().fewest_tokens(compiled)

    def compile(self, response_format: dict[str, Any]) -> Any:
        """A compiled grammar for an OpenAI `response_format`, or None for plain text."""
        schema = _response_schema(response_format)
        if schema is None:
            return None
        try:
            return self.compile_json(None if schema == "json_object" else schema)
        except Exception as e:  # xgrammar raises RuntimeError/InvalidJSONError/...
            raise _schema_error(e) from None

    def _answer_grammar(self, response_format: dict[str, Any] | None) -> str | None:
        """The EBNF of a `response_format` answer, to combine with tool calls; None for text."""
        schema = _response_schema(response_format) if response_format else None
        if schema is None:
            return None
        if schema == "json_object":  # an object at the root, as compile's (infer/constrain)
            return str(any_object_grammar(self._xgr))
        try:
            grammar = self._xgr.Grammar.from_json_schema(
                json.dumps(plain_strings(schema)), **JSON_STYLE
            )
            return str(grammar)
        except Exception as e:
            raise _schema_error(e) from None

    def compile_tool_calls(self, plan: ToolPlan, response_format: dict[str, Any] | None = None) -> Any:
        """A grammar for an answer under `plan` (serve/tools.py): with "auto", free text in which
        a `<tool_call>` opens a call of one of the tools, or, with a JSON `response_format`,
        either calls or that JSON; with "required" (or a named tool), calls and nothing else.
        Either way a call's arguments follow its tool's JSON schema. In the last round of a tool
        loop (`plan.final`), free text that never holds `<tool` (no call may begin), or the
        response_format's JSON."""
        from xgrammar.structural_tag import (
            AnyTextFormat,
            GrammarFormat,
            OrFormat,
            StructuralTag,
            TagFormat,
            TagsWithSeparatorFormat,
            TriggeredTagsFormat,
        )

        answer = self._answer_grammar(response_format)
        if plan.final:  # the tool loop's last round: the answer, and no call may begin
            from visto.serve.tools import TOOL_MARKUP

            if answer is not None:
                fmt = GrammarFormat(grammar=answer)
                with self._lock:
                    return self._compiler.compile_structural_tag(StructuralTag(format=fmt))
            fmt = AnyTextFormat(excludes=[TOOL_MARKUP])
            with self._lock:
                return OpenEnded(self._compiler.compile_structural_tag(StructuralTag(format=fmt)))

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
        else:  # free text, which the budget cuts as it cuts text without tools
            fmt = TriggeredTagsFormat(triggers=[TOOL_CALL_START], tags=tags,
                                      stop_after_first=one_call)  # fmt: skip
            with self._lock:
                return OpenEnded(self._compiler.compile_structural_tag(StructuralTag(format=fmt)))
        with self._lock:
            return self._compiler.compile_structural_tag(StructuralTag(format=fmt))
