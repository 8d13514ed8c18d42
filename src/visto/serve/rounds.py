"""A chat request as rounds of generation: what it asks is checked, its messages encoded into
prompts (one per choice) with their sampling params, and, when an answer calls the server's
own tools (--tools), the next round built from the calls and their results.

    ready = first_round(chat, body, settings, tools, grammars)   # in a worker thread
    done = server_tools(ready, text, tools)            # None (or done.cut): the answer is final
    ready = next_round(chat, body, ready, done, index, settings, grammars)

An answer that follows tool results (the client's `role: tool` messages at the end of the
request, or the server's own tools' results in the next round) quotes their text under
--quote-results (`quote_words`, visto.tools.quote, as `visto chat` does): it is made of the
results' words, decoded under `QuoteConstraint`, with no call after it. "auto" quotes for the
OCR task, a request whose question is the prompt `visto chat --task ocr` asks ("Read all the
text in the image."); "always" for any question; "never" leaves the model's own answer. Only
where the answer may be plain text: not under a required or named tool_choice, a JSON
response_format or ignore_eos, and only results that hold text.

Nothing here knows HTTP beyond raising `APIError`s; the server (server.py) runs the rounds
and the answers (answers.py) write them out.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from visto.data.sample import Sample
from visto.data.tool_calls import with_tools
from visto.serve.content import messages_to_turns
from visto.serve.errors import APIError
from visto.serve.schemas import MAX_SEED, ChatCompletionRequest, Message, TextPart
from visto.serve.tools import ToolPlan, tool_plan, without_cut_call
from visto.tasks import ocr
from visto.tasks.runner import NO_CUT
from visto.tools.loop import ToolRound, run_tool_calls
from visto.tools.registry import ToolResult

if TYPE_CHECKING:
    from visto.serve.grammar import GrammarFactory

# The grammar factory is built on first use (compiling needs the tokenizer's vocabulary).
Grammars = Callable[[], "GrammarFactory"]
# `chat` is the server's ChatModel and `settings` its ServeSettings (server.py, which calls
# this module: typed loosely here so that the import goes one way).
ChatModel = ServeSettings = Any


@dataclass
class ChatRound:
    """What one generation of a chat request needs: the prompts (one per choice), their
    sampling params, and the tool plan its answers are read with. A request whose answer calls
    the server's own tools (--tools) has several rounds (visto.tools.loop)."""

    prompts: list[Any]
    params: list[Any]
    prompt_tokens: int
    plan: ToolPlan | None
    turns: list[Any]  # the conversation, for the tool loop's next round
    images: list[Any]
    # whether the answers are decoded as a quote of tool results (--quote-results): the
    # choice's `quoted` field (answers.py)
    quoted: bool = False


def check_supported(body: ChatCompletionRequest, plan: ToolPlan | None, max_n: int) -> None:
    """400 for what this server does not do, before any work."""
    if plan is not None and plan.server_run and plan.calls and body.n > 1:
        raise APIError(400, "with the server's own tools (--tools) a request has one choice: "
                       "send n 1 (or tool_choice none)", "n")  # fmt: skip
    if body.logprobs:
        raise APIError(400, "logprobs are not supported", "logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported (only 0)", name)
    if body.n > max_n:
        raise APIError(400, f"n is {body.n}; this server allows at most {max_n}", "n")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop takes up to 4 non-empty strings", "stop")
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
        raise APIError(400, "response_format json_schema needs a json_schema object "
                       '{"name": ..., "schema": {...}}', "response_format.json_schema")


def first_round(chat: ChatModel, body: ChatCompletionRequest, settings: ServeSettings,
                tools: Any, grammars: Grammars) -> ChatRound:  # fmt: skip
    """The request's first round: its messages (with the tools it is offered) as prompts."""
    plan = tool_plan(body, tools.openai() if tools is not None else [])
    check_supported(body, plan, settings.max_n)
    loc_bins = chat.processor.tokenizer.loc_bins
    turns, images = messages_to_turns(body.messages, settings.images, loc_bins)
    turns = with_tools(turns, plan.offered if plan else None)
    if images and not chat.accepts_images:
        raise APIError(400, f"the model {chat.name!r} reads text only; send no image_url parts",
                       "messages", "images_not_supported")
    # an answer to the client's tool results (its tool loop) quotes them (module doc)
    words = quote_words(body, plan, client_tool_results(body.messages), settings)
    return encode_round(chat, body, turns, images, quoting(plan) if words else plan, settings,
                        grammars, words)  # fmt: skip


