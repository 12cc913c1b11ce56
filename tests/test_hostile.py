"""Hostile and careless clients: every refusal is an OpenAI-shaped 4xx naming the field, the key is
checked before anything else, a bad request never fails another, a stream nobody reads does not
run on, and afterwards the server is healthy with every KV block free. Plus the CLI's side."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from serving import API_KEY, metric, post, start_server, wait_until_idle

pytestmark = pytest.mark.slow  # `minillm serve` and CLI processes

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def assert_refused(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# -- auth first ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/metrics"),
    ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/redoc"), ("POST", "/v1/nowhere"),
])
def test_every_route_but_health_needs_the_key_before_the_body_is_read(server, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": "Basic x"}):
        response = httpx.request(method, server["base"] + path, content=b"{not json", timeout=30,
                                 headers={**headers, "Content-Type": "application/json"})
        error = assert_refused(response, 401)
        assert error["type"] == "authentication_error" and response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server["base"] + "/health").status_code == 200


def test_the_scheme_name_is_case_insensitive(server):
    for scheme in ("Bearer", "bearer", "BEARER"):
        response = httpx.get(server["base"] + "/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"})
        assert response.status_code == 200


def test_public_metrics_opens_metrics_only():
    from fastapi.testclient import TestClient

    from minillm.server.app import create_app

    no_model = "/nonexistent/model.gguf"  # the engine process reports it at /health
    with TestClient(create_app(no_model, "m", api_key="k", public_metrics=True)) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/models").status_code == 401
        assert client.get("/docs").status_code == 401
    with TestClient(create_app(no_model, "m", api_key="k")) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200


def test_bodies_over_the_limit_get_413(server):
    big = b'{"prompt": "' + b"a" * (17 << 20) + b'"}'
    assert_refused(post(server, "/v1/completions", None, raw=big), 413)

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(17):
            yield b"a" * (1 << 20)
        yield b'"}'
    response = httpx.post(server["base"] + "/v1/completions", content=chunks(), timeout=60,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert_refused(response, 413)


# -- numbers ------------------------------------------------------------------------------------

NUMERIC = ["temperature", "top_p", "top_k", "n", "max_tokens", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "seed", "logprobs"]


@pytest.mark.parametrize("field", NUMERIC + ["top_logprobs", "max_completion_tokens"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused_by_name(server, field, value):
    chat = field in ("top_logprobs", "max_completion_tokens")
    if chat:
        path, body = "/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "logprobs": true'
    else:
        path, body = "/v1/completions", '{"prompt": "hi"'
    raw = f'{body}, "max_tokens": 2, "{field}": {value}}}'.encode()
    assert_refused(post(server, path, None, raw=raw), 400, field)


@pytest.mark.parametrize("extra,param", [
    ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"max_tokens": 10**30}, "prompt"),
    ({"n": 10**30}, "n"), ({"repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"presence_penalty": 1e300}, "presence_penalty"),
    ({"logprobs": 10**9}, "logprobs"), ({"top_k": -5}, "top_k"), ({"top_p": 0}, "top_p"),
    ({"temperature": -1e-300}, "temperature"), ({"stop": ["x"] * 17}, "stop"), ({"stop": [""]}, "stop"),
    ({"prompt": [10**30]}, "prompt"), ({"prompt": [-1]}, "prompt"), ({"prompt": [[]]}, "prompt"),
    ({"prompt": ["a"] * 20, "n": 16}, "prompt"),
])
def test_extreme_values_that_cannot_run_are_refused(server, extra, param):
    assert_refused(post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **extra}), 400, param)


WEATHER_TOOL = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.mark.parametrize("extra,param", [
    ({"tools": WEATHER_TOOL, "tool_choice": {"type": "function", "function": "get_weather"}}, "tool_choice"),
    ({"tools": WEATHER_TOOL, "tool_choice": {"type": "function", "function": {"name": ["get_weather"]}}}, "tool_choice"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": "abc"}]}, "messages"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [1]}]}, "messages"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"function": "x"}]}]}, "messages"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]}, "messages"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": 5, "content": "3"}]}, "messages"),
])
def test_malformed_tool_fields_are_a_400_naming_the_field(server, extra, param):
    """Tool fields of the wrong shape, with or without `tools` in the request, never reach the template."""
    assert_refused(post(server, "/v1/chat/completions", {"messages": ASK, "max_tokens": 2, **extra}), 400, param)


def test_extreme_values_that_can_run_are_safe(server):
    def text(**extra):
        response = post(server, "/v1/completions", {"prompt": "The sea is", "max_tokens": 6, **extra})
        assert response.status_code == 200, response.text
        return [c["text"] for c in response.json()["choices"]]

    greedy = text(temperature=0)
    assert text(temperature=1e-300) == greedy  # below 1e-5: greedy (documented)
    assert text(temperature=1, top_p=1e-300) == greedy  # only the most likely token is left
    assert text(temperature=1, top_k=1) == greedy
    assert len(text(temperature=1e300, seed=1)) == 1
    assert len(text(top_k=10**30, seed=2**64 - 1, n=2)) == 2  # seed + 1 wraps around
    assert len(text(seed=-(2**63), repetition_penalty=100, presence_penalty=-2, frequency_penalty=2)) == 1
    assert len(text(max_tokens=1, repetition_penalty=0.01, logprobs=20)) == 1


# -- text ---------------------------------------------------------------------------------------

LONE = "\\ud800"  # a JSON escape: valid JSON, but no UTF-8 encoding exists


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", f'{{"prompt": "a{LONE}b"}}', "prompt"),
    ("/v1/completions", f'{{"prompt": ["ok", "{LONE}"]}}', "prompt"),
    ("/v1/completions", f'{{"prompt": "hi", "stop": "{LONE}"}}', "stop"),
    ("/v1/completions", f'{{"prompt": "hi", "stop": ["x", "{LONE}"]}}', "stop"),
    ("/v1/completions", f'{{"prompt": "hi", "model": "{LONE}"}}', "model"),
    ("/v1/completions", f'{{"prompt": "hi", "user": "{LONE}"}}', "user"),
    ("/v1/completions", f'{{"prompt": "hi", "something_else": ["{LONE}"]}}', "something_else"),
    ("/v1/completions", f'{{"prompt": "hi", "{LONE}": 1}}', None),
    ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": "{LONE}"}}]}}', "messages"),
    ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": "{LONE}"}}]}}]}}',
     "messages"),
    ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": "hi", "name": "{LONE}"}}]}}', "messages"),
    ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": "hi"}}], "stop": "{LONE}"}}', "stop"),
])
def test_text_that_is_not_unicode_is_refused_by_name(server, path, body, param):
    error = assert_refused(post(server, path, None, raw=body.encode()), 400, param)
    assert "unicode" in error["message"].lower()


@pytest.mark.parametrize("raw", [b'{"prompt": "\xff\xfe"}', b'{"prompt": "\xed\xa0\x80"}', b"[" * 100_000,
                                 b'{"prompt": "hi", "max_tokens": 1e400}', b"\x00" * 64])
def test_malformed_bodies(server, raw):
    assert_refused(post(server, "/v1/completions", None, raw=raw), 400)


# -- isolation ----------------------------------------------------------------------------------

def test_refused_and_extreme_requests_do_not_change_anyone_elses_tokens(server):
    prompts = [f"Reasons to learn {w}:" for w in ("Rust", "Go", "OCaml", "Lua")]
    body = lambda p: {"prompt": p, "max_tokens": 12, "temperature": 0, "stream": True}  # noqa: E731
    hostile = [
        {"prompt": "x", "temperature": 1e-300, "max_tokens": 12},
        {"prompt": "x", "top_p": 1e-300, "max_tokens": 12},
        {"prompt": "x", "top_k": 10**30, "repetition_penalty": 0.01, "max_tokens": 12, "logprobs": 20},
        {"prompt": "x", "seed": 2**64 - 1, "n": 3, "temperature": 1e300, "max_tokens": 12},
        {"prompt": "x", "temperature": float("nan")},
        {"prompt": "x", "seed": 2**64},
        {"prompt": [10**30]},
    ]

    def alone(p):
        out = post(server, "/v1/completions", {**body(p), "stream": False})
        return out.json()["choices"][0]["text"]

    expected = [alone(p) for p in prompts]

    async def stream_one(client, p):
        text = []
        async with client.stream("POST", "/v1/completions", json=body(p), headers=AUTH) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text.append(json.loads(line[6:])["choices"][0]["text"])
        return "".join(text)

    async def run_all():
        async with httpx.AsyncClient(base_url=server["base"], timeout=300) as client:
            innocents = [asyncio.ensure_future(stream_one(client, p)) for p in prompts]
            statuses = []
            for h in hostile * 2:
                content = json.dumps(h).encode()  # NaN goes out as the bare NaN Python's parser accepts
                statuses.append((await client.post("/v1/completions", content=content,
                                                   headers={**AUTH, "Content-Type": "application/json"})).status_code)
            return await asyncio.gather(*innocents), statuses

    together, statuses = asyncio.run(run_all())
    assert together == expected
    assert statuses == [200, 200, 200, 200, 400, 400, 400] * 2
    wait_until_idle(server)


def test_a_stream_nobody_reads_is_paused_then_resumed(server):
    """A client that stops reading: once the OS buffers and the request's own queue are full, the
    engine stops generating for it (it keeps its place); when it reads again, the stream finishes."""
    request = json.dumps({"prompt": "Story:", "max_tokens": 600, "ignore_eos": True, "stream": True,
                          "temperature": 0, "logprobs": 5}).encode()  # ~0.5 KB per chunk: buffers fill sooner
    before = metric(server, "minillm_generation_tokens_total")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server["port"]))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: "
                 + str(len(request)).encode() + b"\r\n\r\n" + request)
    deadline, last, paused = time.time() + 60, -1.0, False
    while time.time() < deadline:
        time.sleep(1.0)
        now = metric(server, "minillm_generation_tokens_total") - before
        if metric(server, "minillm_num_requests_paused") == 1 and now == last:
            paused = True
            break
        last = now
    assert paused, f"still generating for a client that reads nothing ({last:.0f} tokens)"
    assert last < 600, last
    sock.settimeout(120)
    received = b""
    while not received.endswith(b"data: [DONE]\n\n") and not received.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        received += chunk
    sock.close()
    assert b'"finish_reason": "length"' in received
    assert metric(server, "minillm_generation_tokens_total") - before == 600
    wait_until_idle(server)


def test_health_and_blocks_after_everything(server):
    assert httpx.get(server["base"] + "/health").json() == {"status": "ok"}
    wait_until_idle(server)
    assert post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 3}).status_code == 200


# -- the CLI ------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minillm", *args], capture_output=True, timeout=300)


@pytest.mark.parametrize("args,code,message", [
    (["generate", "hi", "--temperature", "nan"], 1, b"temperature must be"),
    (["generate", "hi", "--top-p", "inf"], 1, b"top_p must be"),
    (["generate", "hi", "--seed", str(2**64)], 1, b"seed must be"),
    (["generate", "hi", "--repetition-penalty", "1e-300"], 1, b"repetition_penalty must be"),
    (["generate", "hi", "--max-tokens", "0"], 1, b"max_tokens must be"),
    (["generate", b"a\xffb"], 1, b"not valid Unicode"),
    (["generate", "hi", "--stop", b"\xff"], 1, b"not valid Unicode"),
    (["chat", "--system", b"\xed\xa0\x80"], 1, b"not valid Unicode"),
    (["generate", "hi", "--top-k", "many"], 2, b"--top-k"),
    (["serve", "--port", "70000"], 2, b"--port"),
    (["serve", "--max-concurrency", "0"], 2, b"--max-concurrency"),
    (["serve", "--api-key", ""], 1, b"--api-key"),
    (["bench", "--runs", "0"], 2, b"--runs"),
    (["bench", "--serve", "--concurrency", "0"], 2, b"--concurrency"),
])
def test_cli_user_errors_are_one_line(args, code, message):
    result = run_cli(*args)
    assert result.returncode == code, result.stderr
    assert b"Traceback" not in result.stderr and message in result.stderr
    if code == 1:
        assert result.stderr.strip().count(b"\n") == 0, result.stderr


def test_cli_a_temperature_below_the_greedy_threshold_is_greedy(smollm):
    from minillm import SamplingParams

    result = run_cli("generate", "The capital of France is", "--max-tokens", "8", "--temperature", "1e-300")
    assert result.returncode == 0, result.stderr
    expected = smollm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))[0].text
    assert result.stdout.decode() == "The capital of France is" + expected + "\n"


# -- the engine process dies ------------------------------------------------------------------------


def engine_process(server_pid: int) -> int:
    """The server's engine process: its child started by multiprocessing's spawn."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = open(f"/proc/{entry}/status").read()
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
        except OSError:
            continue
        if f"\nPPid:\t{server_pid}\n" in status and b"spawn_main" in cmdline:
            return int(entry)
    raise AssertionError("no engine process found")


