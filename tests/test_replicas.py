"""`minillm serve --replicas 2` (two engine replicas behind Ray Serve, one thread each) on loopback: the
server suite's tests (test_server.py) against it, prefix-affinity routing measured from the replicas'
prefix-cache counters (tests/test_replicas_pow2.py: without it), stored Responses across replicas, and a
replica killed mid-request: its requests fail cleanly, Ray starts another."""

import json
import os
import random
import re
import signal
import threading
import time

import httpx
import pytest

pytest.importorskip("ray.serve")

from serving import API_KEY, post, start_server
from test_server import (client, test_bad_completion_requests, test_bad_requests_keep_the_server_healthy,  # noqa: F401
                         test_chat_streaming_equals_non_streaming, test_completion_and_exact_usage,
                         test_concurrent_streaming_clients_match_requests_run_alone,
                         test_disconnected_clients_free_their_blocks, test_logprobs_shape_and_tokens_join_into_text,
                         test_n_stop_and_seed)

pytestmark = pytest.mark.slow  # Ray, and two `minillm serve` engines

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
PREFIX_TOKENS = 512


@pytest.fixture(scope="module")
def server():
    """One Ray Serve deployment for the module: the same flags as test_server.py's server, with replicas."""
    yield from start_server("--replicas", "2", "--api-key", API_KEY, "--served-model-name", "smollm2")


def replica_counts(server) -> dict[str, dict[str, float]]:
    """Each replica's prefix-cache counters (prompt tokens looked up, found), by replica id."""
    text = httpx.get(server["base"] + "/metrics", headers=HEADERS, timeout=30).text
    counts: dict[str, dict[str, float]] = {}
    for name, replica, value in re.findall(r'^minillm_prefix_cache_(queries|hits)_total\{replica="([^"]+)"\} (\S+)$',
                                           text, re.M):
        counts.setdefault(replica, {"queries": 0.0, "hits": 0.0})[name] = float(value)
    return counts


def test_health_models_and_metrics_of_every_replica(server, client):
    assert httpx.get(server["base"] + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    assert httpx.get(server["base"] + "/metrics").status_code == 401  # each replica checks the key
    text = httpx.get(server["base"] + "/metrics", headers=HEADERS).text
    for name in ("minillm_num_requests_running", "minillm_kv_cache_usage_ratio", "minillm_prefix_cache_hits_total",
                 "minillm_time_to_first_token_seconds_bucket"):
        assert len(set(re.findall(rf'^{name}{{.*replica="([^"]+)"', text, re.M))) == 2, name
    assert text.count("# TYPE minillm_num_requests_running gauge") == 1  # one exposition, not two pasted


def shared_prefix_rate(server, count: int = 12) -> tuple[float, dict[int, set[str]]]:
    """`count` prompts of 512 shared tokens each served once, then each again with another ending: the
    prefix-cache hit rate of those second requests, from the replicas' counters (in prompt tokens), and
    the replicas each prefix's requests reached."""
    rng = random.Random(1)
    prefixes = [[rng.randrange(1000, 40000) for _ in range(PREFIX_TOKENS)] for _ in range(count)]
    reached: dict[int, set[str]] = {}

    def send(i: int, ending: list[int]) -> None:
        response = post(server, "/v1/completions", {"prompt": prefixes[i] + ending, "max_tokens": 1})
        assert response.status_code == 200, response.text
        reached.setdefault(i, set()).add(response.headers["x-minillm-replica"])

    for i in range(count):
        send(i, [7, 8])
    before = replica_counts(server)
    for i in range(count):
        send(i, [100 + i, 200 + i])
    after = replica_counts(server)
    delta = {key: sum(after[r][key] - before.get(r, {}).get(key, 0) for r in after) for key in ("queries", "hits")}
    return delta["hits"] / delta["queries"], reached


def test_requests_sharing_a_prefix_reach_the_replica_that_caches_it(server):
    rate, reached = shared_prefix_rate(server)
    print(f"prefix-aware routing: prefix-cache hit rate {rate:.1%}")
    assert all(len(replicas) == 1 for replicas in reached.values()), reached  # each prefix stays on its replica
    assert len(set().union(*reached.values())) == 2  # and the prefixes are spread over both replicas
    assert rate >= 0.8, rate  # 512 of each 514 tokens are cached (tests/test_replicas_pow2.py: about half)


def test_chats_sharing_a_system_prompt_reach_one_replica(server):
    system = "You answer questions about a small bakery in Lyon, briefly and politely. " * 30  # ~500 tokens

    def ask(question: str) -> str:
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                "max_tokens": 2}
        return post(server, "/v1/chat/completions", body).headers["x-minillm-replica"]

    reached = {ask("Bread?")}
    before = replica_counts(server)
    reached |= {ask(question) for question in ("When do you open?", "Croissants?", "Do you deliver?")}
    after = replica_counts(server)
    delta = {key: sum(after[r][key] - before.get(r, {}).get(key, 0) for r in after) for key in ("queries", "hits")}
    assert len(reached) == 1 and delta["hits"] / delta["queries"] >= 0.8, (reached, delta)