def server_tools(ready: ChatRound, text: str, tools: Any) -> ToolRound | None:
    """Runs the server's own tools that `text` calls on the latest image; None when it calls
    none of them (the answer is final). When a call after them was cut by the budget
    (serve/tools.py), they run but the answer is final as well: the round comes back `cut`."""
    if tools is None or ready.plan is None or not ready.plan.calls or ready.plan.final:
        return None
    text, cut = without_cut_call(text, ready.plan)
    done = run_tool_calls(text, tools, ready.images[-1] if ready.images else None)
    return dataclasses.replace(done, cut=True) if done is not None and cut else done


def next_round(chat: ChatModel, body: ChatCompletionRequest, ready: ChatRound, done: ToolRound,
               index: int, settings: ServeSettings, grammars: Grammars) -> ChatRound:  # fmt: skip
    """Round `index` of the tool loop: the conversation with the calls and their results."""
    assert ready.plan is not None
    plan = ready.plan.after_tool_round(index)
    words = quote_words(body, plan, done.results, settings)  # the answer quotes them (module doc)
    return encode_round(chat, body, [*ready.turns, *done.turns()], ready.images,
                        quoting(plan) if words else plan, settings, grammars, words)  # fmt: skip


# ----------------------------------------------------------------------------- quoting


def client_tool_results(messages: list[Message]) -> list[ToolResult]:
    """The results of the client's tool messages that end the conversation (the answer follows
    them), as visto's tools write theirs: content that is a JSON object is the result's output
    (an {"error": ...} one failed); any other content is a result whose "text" it is."""
    results = []
    for message in reversed(messages):
        if message.role != "tool":
            break
        content = message.content
        if not isinstance(content, str):  # text parts (content.py refuses others)
            content = "\n".join(p.text for p in content or [] if isinstance(p, TextPart))
        try:
            output = json.loads(content)
        except ValueError:
            output = None
        if not isinstance(output, dict):
            output = {"text": content}
        results.append(ToolResult("client", {}, output, ok="error" not in output))
    return results[::-1]


def question_task(messages: list[Message]) -> str | None:
    """"ocr" when the last user message asks what `visto chat --task ocr` asks (the OCR task's
    prompt, beside its images; case and spacing aside), else None: a free question."""
    for message in reversed(messages):
        if message.role == "user":
            content = message.content
            if not isinstance(content, str):
                content = " ".join(p.text for p in content or [] if isinstance(p, TextPart))
            said = " ".join(content.split()).lower()
            return "ocr" if said == " ".join(ocr.PROMPT.split()).lower() else None
    return None


def quote_words(body: ChatCompletionRequest, plan: ToolPlan | None, results: list[ToolResult],
                settings: ServeSettings) -> list[str]:  # fmt: skip
    """The words the answer after `results` quotes under --quote-results (module doc); [] when
    it does not quote: not asked, the answer must call (`plan`: required or named) or be JSON
    (response_format), eos is ignored (no stop to end the quote), or no result holds text."""
    from visto.tools.quote import quoted_words, quotes

    if not results or not quotes(settings.quote_results, question_task(body.messages)):
        return []
    fmt = body.response_format
    if (plan is not None and plan.mode == "required") or body.ignore_eos or (
        fmt is not None and fmt.type != "text"
    ):
        return []
    return quoted_words(results)


def quoting(plan: ToolPlan | None) -> ToolPlan | None:
    """The plan of a quoted answer: text, no call (the tools stay in the prompt as they were)."""
    return None if plan is None else dataclasses.replace(plan, mode="none", callable=())


# ----------------------------------------------------------------------------- encoding


