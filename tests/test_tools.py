"""Tool calls in the chat endpoint (server/tools.py), with the official `openai` client: forced calls
(tool_choice "required" or a named function) always parse and validate against the function's
parameters, streaming delivers the call as tool_calls deltas, `role: tool` turns are accepted, and
malformed tools get a 400 naming the field."""

import json

import jsonschema
import pytest
from openai import BadRequestError, OpenAI

from minillm.server.reply import whole_reply
from minillm.server.tool_stream import HERMES
from minillm.server.tools import check_tools, template_messages
from serving import API_KEY

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
       "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY)


def _parsed(text):
    reply = whole_reply(None, HERMES, text)
    return reply.content, [(c.name, c.arguments) for c in reply.calls]


def test_parse_hermes_blocks_and_plain_json():
    content, calls = _parsed('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    assert content == "Sure." and calls == [("add", '{"a": 1, "b": 2}')]
    assert whole_reply(None, HERMES, '<tool_call>{"name": "add", "arguments": {}}</tool_call>').calls[0].id.startswith(
        "call_")
    assert _parsed('{"name": "add", "parameters": {"a": 1}}')[1] == [("add", '{"a": 1}')]
    assert _parsed("no call here") == ("no call here", [])
    assert _parsed('{"answer": 42}') == ('{"answer": 42}', [])  # JSON that is not a call
    assert _parsed("<tool_call>{broken</tool_call>")[1] == []


def test_tools_reach_a_template_that_does_not_render_them():
    functions = check_tools(TOOLS, "auto")
    earlier = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    out = template_messages(earlier, functions, "auto", template_knows_tools=False)
    assert out[0]["role"] == "system" and '"name": "get_weather"' in out[0]["content"]
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in out[2]["content"]
    assert template_messages(ASK, functions, "none", template_knows_tools=False) == ASK


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}},
                                    {"type": "function", "function": {"name": "add"}}])
@pytest.mark.slow
def test_forced_calls_parse_and_validate(client, choice):
    for seed in range(3):
        reply = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice=choice,
                                               max_tokens=80, temperature=1.0, seed=seed)
        choice_out = reply.choices[0]
        assert choice_out.finish_reason == "tool_calls"
        (call,) = choice_out.message.tool_calls
        if isinstance(choice, dict):
            assert call.function.name == choice["function"]["name"]
        jsonschema.validate(json.loads(call.function.arguments), WEATHER if call.function.name == "get_weather" else ADD)


@pytest.mark.slow
def test_streamed_call_and_the_next_turn(client):
    stream = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=80, temperature=0, stream=True)
    deltas = [(c.choices[0].delta, c.choices[0].finish_reason) for c in stream]
    calls = [call for delta, _ in deltas for call in delta.tool_calls or []]  # the name, then argument fragments
    assert deltas[-1][1] == "tool_calls" and {c.index for c in calls} == {0} and calls[0].id and calls[0].function.name
    assert all(c.id is None for c in calls[1:])
    arguments = "".join(c.function.arguments for c in calls)
    json.loads(arguments)
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0].id, "type": "function", "function": {"name": calls[0].function.name, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 21}'}]
    reply = client.chat.completions.create(model="smollm2", messages=turn, tools=TOOLS, max_tokens=24, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.slow
def test_auto_replies_are_text_or_calls(client):
    reply = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, max_tokens=24, temperature=0)
    message = reply.choices[0].message
    assert (message.tool_calls is None) == (reply.choices[0].finish_reason != "tool_calls")
    assert message.content or message.tool_calls


@pytest.mark.parametrize("kwargs,param", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "extra_body": {"response_format": {"type": "json_object"}}},
     "tool_choice"),
])
@pytest.mark.slow
def test_malformed_tools_are_refused_by_field(client, kwargs, param):
    with pytest.raises(BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=8, **kwargs)
    assert err.value.body["param"] == param


CITY_DEFS = {"$defs": {"City": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}},
                                "required": ["name"], "additionalProperties": False}},
             "type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"],
             "additionalProperties": False}  # what pydantic emits for a nested model


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_city_weather"}}])
@pytest.mark.slow
def test_forced_calls_resolve_defs_and_refs(client, choice):
    tools = [*TOOLS, {"type": "function", "function": {"name": "get_city_weather", "parameters": CITY_DEFS}}]
    reply = client.chat.completions.create(model="smollm2", messages=ASK, tools=tools, tool_choice=choice,
                                           max_tokens=60, temperature=0)
    call = reply.choices[0].message.tool_calls[0].function
    if call.name == "get_city_weather":
        jsonschema.validate(json.loads(call.arguments), CITY_DEFS)
    assert reply.choices[0].finish_reason == "tool_calls"
