"""`visto chat --tools`: the tool loop (visto.tools.loop) in a terminal conversation.

The model's first answer follows --tool-choice; each call it makes runs on the last image, the
result goes back as a tool turn, and the model answers again (calling at most MAX_TOOL_ROUNDS
times). Calls are decoded under the tools' JSON schemas, with the grammar `visto serve` uses.
Each run is printed as it happens ("tool ocr {...} -> {...}"; with --json, in "tool_runs").

Each round is read with its own plan (serve.tools.ToolPlan, as `visto serve` reads it): round
0 follows --tool-choice ("none": the answer is text, no call is read or run), later rounds may
call, and the last one cannot (its grammar lets no `<tool` begin, `ToolPlan.final`).

A call that does not fit --max-tokens is never printed or run, as `visto serve` never sends
one (serve.tools.without_cut_call): the calls that closed before it run and the answer ends
there, as the server's does (serve/answers.py, `ToolRound.cut`): its text is what the model
wrote outside the calls, with finish_reason "length", and `cut_call` tells `visto chat` to say
which budget to raise. The last round cannot call, so a `<` the budget cut it at is only text
cut short (dropped, as the server drops it): finish_reason "length", no call cut.

The tools' processes (OCR, segment and detect) start before the chat model loads
(`start_tools`), in the background, so the first call finds its expert loaded; `visto chat`
stops them when it ends (visto.tools.registry: ToolRegistry.start / stop).

`ToolLoop.build(..., quote=True)` (`visto chat --quote-results`, visto.tools.quote.quotes;
Python callers such as bench/tool_use.py) decodes the answer after a result that holds text (the OCR tool's) under
`visto.tools.quote.QuoteConstraint`: the answer is made of the result's words and is the final
one (no call after it). For a model that cannot copy from its context (the quickstart's), the
copy from the tool's text happens at decoding time; the model still picks the words and their
order.
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


def start_tools(spec: str, choice: str, task: str | None) -> ToolRegistry:
    """The tools of --tools, checked with --tool-choice and --task, their processes started
    in the background (ToolRegistry.start) unless no call can run: the caller stops them
    (ToolRegistry.stop)."""
    if task in ("detect", "extract"):
        raise UserError(f"--tools and --task {task} do not mix: both constrain the answer's "
                        "form; leave out one")  # fmt: skip
    tools = load_tools(spec)
    check_choice(tools, choice)
    if choice != "none":  # "none": no call is read or run (the tools are only offered)
        tools.start()
    return tools


def check_choice(tools: ToolRegistry, choice: str) -> None:
    from visto.serve.tools import CHOICES

    if choice not in (*CHOICES, *tools.names):
        raise UserError(f"--tool-choice {choice!r}: give auto, required, none or one of the "
                        f"tools: {', '.join(tools.names)}")  # fmt: skip


@dataclass
class ToolLoop:
    tools: ToolRegistry
    plan: Any  # visto.serve.tools.ToolPlan of the first answer
    grammars: Any  # visto.serve.grammar.GrammarFactory
    tokenizer: Any = None  # the model's (QuoteConstraint encodes the quoted words with it)
    quote: bool = False  # the answer after a result with text quotes its words (module doc)
    cut_call: bool = field(default=False, init=False)  # a round of the last answer was cut
    _after_runs: str = field(default="", init=False)  # --stream: text to print after the runs

    @classmethod
    def build(cls, model: Any, tools: ToolRegistry | str, choice: str,
              quote: bool = False) -> ToolLoop:  # fmt: skip
        """The loop over `tools` (a registry, or a --tools spec to load); `quote`: answers
        after a result with text quote its words (module doc)."""
        from visto.serve.errors import APIError
        from visto.serve.grammar import GrammarFactory
        from visto.serve.tools import ToolPlan
        from visto.tasks.runner import logits_width, processor_of

        if isinstance(tools, str):
            tools = load_tools(tools)
        check_choice(tools, choice)
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
        return cls(tools, plan, grammars, tokenizer, quote)

    def round_plan(self, round_index: int) -> Any:
        """The ToolPlan of round `round_index` (0: the first answer, per --tool-choice)."""
        return self.plan if round_index == 0 else self.plan.after_tool_round(round_index)

    def params(self, base: Any, plan: Any) -> Any:
        """`base` sampling params with the grammar of a round under `plan`."""
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
        self.cut_call, self._after_runs = False, ""
        plan = self.round_plan(0)
        reply = self._reply(chat, chat.ask, (question,), args, plan, self.params(params, plan),
                            task=args.task)  # fmt: skip
        runs: list[dict[str, Any]] = []
        for round_index in range(1, MAX_TOOL_ROUNDS + 1):
            # the server's rule (serve.rounds.server_tools): only a round that may call runs calls
            done = None if not plan.calls or plan.final else run_tool_calls(reply.raw, self.tools,
                                                                             image)  # fmt: skip
            if done is None:
                break
            for run in done.report():
                runs.append(run)
                if not args.json:
                    print(f"tool {run['name']} {run['arguments']} -> {compact_json(run['result'])}",
                          flush=True)  # fmt: skip
            if self.cut_call:  # a call after these was cut: the answer ends here ("length")
                if self._after_runs:  # --stream: the rest of the answer's text
                    print(self._after_runs, flush=True)
                chat.turns = [*chat.turns, *done.result_turns()]
                return self._with_raw(chat, reply, done.content.strip()), runs
            plan = self.round_plan(round_index)
            round_params = self.params(params, plan)
            if self.quote:  # the answer quotes the result's words and ends the loop
                from visto.tools.quote import QuoteConstraint, quoted_words  # torch: only here

                if words := quoted_words(done.results):
                    plan = dataclasses.replace(self.plan, mode="none", callable=())
                    constraint = QuoteConstraint(self.tokenizer, words, [self.tokenizer.end_id])
                    round_params = dataclasses.replace(params, logits_processor=constraint)
            reply = self._reply(chat, chat.answer_after, (done.result_turns(),), args, plan,
                                round_params)  # fmt: skip
        return reply, runs

    def _reply(self, chat: Any, ask: Any, what: tuple, args: argparse.Namespace, plan: Any,
               params: Any, **kwargs: Any) -> Any:  # fmt: skip
        """One answer under `plan`, without a call the budget cut; with --stream, its text
        printed as it comes, a call's text held back."""
        from visto.serve.tools import ToolCallStream

        if not (args.stream and not args.json):
            return self._without_cut_call(chat, ask(*what, params=params, **kwargs), plan)
        stream = ask(*what, params=params, stream=True, **kwargs)
        held = ToolCallStream(plan)
        for piece in stream:
            print(held.feed(piece), end="", flush=True)
        reply = self._without_cut_call(chat, stream.reply, plan)
        # the text outside the calls (the server's own, as all of chat's are, are left out)
        tail = held.finish(reply.finish_reason)[0].rstrip()
        if plan.calls and parse_tool_calls(reply.raw, set(self.tools.names)) is not None:
            # a call's text stays held back: its run is printed instead, and where a call
            # after them was cut, the answer ends with the rest of its text after the runs
            self._after_runs, tail = (tail if self.cut_call else ""), ""
        if tail or held.sent:
            print(tail, flush=True)
        return reply

    def _without_cut_call(self, chat: Any, reply: Any, plan: Any) -> Any:
        """`reply` with what the budget cut of a call left out (the server's rule,
        serve.tools.without_cut_call, under the round's own `plan`), finish_reason "length",
        and the conversation holding what is left, as a client's would. `cut_call` is set
        where a call was cut; in the last round, which cannot call, a cut `<` is only text."""
        from visto.data.sample import Turn
        from visto.serve.tools import without_cut_call

        raw, cut = without_cut_call(reply.raw, plan)
        if not cut:
            return reply
        raw = raw.rstrip()
        self.cut_call = not plan.final
        if chat.turns and chat.turns[-1].role == "assistant":
            chat.turns[-1] = Turn("assistant", raw)
        return self._with_raw(chat, reply, raw)

    @staticmethod
    def _with_raw(chat: Any, reply: Any, raw: str) -> Any:
        """`reply` with `raw` for its text, cut by the budget (finish_reason "length")."""
        from visto.tasks.runner import loc_to_text, parse_reply

        text = loc_to_text(raw, chat.loc_bins)
        size = chat.images[0].size if chat.images else None
        parsed, boxes = parse_reply(text, reply.task, size, chat.loc_bins)
        return dataclasses.replace(reply, text=text, raw=raw, parsed=parsed, boxes=boxes,
                                   finish_reason="length")  # fmt: skip