def test_a_crashed_engine_process_fails_requests_and_never_hangs():
    """The engine runs in its own process; if it dies, the stream in flight ends with an OpenAI-shaped
    server error, /health says 503 with the reason, and new requests get 503 at once."""
    servers = start_server()
    server = next(servers)
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        events, killed = [], False
        with httpx.stream("POST", server["base"] + "/v1/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 3 and not killed:
                    os.kill(engine_process(server["proc"].pid), signal.SIGKILL)
                    killed = True
        assert events[-1] == "[DONE]" and len(events) < 2000
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "engine process exited" in error["message"]
        health = httpx.get(server["base"] + "/health", timeout=5)
        assert health.status_code == 503 and "engine process exited" in health.json()["detail"]
        error = assert_refused(httpx.post(server["base"] + "/v1/completions", json={"prompt": "hi"}, timeout=5), 503)
        assert error["type"] == "service_unavailable"
    finally:
        servers.close()


# -- nothing heavy on the event loop, grammars checked before admission (issue 28) -----------------------


def test_health_answers_while_big_prompts_are_tokenized(server):
    """Prompts are tokenized in a worker thread: /health keeps answering while a request of ~3 MB of text
    is tokenized prompt by prompt (each fits the context; all together they exceed the KV cache: a 400)."""
    prompts = [("word " * 6000).strip() + f" {i}" for i in range(100)]

    async def run():
        async with httpx.AsyncClient(base_url=server["base"], timeout=120, headers=AUTH) as client:
            big = asyncio.ensure_future(client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 4}))
            answered = 0
            while not big.done():
                assert (await client.get("/health")).status_code == 200
                answered += not big.done()
            return (await big), answered

    response, answered = asyncio.run(run())
    assert_refused(response, 400, "prompt")
    assert answered >= 3  # on the event loop, every /health would have waited for the whole tokenization