def test_stored_responses_are_found_on_whichever_replica_made_them(server):
    made = [post(server, "/v1/responses", {"input": f"Say {word}.", "max_output_tokens": 4}).json()
            for word in ("yes", "no", "maybe", "again", "later", "soon")]  # spread over both replicas
    for response in made:
        found = httpx.get(f"{server['base']}/v1/responses/{response['id']}", headers=HEADERS, timeout=30)
        assert found.status_code == 200 and found.json()["id"] == response["id"]
        follow = post(server, "/v1/responses", {"input": "And then?", "previous_response_id": response["id"],
                                                "max_output_tokens": 4})
        assert follow.status_code == 200, follow.text
    missing = httpx.get(f"{server['base']}/v1/responses/resp_nope", headers=HEADERS, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def _descendants(pid: int) -> list[int]:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _failed(events: list[str]) -> bool:
    """Whether a stream's last event is an error (events[0] is the replica's id)."""
    return len(events) > 1 and events[-1] != "[DONE]" and "error" in json.loads(events[-1])


def _long_stream(server, prompt, events, started, stop):
    """Stream a long completion in this thread, recording its replica and every event, until it ends
    with an error or `stop` is set (then the connection closes: the replica aborts the request)."""
    body = {"prompt": prompt, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server["base"] + "/v1/completions", json=body, headers=HEADERS, timeout=120) as r:
        events.append(r.headers["x-minillm-replica"])
        started.set()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if _failed(events) or stop.is_set():
                    return


def test_a_killed_replica_fails_its_requests_cleanly_and_is_replaced(server):
    """Last in the module: it replaces a replica. One long stream on each replica, and a long plain
    request beside each (its prompt routes it to the same replica); then one replica's process is
    killed. Its stream ends with an error event and its plain request gets a 503 with a JSON error
    (no hang); the other replica's requests go on; Ray starts a new replica, which then serves."""
    streams, stop = {}, threading.Event()  # replica id -> (prompt, events)
    for i in range(40):
        events, started = [], threading.Event()
        prompt = f"Tell me a long story number {i}:"
        threading.Thread(target=_long_stream, args=(server, prompt, events, started, stop), daemon=True).start()
        assert started.wait(60)
        streams.setdefault(events[0], (prompt, events))
        if len(streams) == 2:
            break
    assert len(streams) == 2
    plain: dict[str, list] = {}

    def plain_request(replica, prompt):
        plain[replica] = [post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 300, "ignore_eos": True})]

    for replica, (prompt, _) in streams.items():
        threading.Thread(target=plain_request, args=(replica, prompt), daemon=True).start()
    time.sleep(2)  # both plain requests are in their replicas' engines
    victims = [p for p in _descendants(server["proc"].pid) if "ServeReplica:minillm:EngineReplica" in _cmdline(p)]
    assert len(victims) == 2, [_cmdline(p) for p in victims]
    os.kill(victims[0], signal.SIGKILL)
    deadline = time.time() + 30
    while time.time() < deadline and not any(_failed(events) for _, events in streams.values()):
        time.sleep(0.2)
    dead = [replica for replica, (_, events) in streams.items() if _failed(events)]
    assert len(dead) == 1, "the killed replica's stream did not end with an error event"
    error = json.loads(streams[dead[0]][1][-1])["error"]
    assert error["code"] == "replica_died" and error["type"] == "service_unavailable"
    while time.time() < deadline and dead[0] not in plain:
        time.sleep(0.2)
    response = plain[dead[0]][0]
    assert response.status_code == 503 and response.json()["error"]["code"] == "replica_died"
    alive = next(r for r in streams if r != dead[0])
    while time.time() < deadline + 60 and alive not in plain:
        time.sleep(0.2)
    assert plain[alive][0].status_code == 200  # the other replica's requests go on
    assert not _failed(streams[alive][1])
    stop.set()
    deadline = time.time() + 180
    while time.time() < deadline:  # Ray starts a replica in the dead one's place, and routes to it once loaded
        replicas = set(replica_counts(server))
        if len(replicas) == 2 and dead[0] not in replicas:
            break
        time.sleep(1)
    assert len(replicas) == 2 and dead[0] not in replicas, replicas
    for i in range(6):  # both replicas serve (prompts spread over them)
        assert post(server, "/v1/completions", {"prompt": f"Hello {i}", "max_tokens": 4}).status_code == 200
