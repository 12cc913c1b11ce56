"""A generation request's life after its route: its choices submitted to the engine (`submit`, one path
for every endpoint), then collected into one JSON response or streamed as server-sent events, shaped by
the API's formatter (formats.py, responses_api.py, anthropic_api.py), with metrics, aborts on disconnect
and failures reported."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine import RequestFailed, StepOutput
from .engine_client import EngineClient
from .formats import Choice, ResponseFormat
from .prepare import Job
from .protocol import APIError
from .state import ServerState


@dataclass
class Batch:
    """A request's choices in the engine."""

    engine: EngineClient
    prompt_tokens: int
    choices: list[Choice] = field(default_factory=list)

    def usage(self) -> dict[str, int]:
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def abort_unfinished(self) -> int:
        """Abort what still runs (its KV blocks are freed at once); returns how many."""
        unfinished = [c for c in self.choices if c.finish_reason is None]
        for choice in unfinished:
            self.engine.abort(choice.request_id)
        return len(unfinished)


def submit(state: ServerState, job: Job) -> Batch:
    """Every choice of a prepared job queued in the engine, one path for every endpoint."""
    batch = Batch(state.engine, sum(len(ids) for ids in job.prompts))
    group = uuid.uuid4().hex  # the engine shares its capacity fairly between requests, not choices
    for ids, params in job.runs:
        try:
            request_id, outputs = state.engine.submit(ids, params, group)
        except RequestFailed as err:  # the engine process died since ready() looked
            batch.abort_unfinished()
            raise APIError(503, str(err), kind="service_unavailable") from None
        batch.choices.append(Choice(len(batch.choices), request_id, outputs))
    state.metrics.prompt_tokens.inc(batch.prompt_tokens)
    return batch


async def respond(request: Request, state: ServerState, job: Job, format_type: type[ResponseFormat]) -> Response:
    """Submit the job, then answer with its whole response or its stream, in the endpoint's format."""
    batch = submit(state, job)
    fmt = format_type(state, job)
    if job.body.stream:
        return StreamingResponse(Stream(state, batch, fmt).events(), media_type="text/event-stream")
    return await _collected(request, state, batch, fmt)


async def _collected(request: Request, state: ServerState, batch: Batch, fmt: ResponseFormat) -> Response:
    """The whole response once every choice has finished; a 499 if the client goes away first."""
    async def collect(choice: Choice) -> None:
        async for _ in _outputs(state, choice):
            pass

    collector = asyncio.ensure_future(asyncio.gather(*(collect(c) for c in batch.choices)))
    try:
        while not collector.done():
            await asyncio.wait({collector}, timeout=0.25)
            if not collector.done() and await request.is_disconnected():
                collector.cancel()
                state.metrics.requests.labels("aborted").inc(len(batch.choices))
                return Response(status_code=499)
        try:
            collector.result()
        except APIError:
            state.metrics.requests.labels("failed").inc(len(batch.choices))
            raise
    finally:
        batch.abort_unfinished()
    state.metrics.requests.labels("finished").inc(len(batch.choices))
    return JSONResponse(fmt.body(batch.choices, batch.usage()))


async def _outputs(state: ServerState, choice: Choice) -> AsyncIterator[StepOutput]:
    """A choice's outputs as they arrive, each added to it and to the metrics, until it finishes."""
    started = last = time.perf_counter()
    while choice.finish_reason is None:
        item = _checked(await choice.outputs.get())
        now = time.perf_counter()
        if not choice.token_ids:
            state.metrics.ttft.observe(now - started)
        else:
            state.metrics.itl.observe(now - last)
        last = now
        choice.add(item)
        state.metrics.generation_tokens.inc(len(item.token_ids))
        yield item


def _checked(item: StepOutput | BaseException) -> StepOutput:
    """An engine output, or the APIError that its failure is for the client."""
    if isinstance(item, ValueError):
        raise APIError(400, str(item))
    if isinstance(item, StepOutput) and item.finish_reason == "timeout":  # --max-queue-wait
        raise APIError(503, f"the server is busy: {item.error}", kind="service_unavailable", code="queue_timeout")
    if isinstance(item, RequestFailed) or isinstance(item, StepOutput) and item.error is not None:
        raise APIError(500, f"the request failed: {item if isinstance(item, RequestFailed) else item.error}",
                       kind="server_error")
    if isinstance(item, BaseException):
        raise APIError(500, f"internal error: {item}", kind="server_error")
    return item


@dataclass
class Stream:
    """A response streamed as server-sent events, its choices' outputs interleaved as they come."""

    state: ServerState
    batch: Batch
    fmt: ResponseFormat
    # small, so a slow reader's backlog stays in the engine's queues, where backpressure sees it
    merged: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=4))

    async def events(self) -> AsyncIterator[str]:
        tasks = [asyncio.ensure_future(self._pump(c)) for c in self.batch.choices]
        try:
            for event in self.fmt.opening(self.batch.choices):
                yield event
            remaining = len(self.batch.choices)
            while remaining:
                choice, item = await self.merged.get()
                remaining -= isinstance(item, APIError) or item.finished
                if isinstance(item, APIError):
                    yield self.fmt.error_event(item)
                    continue
                for event in self.fmt.events(choice, item, choice.finish_reason if item.finished else None):
                    yield event
            self.state.metrics.requests.labels("finished").inc(len(self.batch.choices))
            for event in self.fmt.closing(self.batch.choices, self.batch.usage()):
                yield event
        finally:  # the client went away (or we are done): stop what is still running
            for task in tasks:
                task.cancel()
            aborted = self.batch.abort_unfinished()
            if aborted:  # labels() alone would publish an "aborted" series at 0
                self.state.metrics.requests.labels("aborted").inc(aborted)

    async def _pump(self, choice: Choice) -> None:
        try:
            async for item in _outputs(self.state, choice):
                await self.merged.put((choice, item))
        except APIError as err:
            await self.merged.put((choice, err))