@pytest.mark.parametrize("raw,status,words", [
    (b'{"prompt": "' + b"a " * (4 << 20) + b'"}', 400, "bytes of text"),
    (b'{"prompt": [' + b"1," * ((8 << 20) - 8) + b'1]}', 413, "JSON values"),
    (b'{"prompt": [' + b"1," * 9000 + b'1]}', 400, "context"),
    (b'{"messages": [' + b'{"role": "user", "content": "a"},' * 9000 + b'{"role": "user", "content": "a"}]}',
     400, "messages"),
], ids=["8MiB-text", "8M-ids", "9001-ids", "9001-messages"])
def test_oversized_inputs_are_refused_before_tokenizing(server, raw, status, words):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    error = assert_refused(post(server, path, None, raw=raw), status)
    assert words in error["message"]


def test_a_request_cannot_claim_the_kv_cache_many_times_over(server):
    error = assert_refused(post(server, "/v1/completions", {"prompt": "hi", "n": 16, "max_tokens": 8100}), 400, "n")
    assert "KV cache" in error["message"]


@pytest.mark.parametrize("extra,param", [
    ({"guided_choice": [f"choice {i}" for i in range(100_000)]}, "guided_choice"),
    ({"guided_choice": ["x" * (1 << 20)]}, "guided_choice"),
    ({"guided_regex": "a" * (2 << 20)}, "guided_regex"),
    ({"guided_regex": "[^\\s\\S]"}, "guided_regex"),
    ({"guided_json": {"$ref": "#"}}, "guided_json"),
    ({"guided_json": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}},
     "guided_json"),
    ({"guided_json": {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}}, "guided_json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}},
     "response_format"),
], ids=["100k-choices", "1MiB-choice", "2MiB-regex", "empty-regex", "ref-root", "ref-loop", "requires-itself",
        "response-format"])
