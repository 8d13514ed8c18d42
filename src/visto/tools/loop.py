"""The tool loop, without the model: read the calls in an answer, run them, hand back the turns.

    round = run_tool_calls(answer_text, tools, image)    # None: the answer calls no tool of ours
    turns += round.turns()                               # the calls, then their results
    choice = round_choice("required", k)                 # what the model may do in round k

`visto chat --tools` and `visto serve --tools` both drive it: the model answers, visto runs the
experts it called on the conversation's latest image, the results go back as tool turns, and the
model answers again, until it answers without a call. Round 0 follows the asked tool_choice;
later rounds may call (auto), and the last one may not, so the loop always ends.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from PIL import Image

from visto.data.sample import Turn
from visto.data.tool_calls import ParsedCall, assistant_turn, parse_tool_calls, tool_result_turn
from visto.tools.registry import ToolRegistry, ToolResult

MAX_TOOL_ROUNDS = 3  # rounds of calls per answer; the answer after the last may not call


@dataclass(frozen=True)
class ToolRound:
    content: str  # what the model wrote beside its calls
    calls: list[ParsedCall]
    results: list[ToolResult]
    cut: bool = False  # a call after these was cut by the token budget: the answer ends here

    def turns(self) -> list[Turn]:
        """The model's turn with its calls, then one result turn per call."""
        calls = [(c.name, c.arguments) for c in self.calls]
        return [assistant_turn(self.content, calls), *self.result_turns()]

    def result_turns(self) -> list[Turn]:
        return [tool_result_turn(r.text) for r in self.results]

    def report(self) -> list[dict[str, Any]]:
        """The calls and results as JSON (visto's `tool_runs`, the CLI's --json); a result's
        files (a mask PNG) as data URLs under "files", which the model never reads."""
        runs = []
        for c, r in zip(self.calls, self.results, strict=True):
            run = {"name": r.name, "arguments": c.arguments, "result": r.output, "ok": r.ok}
            if r.files:
                run["files"] = {name: data_url(name, data) for name, data in r.files.items()}
            runs.append(run)
        return runs


def data_url(name: str, data: bytes) -> str:
    """A file as a data: URL (PNG by its name, else plain bytes)."""
    kind = "image/png" if name.lower().endswith(".png") else "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def run_tool_calls(text: str, tools: ToolRegistry, image: Image.Image | None) -> ToolRound | None:
    """Run the calls of `tools` in a model's answer on `image`; None when it makes none."""
    parsed = parse_tool_calls(text, set(tools.names))
    if parsed is None:
        return None
    content, calls = parsed
    return ToolRound(content, calls, [tools.run(c.name, c.arguments, image) for c in calls])


def round_choice(asked: str | dict[str, Any], round_index: int) -> str | dict[str, Any]:
    """The tool_choice of round `round_index` (0 = the first answer) of one answer's loop."""
    if round_index == 0:
        return asked
    return "auto" if round_index < MAX_TOOL_ROUNDS else "none"
