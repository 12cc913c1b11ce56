"""Prefix-aware routing for engine replicas behind Ray Serve (replicas.py): requests whose prompts start
the same way go to the same replica, whose prefix cache (engine/block_manager.py) then already holds
that start's KV blocks, instead of computing it again on every replica in turn.

A request's routing key is the start of its prompt as the client wrote it, before any template: the
first `prefix_chars` characters of the completion prompt, or of the messages (system prompt first, each
message's role and text) for chat, Responses and Messages requests. It is hashed onto a ring of the
replicas (consistent hashing: when a replica is replaced only its keys move), and the request goes to
the key's owner unless that one runs more than `max_imbalance` requests beyond the least loaded replica:
then to the least loaded (a popular prefix may cost its replica's cache locality, not the service's
latency). A request with no key (/health, embeddings, a body that is not JSON) goes to the least loaded
replica; one with a `replica_index` to that replica (the front's /metrics asks each in turn).
`ReplicaRouter`, the baseline (`--router pow2`), routes as Ray Serve's default router does: the less
loaded of two random replicas.

The routers run in the process of the handle that calls the replicas (the front deployment), as Ray
Serve `RequestRouter`s named in the deployment's `RequestRouterConfig`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

VIRTUAL_NODES = 64  # points per replica on the ring: keys split evenly (within a few %) between replicas


def stable_hash(text: str) -> int:
    """The same in every process and run (Python's own hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing over replica ids: each id owns the keys that hash just below its points."""

    def __init__(self, replica_ids: list[str]) -> None:
        points = sorted((stable_hash(f"{rid}#{i}"), rid) for rid in replica_ids for i in range(VIRTUAL_NODES))
        self._hashes = [h for h, _ in points]
        self._ids = [rid for _, rid in points]

    def owner(self, key: str) -> str:
        return self._ids[bisect.bisect(self._hashes, stable_hash(key)) % len(self._ids)]


def routing_key(path: str, body: bytes, prefix_chars: int) -> str | None:
    """The start of the request's prompt (None: no prompt to route by). `body` is the raw JSON."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):  # the replica answers it with the 400
        return None
    if not isinstance(request, dict):
        return None
    if path == "/v1/completions":
        prompt = request.get("prompt")
        first = prompt[0] if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else prompt
        text = _text(first) if not isinstance(first, list) else ",".join(map(str, first))
    elif path == "/v1/responses":
        text = _text(request.get("instructions")) + _text(request.get("input"))
    elif path in ("/v1/chat/completions", "/v1/messages"):
        text = _text(request.get("system")) + _text(request.get("messages"))
    else:
        return None
    return text[:prefix_chars] or None


def _text(value: Any) -> str:
    """Messages, content parts or a prompt flattened into text: each message's role, then its text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text(item) for item in value)
    if isinstance(value, dict):
        role = value.get("role")
        return (f"<{role}>" if isinstance(role, str) else "") + _text(value.get("content", value.get("text")))
    return ""


class ReplicaRouter(RequestRouter):
    """Ray Serve's power of two choices (the less loaded of two random replicas), and replicas by index:
    the request's first argument may carry a `.replica_index` that picks a replica by its place among
    them (replica.py's `Forwarded`; the front's /metrics asks each replica in turn). Set with
    `RequestRouterConfig(request_router_class=..., request_router_kwargs=...)`."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks of replicas, best first: Ray takes the first rank's least loaded replica that has room."""
        request = pending_request.args[0] if pending_request is not None and pending_request.args else None
        index = getattr(request, "replica_index", None)
        if index is not None:
            ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
            return [[ordered[index % len(ordered)]]]
        return self.ranks(candidate_replicas, getattr(request, "routing_key", None))

    def ranks(self, candidate_replicas: list[RunningReplica], key: str | None) -> list[list[RunningReplica]]:
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]


class PrefixAwareRouter(ReplicaRouter):
    """The request's key (`.routing_key`) picks its replica on the hash ring."""

    def initialize_state(self, max_imbalance: int = 16) -> None:
        self.max_imbalance = max_imbalance
        self._ring: tuple[frozenset, HashRing] | None = None

    def ranks(self, candidate_replicas: list[RunningReplica], key: str | None) -> list[list[RunningReplica]]:
        if key is None or len(candidate_replicas) < 2:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        owner = by_id[self._hash_ring(by_id).owner(key)]
        least = min(candidate_replicas, key=self._load)
        if self._load(owner) - self._load(least) > self.max_imbalance:
            return [[least], candidate_replicas]
        return [[owner], [r for r in candidate_replicas if r is not owner]]

    def _load(self, replica: RunningReplica) -> int:
        """Requests running or queued on the replica, as Ray last heard (0 before it has heard)."""
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def _hash_ring(self, by_id: dict[str, RunningReplica]) -> HashRing:
        ids = frozenset(by_id)
        if self._ring is None or self._ring[0] != ids:  # built again only when the replicas change
            self._ring = (ids, HashRing(sorted(ids)))
        return self._ring[1]
