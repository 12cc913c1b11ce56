"""The prefix-aware router's pieces without a Ray cluster: which text routes a request, the hash ring, and
the router's choice between a prefix's replica and the least loaded one (tests/test_replicas.py runs it
in Ray Serve)."""

import asyncio
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID  # the router's constructor arguments
from ray.serve.request_router import ReplicaID

from minillm.server.prefix_router import HashRing, PrefixAwareRouter, ReplicaRouter, routing_key
from minillm.server.replica import Forwarded

SYSTEM = "You are a careful assistant for a bakery. " * 40  # ~1,700 characters: longer than the routed prefix


def key(path, body, chars=1024):
    return routing_key(path, json.dumps(body).encode(), chars)


def test_a_shared_system_prompt_routes_chats_together():
    ask = [key("/v1/chat/completions", {"messages": [{"role": "system", "content": SYSTEM},
                                                    {"role": "user", "content": question}]})
           for question in ("Bread?", "Cakes?")]
    assert ask[0] == ask[1] and len(ask[0]) == 1024
    parts = key("/v1/chat/completions", {"messages": [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                                                      {"role": "user", "content": "Pies?"}]})
    assert parts == ask[0]  # content as text parts is the same text
    other = key("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief. " + SYSTEM}]})
    assert other != ask[0]


def test_a_short_prompt_routes_by_all_of_it():
    # under `prefix_chars`, the user's message is part of the key: conversations spread over the replicas
    short = [key("/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": q}]}) for q in ("A?", "B?")]
    assert short[0] != short[1] and short[0].startswith("<system>Be brief.<user>")


@pytest.mark.parametrize("path,body,expected", [
    ("/v1/completions", {"prompt": "Once upon a time"}, "Once upon a time"),
    ("/v1/completions", {"prompt": ["first", "second"]}, "first"),
    ("/v1/completions", {"prompt": [504, 3575, 282]}, "504,3575,282"),
    ("/v1/completions", {"prompt": [[504, 3575], [7]]}, "504,3575"),
    ("/v1/responses", {"instructions": "Rhyme.", "input": "Hi"}, "Rhyme.Hi"),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}]}, "<user>Hi"),
    ("/v1/messages", {"system": "Rhyme.", "messages": [{"role": "user", "content": "Hi"}]}, "Rhyme.<user>Hi"),
    ("/v1/completions", {"prompt": 5}, None),  # the replica answers it with the 400
    ("/v1/completions", {"prompt": ""}, None),
    ("/v1/embeddings", {"input": "x"}, None),  # nothing cached to route by
])
def test_routing_keys(path, body, expected):
    assert key(path, body) == expected


def test_bodies_that_are_not_json_objects_have_no_key():
    assert routing_key("/v1/completions", b"{not json", 1024) is None
    assert routing_key("/v1/completions", b"[1, 2]", 1024) is None
    assert routing_key("/v1/completions", b"\xff\xfe", 1024) is None
    assert key("/v1/completions", {"prompt": "x" * 5000}, 100) == "x" * 100


def test_the_ring_splits_keys_evenly_and_moves_only_a_removed_replicas_keys():
    keys = [f"prompt {i}" for i in range(2000)]
    three = HashRing(["a", "b", "c"])
    owners = [three.owner(k) for k in keys]
    assert all(500 < owners.count(r) < 840 for r in "abc")  # a third each, give or take
    two = HashRing(["a", "b"])
    assert all(two.owner(k) == owner for k, owner in zip(keys, owners) if owner != "c")
    assert HashRing(["b", "a"]).owner("x") == two.owner("x")  # the order replicas are listed in does not matter


def _router_and_replicas(max_imbalance=4, kind=PrefixAwareRouter):
    deployment = DeploymentID(name="EngineReplica", app_name="minillm")
    router = kind(deployment, DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True)
    router.initialize_state(**({"max_imbalance": max_imbalance} if kind is PrefixAwareRouter else {}))
    replicas = [SimpleNamespace(replica_id=ReplicaID(rid, deployment)) for rid in ("r1", "r2", "r3")]
    return router, replicas


def _request(key=None, index=None):
    return SimpleNamespace(args=[Forwarded("POST", "/v1/completions", b"", [], b"", key, index)])


def _choose(router, replicas, request):
    return asyncio.run(router.choose_replicas(replicas, request))


def test_the_router_sends_a_prefix_to_its_replica_unless_it_is_far_busier():
    router, replicas = _router_and_replicas(max_imbalance=4)
    owner = HashRing(["r1", "r2", "r3"]).owner("shared prefix")
    ranks = _choose(router, replicas, _request("shared prefix"))
    assert [r.replica_id.unique_id for r in ranks[0]] == [owner]
    assert {r.replica_id.unique_id for r in ranks[1]} == {"r1", "r2", "r3"} - {owner}  # if the owner is full
    others = [r for r in replicas if r.replica_id.unique_id != owner]
    router.replica_queue_len_cache.update(others[0].replica_id, 3)
    router.replica_queue_len_cache.update(others[1].replica_id, 4)
    for owner_load, chosen in ((9, others[0].replica_id.unique_id), (7, owner)):  # 9 - 3 > 4; 7 - 3 <= 4
        router.replica_queue_len_cache.update(ReplicaID(owner, others[0].replica_id.deployment_id), owner_load)
        assert _choose(router, replicas, _request("shared prefix"))[0][0].replica_id.unique_id == chosen


def test_requests_without_a_key_go_to_the_least_loaded_and_an_index_pins_a_replica():
    router, replicas = _router_and_replicas()
    assert _choose(router, replicas, _request()) == [replicas]  # Ray picks the least loaded of them
    assert _choose(router, replicas, None) == [replicas]
    pinned = [_choose(router, replicas, _request("k", i))[0][0].replica_id.unique_id for i in range(4)]
    assert pinned == ["r1", "r2", "r3", "r1"]


def test_the_baseline_router_picks_two_random_replicas_and_pins_by_index_too():
    router, replicas = _router_and_replicas(kind=ReplicaRouter)
    chosen = [_choose(router, replicas, _request("shared prefix"))[0] for _ in range(50)]
    assert all(len(pair) == 2 and pair[0] is not pair[1] for pair in chosen)  # Ray takes the less loaded
    assert len({r.replica_id.unique_id for pair in chosen for r in pair}) == 3  # blind to the key
    pinned = [_choose(router, replicas, _request("k", i))[0][0].replica_id.unique_id for i in range(3)]
    assert pinned == ["r1", "r2", "r3"]
