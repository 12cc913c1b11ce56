"""The real server (`python -m minillm serve`) on a free loopback port, driven by the official
`openai` client and by raw HTTP."""

import asyncio
import json
import time

import httpx
import openai
import pytest

from serving import API_KEY, post, wait_until_idle

pytestmark = pytest.mark.slow  # a `minillm serve` process with the bundled model


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_health_models_and_metrics(server, client):
    assert server["seen_loading"]  # /health said 503 while the model loaded
    assert httpx.get(server["base"] + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    text = httpx.get(server["base"] + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    for name in ("minillm_num_requests_running", "minillm_num_requests_waiting", "minillm_kv_cache_usage_ratio",
                 "minillm_prefix_cache_hit_rate", "minillm_prefix_cache_hits_total", "minillm_prompt_tokens_total",
                 "minillm_generation_tokens_total", "minillm_time_to_first_token_seconds_bucket",
                 "minillm_inter_token_latency_seconds_bucket"):
        assert name in text


def test_completion_and_exact_usage(client):
    out = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.id and out.created
    choice = out.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    prompt_ids = client.completions.create(model="smollm2", prompt=[504, 3575, 282, 4649, 314], max_tokens=12,
                                           temperature=0)
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 12 and out.usage.total_tokens == 17
    assert prompt_ids.choices[0].text == choice.text  # the same prompt given as token ids


def test_chat_streaming_equals_non_streaming(client):
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    full = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0.8, seed=5)
    stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0.8,
                                            seed=5, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert full.choices[0].message.role == "assistant" and full.object == "chat.completion"


def test_n_stop_and_seed(client):
    out = client.completions.create(model="smollm2", prompt="List: apples, pears,", max_tokens=20, temperature=1.0,
                                    n=2, seed=42, logprobs=0)
    again = client.completions.create(model="smollm2", prompt="List: apples, pears,", max_tokens=20, temperature=1.0,
                                      n=2, seed=42)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [c.text for c in again.choices]
    assert out.choices[0].text != out.choices[1].text  # each choice samples on its own
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices)
    free = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=16, temperature=0)
    word = free.choices[0].text.split()[1]
    stopped = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=16,
                                        temperature=0, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == free.choices[0].text[: free.choices[0].text.index(word)]


def test_logprobs_shape_and_tokens_join_into_text(client):
    out = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=10, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    assert "".join(lp.tokens) == out.choices[0].text
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 3 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(v - max(top.values())) < 1e-5 for v, top in zip(lp.token_logprobs, lp.top_logprobs))
    chat = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 for t in content)


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 2}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
])
def test_bad_completion_requests(server, body, param):
    response = post(server, "/v1/completions", body)
    assert response.status_code in (400, 404)
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_bad_requests_keep_the_server_healthy(server):
    cases = [
        ("/v1/chat/completions", None, b"{not json", 400),
        ("/v1/chat/completions", {"max_tokens": 5}, None, 400),  # no messages
        ("/v1/chat/completions", {"messages": []}, None, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, None, 400),
        ("/v1/completions", {"prompt": [7] * 8190, "max_tokens": 100}, None, 400),
        ("/v1/nowhere", {"prompt": "x"}, None, 404),
    ]
    for path, body, raw, status in cases:
        response = post(server, path, body, raw=raw)
        assert response.status_code == status, (path, body, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    too_long = post(server, "/v1/completions", {"prompt": [7] * 8190, "max_tokens": 100}).json()["error"]["message"]
    assert "8190" in too_long and "8192" in too_long
    wrong_key = post(server, "/v1/completions", {"prompt": "x"}, key="wrong")
    assert wrong_key.status_code == 401 and wrong_key.json()["error"]["type"] == "authentication_error"
    assert post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2}).status_code == 200


def test_concurrent_streaming_clients_match_requests_run_alone(server):
    prompts = [f"Count from {i} to {i + 5}:" for i in range(32)]
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def body(p, stream):
        return {"prompt": p, "max_tokens": 10, "temperature": 0, "stream": stream}

    alone = [post(server, "/v1/completions", body(p, False)).json()["choices"][0]["text"] for p in prompts]

    async def stream_one(client, p):
        text = []
        async with client.stream("POST", "/v1/completions", json=body(p, True), headers=headers) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text.append(json.loads(line[6:])["choices"][0]["text"])
        return "".join(text)

    async def run_all():
        async with httpx.AsyncClient(base_url=server["base"], timeout=300) as client:
            return await asyncio.gather(*(stream_one(client, p) for p in prompts))

    together = asyncio.run(run_all())
    assert together == alone
    assert all(together)


def test_disconnected_clients_free_their_blocks(server):
    async def impatient(client, i, stream):
        try:
            if stream:
                async with client.stream("POST", "/v1/completions", json={"prompt": f"Story {i}:", "max_tokens": 400,
                                                                            "stream": True, "ignore_eos": True},
                                         headers={"Authorization": f"Bearer {API_KEY}"}) as response:
                    lines = 0
                    async for _ in response.aiter_lines():
                        lines += 1
                        if lines == 6:
                            return True  # walk away mid-stream: the connection closes
                    return False
            else:
                await client.post("/v1/completions", json={"prompt": f"Story {i}:", "max_tokens": 400, "ignore_eos": True},
                                  headers={"Authorization": f"Bearer {API_KEY}"})
        except httpx.TimeoutException:
            return True
        return False

    async def run_all():
        async with httpx.AsyncClient(base_url=server["base"], timeout=1.5) as client:
            return await asyncio.gather(*(impatient(client, i, i % 2 == 0) for i in range(12)))

    assert all(asyncio.run(run_all()))
    wait_until_idle(server, timeout=20)
    start = time.time()
    assert post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 4}).status_code == 200
    assert time.time() - start < 10