def encode_round(chat: ChatModel, body: ChatCompletionRequest, turns: list[Any],
                 images: list[Any], plan: ToolPlan | None, settings: ServeSettings,
                 grammars: Grammars, quote: list[str] = ()) -> ChatRound:  # fmt: skip
    """The prompts of `turns`, checked against the context, and each choice's params; with
    `quote`, each choice's answer is made of those words (visto.tools.quote)."""
    try:  # not cut at the processor's max_length (training's): the context decides
        encoded = chat.processor.encode(Sample("request", images, turns), max_length=NO_CUT,
                                        train=False)  # fmt: skip
    except ValueError as e:  # the processor's own consistency checks
        raise APIError(400, str(e), "messages") from None
    prompt_tokens = int(encoded.input_ids.shape[0])
    max_new = _max_new_tokens(chat, body, prompt_tokens, settings.default_max_tokens)
    compiled = _compiled_grammar(body, plan, max_new, grammars)
    params = _sampling_params(body, max_new, compiled, grammars)
    if quote:
        from visto.tools.quote import QuoteConstraint

        tokenizer = chat.processor.tokenizer  # one constraint per answer (it reads its ids)
        params = [dataclasses.replace(p, logits_processor=QuoteConstraint(
            tokenizer, quote, [tokenizer.end_id])) for p in params]  # fmt: skip
    return ChatRound([encoded] * body.n, params, prompt_tokens, plan, turns, images,
                     quoted=bool(quote))  # fmt: skip


def _max_new_tokens(chat: ChatModel, body: ChatCompletionRequest, prompt_tokens: int,
                    default: int) -> int:  # fmt: skip
    room = chat.context_length - prompt_tokens
    # OpenAI's words and code, which clients (LangChain) recognise
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {chat.context_length} "
                       f"tokens (GET /v1/models: context_length). However, your messages "
                       f"resulted in {prompt_tokens} tokens (images included). Please reduce "
                       "the length of the messages.", "messages", "context_length_exceeded")
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > room:
        raise APIError(400, f"This model's maximum context length is {chat.context_length} "
                       f"tokens. However, you requested {prompt_tokens + asked} tokens "
                       f"({prompt_tokens} in the messages, {asked} in the completion). Please "
                       f"reduce the length of the messages or completion (max_tokens at most "
                       f"{room}).", "max_tokens", "context_length_exceeded")  # fmt: skip
    return asked or min(default, room)


def _compiled_grammar(body: ChatCompletionRequest, plan: ToolPlan | None, max_new: int,
                      grammars: Grammars) -> Any:  # fmt: skip
    """The grammar the answer decodes under (tool calls, response_format), or None."""
    compiled = None
    fmt = body.response_format
    fmt = fmt.model_dump(by_alias=True, exclude_none=True) if fmt is not None else None
    if plan is not None and plan.calls:  # calls decode under their tools' schemas
        # the answer: calls, or (auto) the response_format's JSON (or free text)
        compiled = grammars().compile_tool_calls(plan, fmt)
    elif fmt is not None and fmt["type"] != "text":
        compiled = grammars().compile(fmt)
    if compiled is not None:
        # the answer closes within max_tokens (infer/constrain.py), given room to close at all
        fewest = grammars().fewest_tokens(compiled)
        if fewest is not None and max_new < fewest:
            raise APIError(400, f"max_tokens {max_new} is too few for this answer's grammar "
                           f"(response_format or tool calls): closing it takes {fewest} "
                           "tokens; ask for more", "max_tokens")  # fmt: skip
    return compiled


def _sampling_params(body: ChatCompletionRequest, max_new: int, compiled: Any,
                     grammars: Grammars) -> list[Any]:  # fmt: skip
    from visto.infer import SamplingParams

    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = []
    for choice in range(body.n):
        constraint = grammars().constraint(compiled) if compiled is not None else None
        params.append(SamplingParams(
            max_new_tokens=max_new,
            # visto's small models answer best greedily: temperature defaults to 0.
            temperature=body.temperature or 0.0,
            top_p=body.top_p if body.top_p is not None else 1.0,
            stop=tuple(stops),
            # n choices of one seeded request differ, and each is reproducible.
            seed=None if body.seed is None else (body.seed + choice) % (MAX_SEED + 1),
            ignore_eos=body.ignore_eos,  # eos neither ends nor is chosen (batched, fast)
            logits_processor=constraint,
        ))
    return params
