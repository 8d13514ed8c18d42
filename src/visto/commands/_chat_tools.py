"""`visto chat --tools`: the tool loop (visto.tools.loop) in a terminal conversation.

The model's first answer follows --tool-choice; each call it makes runs on the last image, the
result goes back as a tool turn, and the model answers again (calling at most MAX_TOOL_ROUNDS
times). Calls are decoded under the tools' JSON schemas, with the grammar `visto serve` uses.
Each run is printed as it happens ("tool ocr {...} -> {...}"; with --json, in "tool_runs").

A call that does not fit --max-tokens is never printed or run, as `visto serve` never sends
one (serve.tools.without_cut_call): the answer is the text before it, with finish_reason
"length"; calls that closed before it run (the server sends those), and `cut_call` tells
`visto chat` to say which budget to raise.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
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
    cut_call: bool = field(default=False, init=False)  # a round of the last answer was cut

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
        self.cut_call = False
        reply = self._reply(chat, chat.ask, (question,), args, self.params(params, 0),
                            task=args.task)  # fmt: skip
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
            reply = self._reply(chat, chat.answer_after, (done.result_turns(),), args,
                                self.params(params, round_index))  # fmt: skip
        return reply, runs

    def _reply(self, chat: Any, ask: Any, what: tuple, args: argparse.Namespace, params: Any,
               **kwargs: Any) -> Any:  # fmt: skip
        """One answer, without a call the budget cut; with --stream, its text printed as it
        comes, a call's text held back."""
        from visto.serve.tools import ToolCallStream

        if not (args.stream and not args.json):
            return self._without_cut_call(chat, ask(*what, params=params, **kwargs))
        stream = ask(*what, params=params, stream=True, **kwargs)
        held = ToolCallStream(self._calls_plan())
        for piece in stream:
            print(held.feed(piece), end="", flush=True)
        reply = self._without_cut_call(chat, stream.reply)
        shown = self._without_cut(held.text)[0]
        # a call's text stays held back: its run is printed instead
        calls = parse_tool_calls(shown, set(self.tools.names)) is not None
        tail = "" if calls else shown[held.sent :]
        if tail or held.sent:
            print(tail, flush=True)
        return reply

    def _calls_plan(self) -> Any:
        """The plan a cut call is read with. The chat runs every call its model writes, in
        every round (its tools stay in the conversation, even with --tool-choice none or in
        the last round), so a cut `<tool_call>` is one in every round, never text."""
        return dataclasses.replace(self.plan, mode="auto")

    def _without_cut(self, text: str) -> tuple[str, bool]:
        """(`text` without a call the budget cut, whether there was one): the server's rule."""
        from visto.serve.tools import without_cut_call

        text, cut = without_cut_call(text, self._calls_plan())
        return (text.rstrip(), True) if cut else (text, False)

    def _without_cut_call(self, chat: Any, reply: Any) -> Any:
        """`reply` with a call the budget cut left out (`cut_call` set), finish_reason
        "length", and the conversation holding what is left, as a client's would."""
        from visto.data.sample import Turn
        from visto.tasks.runner import loc_to_text, parse_reply

        raw, cut = self._without_cut(reply.raw)
        if not cut:
            return reply
        self.cut_call = True
        text = loc_to_text(raw, chat.loc_bins)
        size = chat.images[0].size if chat.images else None
        parsed, boxes = parse_reply(text, reply.task, size, chat.loc_bins)
        if chat.turns and chat.turns[-1].role == "assistant":
            chat.turns[-1] = Turn("assistant", raw)
        return dataclasses.replace(reply, text=text, raw=raw, parsed=parsed, boxes=boxes,
                                   finish_reason="length")  # fmt: skip
