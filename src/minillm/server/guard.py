"""What every request meets before any route: the API key, then a bound on the body's size.

An ASGI middleware, so a request without the key gets 401 before its body is read or parsed
(no validation details leak to a client that has not authenticated) and on every path, known or not.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from starlette.exceptions import HTTPException

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Guard:
    """`api_key` None: no key needed. `public`: paths open without the key (/health, and /metrics
    with --public-metrics). Bodies over `max_body_bytes` get 413."""

    def __init__(self, app: Callable, api_key: str | None, public: Collection[str], max_body_bytes: int) -> None:
        self.app, self.public, self.max_body_bytes = app, set(public), max_body_bytes
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
        received = 0

        async def bounded_receive() -> dict[str, Any]:  # a chunked body has no length up front
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
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
