"""A chat request's completions in OpenAI's shapes: the whole `chat.completion` body, or the
`chat.completion.chunk` events of a stream (SSE), across the rounds of the server's own tools.

Both read a submitted job's events (("piece", choice, text), ("done", completions),
("error", exc); batching.py) through the server (server.py), which stops, accounts and
releases; the routes (app.py) only choose between them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from visto.data.tokenizer import LocText, loc_to_text
from visto.serve.batching import Job
from visto.serve.errors import APIError
from visto.serve.rounds import ChatRound
from visto.serve.schemas import ChatCompletionRequest
from visto.serve.server import Server
from visto.serve.tools import ToolCallStream, ToolPlan, answer_message


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


def completion_body(server: Server, body: ChatCompletionRequest, completions: list[Any],
                    prompt_tokens: int, generated: int, plan: ToolPlan | None = None,
                    tool_runs: list[dict[str, Any]] | None = None,
                    quoted: bool = False) -> dict[str, Any]:  # fmt: skip
    choices = [_choice(server, i, c, plan, quoted) for i, c in enumerate(completions)]
    if server.models.tools is not None:
        # visto's extension: the server's own tools that ran, with their results, in order
        choices[0]["tool_runs"] = tool_runs or []
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": _usage(prompt_tokens, generated),
    }


def _choice(server: Server, i: int, completion: Any, plan: ToolPlan | None,
            quoted: bool) -> dict[str, Any]:  # fmt: skip
    message, finish_reason = answer_message(completion.text, completion.finish_reason, plan)
    if message["content"]:
        message["content"] = loc_to_text(message["content"], server.loc_bins)
    return {"index": i, "message": message, "finish_reason": finish_reason, "logprobs": None,
            # visto's extensions: boxes in the answer, [x1, y1, x2, y2] in 0..999, and
            # whether the answer quotes tool results (--quote-results; rounds.py)
            "boxes": server.boxes(message["content"] or ""), "quoted": quoted}  # fmt: skip


async def stream_chat(server: Server, job: Job, body: ChatCompletionRequest, ready: ChatRound,
                      start: float) -> AsyncIterator[str]:
    """OpenAI's chat.completion.chunk events, then `data: [DONE]`. When the answer calls the
    server's own tools, a chunk reports their runs (`tool_runs`) and the next round's
    answer streams on in the same choice."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    finished = False
    prompt_tokens = generated = rounds = 0

    def call_streams(plan: ToolPlan | None) -> list[ToolCallStream] | None:
        # With tools, a call's text is held back and sent as tool_calls deltas at the end.
        return [ToolCallStream(plan) for _ in range(body.n)] if plan and plan.calls else None

    calls = call_streams(ready.plan)
    texts = [LocText(server.loc_bins) for _ in range(body.n)]  # location tokens as boxes

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> str:
        data: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk",
                                "created": created, "model": body.model,
                                "system_fingerprint": None, "choices": choices}
        if include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        for i in range(body.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        while True:
            remaining = job.deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                event = await asyncio.wait_for(job.events.get(), remaining)
            except asyncio.TimeoutError:
                server.stop(job, "timeout")
                yield f"data: {json.dumps(server.timeout_error().body())}\n\n"
                break
            if event[0] == "piece":
                _, i, text = event
                text = texts[i].feed(calls[i].feed(text) if calls else text)
                if text:
                    yield chunk([{"index": i, "delta": {"content": text}, "logprobs": None,
                                  "finish_reason": None}])
            elif event[0] == "done":
                completions = event[1]
                generated += server.account(job, ready.prompt_tokens, completions, start)
                prompt_tokens += ready.prompt_tokens
                done = await run_in_threadpool(server.run_server_tools, ready, completions[0].text)
                if done is not None:
                    yield chunk([{"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": None, "tool_runs": done.report()}])
                if done is not None and not done.cut:
                    rounds += 1
                    try:
                        ready = await run_in_threadpool(server.next_round, body, ready, done,
                                                        rounds)  # fmt: skip
                    except APIError as e:  # e.g. the results outgrew the context
                        yield f"data: {json.dumps(e.body())}\n\n"
                        break
                    job = server.submit(ready.prompts, ready.params, job.deadline)
                    calls = call_streams(ready.plan)
                    texts = [LocText(server.loc_bins) for _ in range(body.n)]
                    continue
                for i, c in enumerate(completions):
                    for choice in _choice_end(server, i, c, calls[i] if calls else None,
                                              texts[i], ready.plan, ready.quoted):  # fmt: skip
                        yield chunk([choice])
                if include_usage:
                    yield chunk([], _usage(prompt_tokens, generated))
                break
            else:
                err = server.engine_error(event[1])
                yield f"data: {json.dumps(err.body())}\n\n"
                break
        finished = True
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away mid-stream
            server.stop(job, "client_disconnected")
        server.release()


def _choice_end(server: Server, i: int, completion: Any, call: ToolCallStream | None,
                text: LocText, plan: ToolPlan | None, quoted: bool) -> list[dict[str, Any]]:  # fmt: skip
    """The last chunks of choice `i`: the text held back, its tool calls, its finish reason
    (with visto's `boxes` and `quoted`, as the whole answer's choice has them)."""
    finish_reason, content, deltas, held = completion.finish_reason, completion.text, [], ""
    if call is not None:
        held, deltas, finish_reason = call.finish(completion.finish_reason)
        content = answer_message(completion.text, completion.finish_reason, plan)[0]["content"]
    ends = []
    rest = text.feed(held) + text.finish()
    if rest:
        ends.append({"index": i, "delta": {"content": rest}, "logprobs": None,
                     "finish_reason": None})  # fmt: skip
    for delta in deltas:
        ends.append({"index": i, "delta": {"tool_calls": [delta]}, "logprobs": None,
                     "finish_reason": None})  # fmt: skip
    ends.append({"index": i, "delta": {}, "logprobs": None, "finish_reason": finish_reason,
                 "boxes": server.boxes(content or ""), "quoted": quoted})  # fmt: skip
    return ends


async def whole_chat(server: Server, body: ChatCompletionRequest, request: Request,
                     ready: ChatRound, job: Job, start: float,
                     deadline: float) -> dict[str, Any]:  # fmt: skip
    """A non-streamed answer: one round, or more while the answer calls the server's own tools."""
    prompt_tokens = generated = rounds = 0
    tool_runs: list[dict[str, Any]] = []
    while True:
        completions = await server.wait_done(job, request)
        generated += server.account(job, ready.prompt_tokens, completions, start)
        prompt_tokens += ready.prompt_tokens
        done = await run_in_threadpool(server.run_server_tools, ready, completions[0].text)
        if done is None:
            break
        tool_runs += done.report()
        if done.cut:  # a call after those that ran was cut: the answer ends ("length")
            break
        rounds += 1
        ready = await run_in_threadpool(server.next_round, body, ready, done, rounds)
        job = server.submit(ready.prompts, ready.params, deadline)
    return completion_body(server, body, completions, prompt_tokens, generated, ready.plan,
                           tool_runs, ready.quoted)  # fmt: skip


__all__ = ["completion_body", "stream_chat", "whole_chat"]
