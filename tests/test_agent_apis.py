"""The APIs agents and SDKs speak, against the real server with the real clients: OpenAI's Responses API and
embeddings (`openai`), Anthropic's Messages API (`anthropic`), llama.cpp's /tokenize and /detokenize; every
streamed event validated against the SDK's own types, tool calls round-tripped, and hostile inputs refused
in each API's own error shape."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import numpy as np
import openai
import openai.types.responses as responses_types
import anthropic.types as anthropic_types
import pytest

from serving import API_KEY, post
from test_tool_stream import sdk_event_types

pytestmark = pytest.mark.slow  # the shared `minillm serve` process

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
           "additionalProperties": False}
ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server["base"], api_key=API_KEY, max_retries=0, timeout=120)


def _events(server, path, body, headers):
    """A stream's events as (name, payload)."""
    with httpx.stream("POST", server["base"] + path, json={**body, "stream": True}, headers=headers,
                      timeout=120) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    payloads = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert names == [p["type"] for p in payloads]
    return payloads


def _responses_events(server, body):
    events = _events(server, "/v1/responses", body, {"Authorization": f"Bearer {API_KEY}"})
    types = sdk_event_types(responses_types.ResponseStreamEvent)
    for event in events:
        types[event["type"]].model_validate(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_responses_text_whole_and_streamed(server, oai):
    body = {"model": "smollm2", "input": "Name a color.", "instructions": "Answer in one word.",
            "max_output_tokens": 12, "temperature": 0}
    whole = oai.responses.create(**body)
    assert whole.status in ("completed", "incomplete") and whole.output_text and whole.instructions
    assert whole.usage.output_tokens <= 12 and whole.usage.total_tokens == whole.usage.input_tokens + \
        whole.usage.output_tokens
    raw = post(server, "/v1/responses", body).json()
    responses_types.Response.model_validate(raw)
    events = _responses_events(server, body)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] == f"response.{whole.status}"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == whole.output_text
    with oai.responses.stream(**body) as stream:  # the SDK's own accumulation
        assert stream.get_final_response().output_text == whole.output_text


def test_responses_function_call_round_trip(server, oai):
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER, "strict": True}]
    body = {"model": "smollm2", "input": ASK, "tools": tools, "tool_choice": "required", "max_output_tokens": 40,
            "temperature": 0}
    first = oai.responses.create(**body)
    (call,) = [item for item in first.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    events = _responses_events(server, body)
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert deltas == done[0]["arguments"] == call.arguments and done[0]["name"] == "get_weather"
    output = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}
    # the conversation continued from the store, and the same turn sent whole: the same prompt
    followed = oai.responses.create(model="smollm2", previous_response_id=first.id, input=[output], tools=tools,
                                    max_output_tokens=16, temperature=0)
    explicit = oai.responses.create(model="smollm2", input=[{"role": "user", "content": ASK},
                                                            call.model_dump(exclude_none=True), output],
                                    tools=tools, max_output_tokens=16, temperature=0)
    assert followed.usage.input_tokens == explicit.usage.input_tokens
    assert followed.output_text == explicit.output_text and followed.previous_response_id == first.id
    assert oai.responses.retrieve(first.id).id == first.id
    oai.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(first.id)


def test_responses_store_false_and_structured_output(oai):
    unstored = oai.responses.create(model="smollm2", input="Hi", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError) as err:
        oai.responses.create(model="smollm2", input="Again", previous_response_id=unstored.id, max_output_tokens=4)
    assert err.value.body["param"] == "previous_response_id"
    schema = {"type": "object", "properties": {"color": {"type": "string", "maxLength": 12}}, "required": ["color"],
              "additionalProperties": False}
    shaped = oai.responses.create(model="smollm2", input="A color as JSON", max_output_tokens=40,
                                  text={"format": {"type": "json_schema", "name": "c", "schema": schema}})
    jsonschema.validate(json.loads(shaped.output_text), schema)


def test_messages_whole_streamed_and_counted(server, claude):
    body = {"model": "smollm2", "max_tokens": 12, "system": "Be brief.",
            "messages": [{"role": "user", "content": "Name a color."}]}
    greedy = {"temperature": 0}  # beside the SDK's arguments: its current version has no sampling parameters
    whole = claude.messages.create(**body, extra_body=greedy)
    assert whole.type == "message" and whole.content[0].type == "text" and whole.content[0].text
    assert whole.stop_reason in ("end_turn", "max_tokens")
    assert claude.messages.count_tokens(**{k: v for k, v in body.items() if k != "max_tokens"}
                                        ).input_tokens == whole.usage.input_tokens
    events = _events(server, "/v1/messages", {**body, **greedy}, {"x-api-key": API_KEY})
    types = sdk_event_types(anthropic_types.RawMessageStreamEvent)
    for event in events:
        if event["type"] != "ping":
            types[event["type"]].model_validate(event)
    assert [e["type"] for e in events][-2:] == ["message_delta", "message_stop"]
    with claude.messages.stream(**body, extra_body=greedy) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text and final.usage.output_tokens == whole.usage.output_tokens
    word = whole.content[0].text.split()[-1] if whole.stop_reason == "max_tokens" else None
    if word:
        stopped = claude.messages.create(**body, stop_sequences=["zzz", word], extra_body=greedy)
        assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word


