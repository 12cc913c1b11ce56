"""One engine replica behind Ray Serve (replicas.py): `minillm serve`'s own app (create_app) and engine
process, in a Ray Serve replica, serving the HTTP requests the front deployment forwards through a Ray
Serve handle. Each request runs through the app as an ASGI call in this process; the app's messages
(the response's start, then its body's pieces) stream back as they are sent, so a stream stays a stream
end to end."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from .app import create_app

REPLICA_HEADER = b"x-minillm-replica"  # on every response: which replica served it (Ray's replica id)


@dataclass(frozen=True)
class Forwarded:
    """An HTTP request as the front deployment received it (its body read whole, already bounded), and
    what the router (prefix_router.py) reads: its `routing_key`, or a `replica_index` to reach each
    replica in turn (/metrics)."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    routing_key: str | None = None
    replica_index: int | None = None


class EngineReplica:
    """`create_app(model, model_name, llm_options, **server_options)` with its engine process on `threads`
    CPU threads. Constructed only once the model has loaded, so Ray routes nothing to a replica that
    cannot serve yet (one restarted after its process died included); a model that fails to load fails
    the replica, and Ray reports it."""

    async def __init__(self, model: str | None, model_name: str, llm_options: dict, server_options: dict,
                       threads: int) -> None:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the engine process, spawned below, inherits it
        self.app = create_app(model, model_name, llm_options, **server_options)
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()
        state = self.app.state.minillm
        while state.tokenizer is None or not state.engine.ready:
            if state.error is not None:
                await self._stop()
                raise RuntimeError(f"the model did not load: {state.error}")
            await asyncio.sleep(0.1)
        self.replica_id = serve.get_replica_context().replica_id.unique_id.encode()

    async def __call__(self, request: Forwarded) -> AsyncIterator[dict[str, Any]]:
        """The app's ASGI messages for one request. The client going away cancels this generator (Ray
        Serve cancels the call), which cancels the app's call: it aborts the request in the engine."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
                 "method": request.method, "path": request.path, "raw_path": request.path.encode(),
                 "root_path": "", "query_string": request.query_string, "headers": request.headers,
                 "client": None, "server": None}
        sent: asyncio.Queue = asyncio.Queue()
        first: dict[str, Any] | None = {"type": "http.request", "body": request.body, "more_body": False}

        async def receive() -> dict[str, Any]:
            nonlocal first
            if first is not None:
                message, first = first, None
                return message
            await asyncio.Event().wait()  # the client never disconnects here: its going away is a cancellation
            raise AssertionError("unreachable")

        call = asyncio.create_task(self.app(scope, receive, sent.put))
        call.add_done_callback(lambda _: sent.put_nowait(None))  # the app returned (or failed) without more
        try:
            while (message := await sent.get()) is not None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message["headers"], (REPLICA_HEADER, self.replica_id)]}
                yield message
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    return
            call.result()  # the app ended without finishing its response: its exception, if any, for Ray's log
            raise RuntimeError(f"{request.method} {request.path}: the app ended without finishing its response")
        finally:
            call.cancel()

    async def __del__(self) -> None:
        """Replica shutdown: stop the engine process."""
        await self._stop()

    async def _stop(self) -> None:
        lifespan, self.lifespan = self.lifespan, None
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)
