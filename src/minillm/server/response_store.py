"""The Responses API's stored responses (`store`, on by default, as OpenAI's): each response with the
conversation it ended, so that a later request's `previous_response_id` continues it. In memory only, and
bounded: at most `max_entries` responses and `max_chars` characters of their JSON together; past either,
the least recently used are forgotten (a request naming one then gets a 404, as for an id never stored).
A server restart forgets them all."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..excerpt import excerpt
from .protocol import APIError


@dataclass
class StoredResponse:
    response: dict[str, Any]  # the response object, as GET /v1/responses/{id} returns it
    conversation: list[dict[str, Any]]  # chat messages: every turn up to and including this response's output
    chars: int = 0


@dataclass
class ResponseStore:
    max_entries: int = 1024
    max_chars: int = 64 << 20
    _entries: OrderedDict[str, StoredResponse] = field(default_factory=OrderedDict)
    _chars: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)  # used from the event loop and worker threads

    def put(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        entry = StoredResponse(response, conversation, len(json.dumps([response, conversation])))
        with self._lock:
            self._entries[response["id"]] = entry
            self._chars += entry.chars
            while len(self._entries) > self.max_entries or self._chars > self.max_chars:
                self._chars -= self._entries.popitem(last=False)[1].chars

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is None:
                raise APIError(404, f"no stored response {excerpt(repr(response_id))} (never stored, stored with "
                                    "store=false, or forgotten: the server keeps the most recent ones in memory)",
                               param, kind="not_found_error")
            self._entries.move_to_end(response_id)
            return entry

    def delete(self, response_id: str) -> None:
        entry = self.get(response_id)
        with self._lock:
            if self._entries.pop(response_id, None) is not None:
                self._chars -= entry.chars