def test_messages_tool_use_round_trip(server, claude):
    tools = [{"name": "get_weather", "description": "Weather of a city", "input_schema": WEATHER}]
    body = {"model": "smollm2", "max_tokens": 40, "tools": tools, "tool_choice": {"type": "any"},
            "messages": [{"role": "user", "content": ASK}]}
    greedy = {"temperature": 0}
    first = claude.messages.create(**body, extra_body=greedy)
    (use,) = [block for block in first.content if block.type == "tool_use"]
    assert first.stop_reason == "tool_use" and use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER)
    events = _events(server, "/v1/messages", {**body, **greedy}, {"x-api-key": API_KEY})
    partial = "".join(e["delta"]["partial_json"] for e in events
                      if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta")
    assert json.loads(partial) == use.input
    with claude.messages.stream(**body, extra_body=greedy) as stream:
        assert [b.input for b in stream.get_final_message().content if b.type == "tool_use"] == [use.input]
    turn = [*body["messages"], {"role": "assistant", "content": first.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C"}]}]
    reply = claude.messages.create(**{**body, "tool_choice": {"type": "auto"}, "messages": turn, "max_tokens": 16},
                                   extra_body=greedy)
    assert reply.content and reply.usage.input_tokens > first.usage.input_tokens


def test_chat_tool_call_stream_joins_into_the_final_arguments(oai):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    args = {"model": "smollm2", "messages": [{"role": "user", "content": ASK}], "tools": tools,
            "tool_choice": "required", "max_tokens": 40, "temperature": 0}
    whole = oai.chat.completions.create(**args).choices[0].message.tool_calls[0]
    calls = [c for chunk in oai.chat.completions.create(**args, stream=True) for c in chunk.choices[0].delta.tool_calls or []]
    assert calls[0].id and calls[0].function.name == "get_weather" and len(calls) > 2  # fragments, not one delta
    assert "".join(c.function.arguments or "" for c in calls) == whole.function.arguments


def test_tokenize_detokenize_and_embeddings(server, oai):
    ids = post(server, "/tokenize", {"content": "Hello world"}).json()["tokens"]
    pieces = post(server, "/tokenize", {"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids and "".join(p["piece"] for p in pieces) == "Hello world"
    assert post(server, "/detokenize", {"tokens": ids}).json() == {"content": "Hello world"}
    assert post(server, "/detokenize", {"tokens": [10 ** 9]}).json()["error"]["param"] == "tokens"
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Quarterly tax revenue fell sharply."]
    out = oai.embeddings.create(model="smollm2", input=texts)  # the SDK asks for base64
    vectors = np.array([d.embedding for d in out.data])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5) and out.usage.prompt_tokens > 0
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    floats = post(server, "/v1/embeddings", {"input": texts[0], "encoding_format": "float"}).json()
    assert np.allclose(floats["data"][0]["embedding"], vectors[0], atol=1e-6)
    last = post(server, "/v1/embeddings", {"input": texts[0], "pooling": "last"}).json()["data"][0]["embedding"]
    assert not np.allclose(last, vectors[0])
    with pytest.raises(openai.BadRequestError) as err:
        oai.embeddings.create(model="smollm2", input="x", dimensions=8)
    assert err.value.body["param"] == "dimensions"


@pytest.mark.parametrize("body,param", [
    ({"input": [{"type": "web_search_call"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": "x", "tools": [{"type": "file_search"}]}, "tools"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"input": "x", "tools": [{"type": "function", "name": f"f{i}", "description": "d" * 200}
                              for i in range(5000)]}, "input"),
])
def test_hostile_responses_requests(server, body, param):
    response = post(server, "/v1/responses", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("body,words", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "'image' blocks"),
    ({"messages": [{"role": "user", "content": [{"type": "mystery"}]}]}, "'mystery' blocks"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "w"}]},
     "custom tools only"),
    ({"messages": [{"role": "user", "content": "x"}], "stop_sequences": [""]}, "stop_sequences"),
    ({"messages": [{"role": "user", "content": "x"}],
      "tools": [{"name": f"f{i}", "description": "d" * 200, "input_schema": {}} for i in range(5000)]}, "bytes"),
])
def test_hostile_messages_requests(claude, body, words):
    with pytest.raises(anthropic.BadRequestError) as err:
        claude.messages.create(model="smollm2", max_tokens=8, **body)
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "invalid_request_error"
    assert words in err.value.body["error"]["message"]


def test_messages_auth_model_and_required_fields(server, claude):
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server["base"], api_key="wrong", max_retries=0).messages.create(
            model="smollm2", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    missing = post(server, "/v1/messages", {"messages": [{"role": "user", "content": "x"}]})
    assert missing.status_code == 400 and "max_tokens" in missing.json()["error"]["message"]