def test_grammars_that_cannot_work_are_a_short_400_before_generation(server, extra, param):
    response = post(server, "/v1/chat/completions", {"messages": ASK, "max_tokens": 8, **extra})
    assert_refused(response, 400, param)
    assert len(response.content) < 1500  # the input is never echoed back whole


def test_image_parts_are_refused_by_name(server):
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    error = assert_refused(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [part]}]}),
                           400, "messages")
    assert "image_url" in error["message"] and "text only" in error["message"]


# -- timeouts, fairness, a supervised engine: a server with tight settings ---------------------------


@pytest.fixture(scope="module")
def tight():
    yield from start_server("--read-timeout", "2", "--engine-timeout", "5", "--max-queue-wait", "2",
                            "--max-concurrency", "2")


def raw_connection(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server["port"]))
    sock.settimeout(20)
    return sock


def test_a_head_sent_slowly_is_cut_off(tight):
    sock = raw_connection(tight)
    started, closed = time.time(), False
    try:
        for piece in [b"POST /v1/completions HTTP/1.1\r\n", *(b"X-Slow: %d\r\n" % i for i in range(40))]:
            sock.sendall(piece)
            time.sleep(0.25)
    except OSError:
        closed = True
    if not closed:
        closed = sock.recv(1024) == b""
    assert closed and time.time() - started < 10  # the trickle would have taken 10 s


