"""The OpenAI-compatible HTTP API (FastAPI): /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics. This process tokenizes, shapes responses and streams; the continuous-batching
engine runs in its own process (engine_core.py), reached through `EngineClient`."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import RequestFailed, StepOutput
from ..loading import ModelLoadError, load_tokenizer
from ..text.tokenizer import Tokenizer
from .engine_client import EngineClient
from .guard import Guard
from .metrics import Metrics
from .protocol import MAX_CHOICES, APIError, ChatCompletionRequest, CompletionRequest


@dataclass
class ServerState:
    model_name: str
    tokenizer: Tokenizer | None = None
    engine: EngineClient | None = None
    load_error: str | None = None  # the tokenizer's (the engine process reports its own)
    metrics: Metrics = field(default_factory=Metrics)

    @property
    def error(self) -> str | None:
        return self.load_error or (self.engine.error if self.engine else None)


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


def create_app(model: str | None, model_name: str, llm_options: dict | None = None, api_key: str | None = None,
               public_metrics: bool = False, max_body_bytes: int = 16 << 20, stream_timeout: float = 30.0) -> FastAPI:
    """Serve `model` (a path; None: the bundled model), loaded with `LLM(model, **llm_options)` in the engine's
    own process at start-up; /health says 503 until it is ready, and again if that process dies.
    With `api_key`, every path but /health (and /metrics if `public_metrics`) answers 401 without it.
    A stream whose client reads nothing for `stream_timeout` seconds once its buffer is full is aborted."""
    state = ServerState(model_name)

    def load_tokenizer_in_background() -> None:
        try:
            tokenizer, _ = load_tokenizer(model)
            if tokenizer is None:
                raise ModelLoadError(f"{model} has no tokenizer (tokenizer.json); the server needs one")
            state.tokenizer = tokenizer
        except Exception as err:  # reported by /health
            state.load_error = f"{type(err).__name__}: {err}"

    async def lifespan(app: FastAPI):
        state.engine = EngineClient(model, llm_options or {}, stall_timeout=stream_timeout)
        threading.Thread(target=load_tokenizer_in_background, name="minillm-tokenizer", daemon=True).start()
        yield
        state.engine.close()

    app = FastAPI(title="MiniLLM", lifespan=lifespan)
    app.state.minillm = state
    app.add_middleware(Guard, api_key=api_key, public={"/health"} | ({"/metrics"} if public_metrics else set()),
                       max_body_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, "the request body is not valid JSON").body(), status_code=400)
        param = loc[0] if loc else None
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(APIError(400, message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if err.status_code == 404 else str(err.detail)
        return JSONResponse(APIError(err.status_code, message, kind=kind).body(), status_code=err.status_code)

    def ready() -> EngineClient:
        if state.error is not None or state.engine is None or not state.engine.ready or state.tokenizer is None:
            raise APIError(503, state.error or "the model is still loading", kind="service_unavailable")
        return state.engine

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                           "model", kind="not_found_error", code="model_not_found")

    @app.get("/health")
    async def health() -> Response:
        try:
            ready()
        except APIError:
            return JSONResponse({"status": "error" if state.error else "loading", "detail": state.error},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(state.engine.stats if state.engine else None),
                        media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        ready()
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "minillm"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        engine = ready()
        body.check()
        check_model(body.model)
        prompts = _prompt_ids(body.prompt, state.tokenizer)
        return await _respond(request, engine, state, body, prompts, chat=False, logprobs=body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        engine = ready()
        body.check()
        check_model(body.model)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            ids = state.tokenizer.encode_chat(messages)
        except ValueError as err:  # the template refused the conversation
            raise APIError(400, str(err), "messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await _respond(request, engine, state, body, [ids], chat=True, logprobs=logprobs)

    return app


def _prompt_ids(prompt: Any, tokenizer: Tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt must not be empty", "prompt")
    try:
        ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    except ValueError as err:
        raise APIError(400, str(err), "prompt") from None
    if any(not p for p in ids):
        raise APIError(400, "prompt must not be empty", "prompt")
    return ids


async def _respond(request: Request, engine: EngineClient, state: ServerState, body, prompts: list[list[int]],
                   chat: bool, logprobs: int | None) -> Response:
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
                                         logprobs is not None, tokenizer),
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
            out_choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                                "logprobs": lp, "finish_reason": c.finish_reason})
        else:
            out_choices.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
    return JSONResponse({"id": response_id, "object": kind, "created": created, "model": state.model_name,
                         "choices": out_choices, "usage": usage()})


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
                  created: int, usage, include_usage: bool, want_logprobs: bool, tokenizer) -> AsyncIterator[str]:
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
