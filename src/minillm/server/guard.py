"""What every request meets before any route: the API key, then bounds on the body's size and on the
time it takes to arrive (a client that sends less than its Content-Length, or never ends a chunked
body, gets a 408 and its connection closed instead of holding it for ever).

An ASGI middleware, so a request without the key gets 401 before its body is read or parsed
(no validation details leak to a client that has not authenticated) and on every path, known or not.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from starlette.exceptions import HTTPException

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Guard:
    """`api_key` None: no key needed. `public`: paths open without the key (/health, and /metrics
    with --public-metrics). Bodies over `max_body_bytes` get 413, bodies not all there `body_timeout`
    seconds after the request's head 408."""

    def __init__(self, app: Callable, api_key: str | None, public: Collection[str], max_body_bytes: int,
                 body_timeout: float) -> None:
        self.app, self.public, self.max_body_bytes, self.body_timeout = app, set(public), max_body_bytes, body_timeout
        self.key = None if api_key is None else api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key is not None and scope["path"] not in self.public and not self._authorized(scope):
            return await _error(send, 401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                "authentication_error", "invalid_api_key")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await _error(send, 413, f"the request body is larger than {self.max_body_bytes} bytes",
                                "invalid_request_error", "request_too_large")
        received, complete, deadline = 0, False, time.monotonic() + self.body_timeout

        async def bounded_receive() -> dict[str, Any]:  # a chunked body has no length up front
            nonlocal received, complete
            if complete:  # later reads wait for the client to disconnect, for as long as a response lasts
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.body_timeout:g} s") from None
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if received > self.max_body_bytes:
                raise HTTPException(413, f"the request body is larger than {self.max_body_bytes} bytes")
            return message

        await self.app(scope, bounded_receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key)


async def _error(send: Send, status: int, message: str, kind: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