def test_a_body_shorter_than_its_length_gets_408(tight):
    sock = raw_connection(tight)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n" + b'{"prompt": ')
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in reply


def stream_in_background(server, body):
    """A streaming request read on a thread; returns (thread, events)."""
    import threading

    events = []

    def read():
        with httpx.stream("POST", server["base"] + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    while not events:
        time.sleep(0.05)
    return thread, events


LONG = {"prompt": "Once upon a time", "max_tokens": 600, "ignore_eos": True}


def test_a_small_request_is_served_while_a_big_one_holds_every_slot(tight):
    thread, events = stream_in_background(tight, {**LONG, "n": 2})  # both slots, one request
    response = httpx.post(tight["base"] + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert response.status_code == 200 and thread.is_alive()  # served while the big one runs
    thread.join()
    assert events[-1] == "[DONE]"


def test_a_request_that_waits_too_long_gets_503(tight):
    streams = [stream_in_background(tight, LONG) for _ in range(2)]  # one slot each: nobody may preempt
    response = httpx.post(tight["base"] + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    error = assert_refused(response, 503)
    assert error["code"] == "queue_timeout"
    for thread, _ in streams:
        thread.join()


def test_a_stopped_engine_is_noticed_killed_and_restarted(tight):
    thread, events = stream_in_background(tight, LONG)
    os.kill(engine_process(tight["proc"].pid), signal.SIGSTOP)
    thread.join(timeout=30)
    assert not thread.is_alive() and "stopped responding" in events[-2]
    health = httpx.get(tight["base"] + "/health", timeout=5)
    assert health.status_code == 503 and "restarting" in health.json()["detail"]
    assert metric(tight, "minillm_num_requests_running") == 0  # the dead engine's numbers are gone
    deadline = time.time() + 180
    while httpx.get(tight["base"] + "/health", timeout=5).status_code != 200 and time.time() < deadline:
        time.sleep(0.5)
    assert httpx.post(tight["base"] + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
