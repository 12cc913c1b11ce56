"""OpenAI response shapes for the completion routes: a request's choices submitted to the engine, then
collected into one JSON response or streamed as server-sent events, with usage, logprobs and metrics."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine import RequestFailed, StepOutput
from .engine_client import EngineClient
from .protocol import MAX_CHOICES, APIError
from .tools import parse_tool_calls

if TYPE_CHECKING:
    from .app import ServerState


@dataclass
class Choice:
    """One generated sequence of a response, as it accumulates."""

    index: int
    request_id: str
    outputs: asyncio.Queue
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[str, Any]] = field(default_factory=list)  # (token text, TokenLogprobs)
    finish_reason: str | None = None


async def respond(request: Request, engine: EngineClient, state: ServerState, body, prompts: list[list[int]],
                   chat: bool, logprobs: int | None, tool_calls: str | None = None) -> Response:
    """tool_calls: None (no tools), "auto" (replies parsed for calls) or "forced" (each reply is one call)."""
    context = engine.limits.max_seq_len
    asked = body.requested_max_tokens()
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={body.n} is more than {MAX_CHOICES} choices in one request",
                       "prompt" if len(prompts) > 1 else "n")
    choices: list[Choice] = []
    try:
        for p, ids in enumerate(prompts):
            max_tokens = asked if asked is not None else (max(context - len(ids), 1) if chat else 16)
            for i in range(body.n):
                params = body.sampling_params(max_tokens, logprobs, seed_offset=i)
                try:
                    engine.limits.check(ids, params)
                except ValueError as err:
                    raise APIError(400, str(err), "messages" if chat else "prompt",
                                   code="context_length_exceeded" if "context" in str(err) else None) from None
                if params.guided:  # the schema, regex or choices compile (cached: the engine compiles them again)
                    try:
                        state.guided_decoding(engine.limits.vocab_size).grammar(params)
                    except ValueError as err:
                        raise APIError(400, str(err), body.guided_field()) from None
                try:
                    request_id, outputs = engine.submit(ids, params)
                except RequestFailed as err:  # the engine process died since ready() looked
                    raise APIError(503, str(err), kind="service_unavailable") from None
                choices.append(Choice(len(choices), request_id, outputs))
    except APIError:
        for choice in choices:
            engine.abort(choice.request_id)
        raise
    state.metrics.prompt_tokens.inc(sum(len(ids) for ids in prompts))
    response_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    usage = lambda: {"prompt_tokens": sum(len(ids) for ids in prompts),  # noqa: E731
                     "completion_tokens": sum(len(c.token_ids) for c in choices),
                     "total_tokens": sum(len(ids) for ids in prompts) + sum(len(c.token_ids) for c in choices)}
    tokenizer = state.tokenizer

    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(engine, state, choices, chat, response_id, created, usage, include_usage,
                                         logprobs is not None, tokenizer, tool_calls),
                                 media_type="text/event-stream")

    collector = asyncio.ensure_future(_collect_all(state, choices))
    try:
        while not collector.done():
            await asyncio.wait({collector}, timeout=0.25)
            if not collector.done() and await request.is_disconnected():
                collector.cancel()
                state.metrics.requests.labels("aborted").inc(len(choices))
                return Response(status_code=499)
        try:
            collector.result()
        except APIError:
            state.metrics.requests.labels("failed").inc(len(choices))
            raise
    finally:
        for choice in choices:
            if choice.finish_reason is None:
                engine.abort(choice.request_id)
    state.metrics.requests.labels("finished").inc(len(choices))
    kind = "chat.completion" if chat else "text_completion"
    out_choices = []
    for c in choices:
        lp = _logprobs_json(c.logprobs, chat, tokenizer) if logprobs is not None else None
        if chat:
            message, finish = _assistant_message(c, tool_calls)
            out_choices.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": finish})
        else:
            out_choices.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
    return JSONResponse({"id": response_id, "object": kind, "created": created, "model": state.model_name,
                         "choices": out_choices, "usage": usage()})


def _assistant_message(choice: Choice, tool_calls: str | None) -> tuple[dict[str, Any], str | None]:
    """The reply as OpenAI's assistant message, its tool calls parsed out (finish reason "tool_calls")."""
    if tool_calls is None:
        return {"role": "assistant", "content": choice.text}, choice.finish_reason
    content, calls = parse_tool_calls(choice.text, tool_calls == "forced")
    if not calls:
        return {"role": "assistant", "content": content}, choice.finish_reason
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


