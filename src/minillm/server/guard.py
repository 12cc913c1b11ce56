"""What every request meets before any route: the API key, then bounds on the body's size and on the
time it takes to arrive (a client that sends less than its Content-Length, or never ends a chunked
body, gets a 408 and its connection closed instead of holding it for ever).

An ASGI middleware, so a request without the key gets 401 before its body is read or parsed
(no validation details leak to a client that has not authenticated) and on every path, known or not. The
key comes as `Authorization: Bearer KEY` (OpenAI's clients) or `x-api-key: KEY` (Anthropic's); errors are
in the shape of the API whose path was called.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from starlette.exceptions import HTTPException

from .protocol import APIError, error_shape

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
            return await _error(send, scope["path"], 401, "invalid or missing API key (send 'Authorization: Bearer "
                                "KEY' or 'x-api-key: KEY')", "authentication_error", "invalid_api_key")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await _error(send, scope["path"], 413,
                                f"the request body is larger than {self.max_body_bytes} bytes",
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
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        bearer = scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key)
        return bearer or secrets.compare_digest(headers.get(b"x-api-key", b"").strip(), self.key)


async def _error(send: Send, path: str, status: int, message: str, kind: str, code: str) -> None:
    body = json.dumps(APIError(status, message, kind=kind, code=code).body(error_shape(path))).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
