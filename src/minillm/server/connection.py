"""The server's HTTP connections: uvicorn's h11 protocol with a deadline for each request's head.

uvicorn closes a connection idle between requests after its keep-alive timeout (5 s), but not one that
trickles a request head a byte at a time (slowloris): every byte restarts nothing and nothing ends it.
Here each request's head (request line and headers) must be complete within `head_timeout` seconds of
the connection opening or the previous response ending, or the connection is closed. The body has its
own deadline in the Guard middleware (guard.py).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class _HeadDeadline(H11Protocol):
    head_timeout: float = 30.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:  # waiting for the next request's head (unless one was pipelined)
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()


def head_deadline_protocol(head_timeout: float) -> type[H11Protocol]:
    """The protocol class for `uvicorn.Config(http=...)`."""
    return type("HeadDeadlineH11Protocol", (_HeadDeadline,), {"head_timeout": head_timeout})