async def _next(state: ServerState, choice: Choice, started: float, last: list[float]) -> StepOutput:
    item = await choice.outputs.get()
    if isinstance(item, ValueError):
        raise APIError(400, str(item))
    if isinstance(item, RequestFailed) or isinstance(item, StepOutput) and item.error is not None:
        raise APIError(500, f"the request failed: {item if isinstance(item, RequestFailed) else item.error}",
                       kind="server_error")
    if isinstance(item, BaseException):
        raise APIError(500, f"internal error: {item}", kind="server_error")
    now = time.perf_counter()
    if not choice.token_ids:
        state.metrics.ttft.observe(now - started)
    else:
        state.metrics.itl.observe(now - last[0])
    last[0] = now
    choice.text += item.text
    choice.token_ids += item.token_ids
    if item.logprobs:
        choice.logprobs += [(item.text, lp) for lp in item.logprobs]
    state.metrics.generation_tokens.inc(len(item.token_ids))
    if item.finished:
        choice.finish_reason = "length" if item.finish_reason == "length" else "stop"
    return item


async def _collect_all(state: ServerState, choices: list[Choice]) -> None:
    async def one(choice: Choice) -> None:
        started, last = time.perf_counter(), [0.0]
        while choice.finish_reason is None:
            await _next(state, choice, started, last)

    await asyncio.gather(*(one(c) for c in choices))


async def _stream(engine: EngineClient, state: ServerState, choices: list[Choice], chat: bool, response_id: str,
                  created: int, usage, include_usage: bool, want_logprobs: bool, tokenizer,
                  tool_calls: str | None = None) -> AsyncIterator[str]:
    """With tools, a reply is held until it ends and then sent as one delta: its tool calls (each whole,
    as OpenAI's clients accumulate them) or its text."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    merged: asyncio.Queue = asyncio.Queue(maxsize=4)  # a slow reader's backlog stays in the engine's queues

    async def pump(choice: Choice) -> None:
        started, last = time.perf_counter(), [0.0]
        try:
            while choice.finish_reason is None:
                item = await _next(state, choice, started, last)
                await merged.put((choice, item))
        except APIError as err:
            await merged.put((choice, err))

    def chunk(choice_json: dict) -> str:
        payload = {"id": response_id, "object": kind, "created": created, "model": state.model_name,
                   "choices": [choice_json]}
        if include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n"

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        if chat:
            for c in choices:  # the role comes first, once per choice
                yield chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
        remaining = len(choices)
        while remaining:
            choice, item = await merged.get()
            if isinstance(item, APIError):
                yield f"data: {json.dumps(item.body())}\n\n"
                remaining -= 1
                continue
            finish = choice.finish_reason if item.finished else None
            remaining -= item.finished
            if tool_calls is not None:
                if finish:
                    message, finish = _assistant_message(choice, tool_calls)
                    delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]} \
                        if "tool_calls" in message else {"content": message["content"]}
                    yield chunk({"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": finish})
                continue
            if not item.text and not finish and not want_logprobs:
                continue  # nothing visible yet (a held-back character or stop-string prefix)
            lp = _logprobs_json([(item.text, p) for p in item.logprobs or []], chat, tokenizer) if want_logprobs else None
            if chat:
                delta = {"content": item.text} if item.text else {}
                yield chunk({"index": choice.index, "delta": delta, "logprobs": lp, "finish_reason": finish})
            else:
                yield chunk({"index": choice.index, "text": item.text, "logprobs": lp, "finish_reason": finish})
        state.metrics.requests.labels("finished").inc(len(choices))
        if include_usage:
            yield f"data: {json.dumps({'id': response_id, 'object': kind, 'created': created, 'model': state.model_name, 'choices': [], 'usage': usage()})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): stop what is still running
        for task in tasks:
            task.cancel()
        for c in choices:
            if c.finish_reason is None:
                engine.abort(c.request_id)
                state.metrics.requests.labels("aborted").inc()


def _logprobs_json(entries: list[tuple[str, Any]], chat: bool, tokenizer) -> dict:
    """OpenAI's logprobs object. Each token's text is the text it released, so the tokens always
    join back into the output text (a multi-byte character is credited to its last byte)."""
    if chat:
        return {"content": [
            {"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
             "top_logprobs": [{"token": (t := tokenizer.decode([tid])), "logprob": v, "bytes": list(t.encode())}
                              for tid, v in lp.top]}
            for text, lp in entries]}
    offsets, position = [], 0
    for text, _ in entries:
        offsets.append(position)
        position += len(text)
    return {"tokens": [text for text, _ in entries], "token_logprobs": [lp.logprob for _, lp in entries],
            "top_logprobs": [{tokenizer.decode([tid]): v for tid, v in lp.top} for _, lp in entries],
            "text_offset": offsets}
