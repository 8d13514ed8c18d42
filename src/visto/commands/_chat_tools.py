"""`visto chat --tools`: the tool loop (visto.tools.loop) in a terminal conversation.

The model's first answer follows --tool-choice; each call it makes runs on the last image, the
result goes back as a tool turn, and the model answers again (calling at most MAX_TOOL_ROUNDS
times). Calls are decoded under the tools' JSON schemas, with the grammar `visto serve` uses.
Each run is printed as it happens ("tool ocr {...} -> {...}"; with --json, in "tool_runs").
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from visto.data.tool_calls import compact_json, parse_tool_calls
from visto.errors import UserError
from visto.tools import ToolRegistry, load_tools
from visto.tools.loop import MAX_TOOL_ROUNDS, run_tool_calls


@dataclass
class ToolLoop:
    tools: ToolRegistry
    plan: Any  # visto.serve.tools.ToolPlan of the first answer
    grammars: Any  # visto.serve.grammar.GrammarFactory

    @classmethod
    def build(cls, model: Any, spec: str, choice: str) -> ToolLoop:
        from visto.serve.errors import APIError
        from visto.serve.grammar import GrammarFactory
        from visto.serve.tools import CHOICES, ToolPlan
        from visto.tasks.runner import logits_width, processor_of

        tools = load_tools(spec)
        if choice not in (*CHOICES, *tools.names):
            raise UserError(f"--tool-choice {choice!r}: give auto, required, none or one of the "
                            f"tools: {', '.join(tools.names)}")  # fmt: skip
        named = choice in tools.names
        plan = ToolPlan(
            offered=tools.openai(),
            parameters={n: tools.get(n).parameters for n in tools.names},
            mode="required" if named else choice,
            callable=(choice,) if named else tuple(tools.names),
            parallel=True,
            server_run=frozenset(tools.names),  # visto runs every call itself
        )
        tokenizer = processor_of(model).tokenizer
        try:
            grammars = GrammarFactory(tokenizer, logits_width(model), [tokenizer.end_id])
        except APIError as e:  # xgrammar is not installed
            raise UserError(e.message) from None
        return cls(tools, plan, grammars)

    def params(self, base: Any, round_index: int) -> Any:
        """`base` sampling params with the grammar of round `round_index`'s tool choice."""
        plan = self.plan if round_index == 0 else self.plan.after_tool_round(round_index)
        if not plan.calls:
            return base
        try:
            compiled = self.grammars.compile_tool_calls(plan)
        except Exception as e:  # APIError: a tool's schema does not compile
            raise UserError(getattr(e, "message", str(e))) from None
        return dataclasses.replace(base, logits_processor=self.grammars.constraint(compiled))

    def answer(
        self, chat: Any, question: str, args: argparse.Namespace, params: Any, images: list
    ) -> tuple[Any, list[dict[str, Any]]]:
        """The model's final answer to `question` and the tool runs it took (printed as they
        happen unless --json)."""
        image = images[-1] if images else None
        reply = self._reply(chat.ask, (question,), args, self.params(params, 0), task=args.task)
        runs: list[dict[str, Any]] = []
        for round_index in range(1, MAX_TOOL_ROUNDS + 1):
            done = run_tool_calls(reply.raw, self.tools, image)
            if done is None:
                break
            for run in done.report():
                runs.append(run)
                if not args.json:
                    print(f"tool {run['name']} {run['arguments']} -> {compact_json(run['result'])}",
                          flush=True)  # fmt: skip
            reply = self._reply(chat.answer_after, (done.result_turns(),), args,
                                self.params(params, round_index))  # fmt: skip
        return reply, runs

    def _reply(self, ask: Any, what: tuple, args: argparse.Namespace, params: Any,
               **kwargs: Any) -> Any:  # fmt: skip
        """One answer; with --stream, its text printed as it comes, a call's text held back."""
        from visto.serve.tools import ToolCallStream

        if not (args.stream and not args.json):
            return ask(*what, params=params, **kwargs)
        stream = ask(*what, params=params, stream=True, **kwargs)
        held = ToolCallStream(self.plan)
        for piece in stream:
            print(held.feed(piece), end="", flush=True)
        # a call's text stays held back: its run is printed instead
        calls = parse_tool_calls(stream.reply.raw, set(self.tools.names)) is not None
        tail = "" if calls else held.text[held.sent :]
        if tail or held.sent:
            print(tail, flush=True)
        return stream.reply
