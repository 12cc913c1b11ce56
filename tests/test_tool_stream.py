"""Tool calls parsed as a reply streams (server/tool_stream.py), in every format, with the reply split at
every position; the Responses and Messages formats' event sequences, validated against the `openai` and
`anthropic` SDKs' own types; and the translation of those APIs' requests into chat requests, bad input
refused by name."""

from __future__ import annotations

import json
import typing

import anthropic.types as anthropic_types
import openai.types.responses as responses_types
import pytest

from minillm.engine import StepOutput
from minillm.server.anthropic_api import MessagesFormat, MessagesRequest, _messages
from minillm.server.formats import Choice
from minillm.server.prepare import Job
from minillm.server.protocol import APIError, ChatCompletionRequest
from minillm.server.responses_api import ResponsesCall, ResponsesFormat, ResponsesRequest, input_messages
from minillm.server.state import ServerState
from minillm.server.tool_stream import (HERMES, LLAMA3, MISTRAL, CallArguments, CallStart, Content, ToolCallParser,
                                        tool_syntax)
from minillm.text.chat_formats import builtin_template
from minillm.text.reasoning import Reasoning

CASES = [
    (HERMES, 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": "}"}}\n</tool_call>\n'
             '<tool_call>{"name": "f", "arguments": {}}</tool_call>', "Sure.", [("add", '{"a": 1, "b": "}"}'), ("f", "{}")]),
    (HERMES, '  {"name": "add", "arguments": {"a": [1, {"x": "\\""}]}}', "", [("add", '{"a": [1, {"x": "\\""}]}')]),
    (HERMES, '{"answer": 42}', '{"answer": 42}', []),
    (HERMES, "<tool_call>{broken</tool_call> ok", "<tool_call>{broken</tool_call> ok", []),
    (HERMES, "Hello  world \n", "Hello  world", []),
    (LLAMA3, '<|python_tag|>{"name": "add", "parameters": {"a": 1}}; {"name": "g", "parameters": {"b": 2}}', "",
     [("add", '{"a": 1}'), ("g", '{"b": 2}')]),
    (LLAMA3, "The answer is 4.", "The answer is 4.", []),
    (MISTRAL, '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": 2}}]', "",
     [("add", '{"a": 1}'), ("g", '{"b": 2}')]),
    (MISTRAL, '[{"name": "add", "arguments": {"a": 1}}]', "", [("add", '{"a": 1}')]),
    (MISTRAL, "[1, 2]", "[1, 2]", []),
]


def _parse(syntax, pieces):
    parser, events = ToolCallParser(syntax), []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    return parser, events


@pytest.mark.parametrize("syntax,text,content,calls", CASES)
def test_calls_and_content_whatever_the_split(syntax, text, content, calls):
    for cut in range(len(text) + 1):
        for second in range(cut, len(text) + 1):
            parser, events = _parse(syntax, [text[:cut], text[cut:second], text[second:]])
            assert "".join(e.text for e in events if isinstance(e, Content)) == content
            assert [(c.name, c.arguments) for c in parser.calls] == calls
            starts = [e for e in events if isinstance(e, CallStart)]
            assert [(e.index, e.id, e.name) for e in starts] == [(i, c.id, c.name) for i, c in enumerate(parser.calls)]
            for i, call in enumerate(parser.calls):  # the fragments join into exactly the final arguments
                assert "".join(e.fragment for e in events if isinstance(e, CallArguments) and e.index == i) == \
                    call.arguments


def test_name_comes_before_the_arguments_end():
    parser = ToolCallParser(HERMES)
    assert parser.feed('<tool_call>{"name": "get_weather", "arguments": {"ci') == [
        CallStart(0, parser.calls[0].id, "get_weather"), CallArguments(0, '{"ci')]


def test_syntax_chosen_from_the_template():
    assert tool_syntax(builtin_template("qwen3"), True) is HERMES
    assert tool_syntax("{{ '[TOOL_CALLS]' }}{{ tools }}", True) is MISTRAL
    assert tool_syntax("<|start_header_id|>{{ tools }}<|python_tag|>", True) is LLAMA3
    assert tool_syntax(builtin_template("llama3"), False) is HERMES  # tools go in our Hermes system prompt


class _Tokenizer:
    eos_token_ids = [0]

    def encode(self, text, add_special_tokens=True):
        return text.split()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(str, ids))


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
REPLY = '<think>Paris, so\nweather.</think>\n\nLet me look.\n<tool_call>\n{"name": "get_weather", ' \
        '"arguments": {"city": "Paris"}}\n</tool_call>'


def _job(api_body) -> tuple[ServerState, Job]:
    state = ServerState("m")
    state.tokenizer = _Tokenizer()
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS})
    return state, Job(body, [[1, 2, 3]], None, reasoning=Reasoning(), tools=HERMES, api_body=api_body)


def sdk_event_types(union) -> dict:
    """An SDK's stream event union as {event type: its model}, to validate each event by its own type."""
    if typing.get_origin(union) is typing.Annotated:  # a discriminated union: Annotated[Union[...], ...]
        union = typing.get_args(union)[0]
    return {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in typing.get_args(union)}


def _run(fmt, pieces, finish="stop"):
    """The stream's events (parsed back from SSE) and the whole body of the same reply."""
    choice, events = Choice(0, "r", None), [*fmt.opening([])]
    for k, text in enumerate(pieces):
        item = StepOutput("r", text, [k + 1], finish if k == len(pieces) - 1 else None)
        choice.add(item)
        events += fmt.events(choice, item, choice.finish_reason if item.finished else None)
    usage = {"prompt_tokens": 3, "completion_tokens": len(pieces), "total_tokens": 3 + len(pieces)}
    events += fmt.closing([choice], usage)
    parsed = []
    for event in events:
        name, data = event.split("\n")[:2]
        payload = json.loads(data.removeprefix("data: "))
        assert name == f"event: {payload['type']}"
        parsed.append(payload)
    return parsed, choice, usage


def test_responses_events_validate_against_the_sdk():
    request = ResponsesRequest.model_validate({"input": "x", "tools": [{"type": "function", "name": "get_weather"}]})
    pieces = [REPLY[i:i + 7] for i in range(0, len(REPLY), 7)]
    state, job = _job(ResponsesCall(request, [{"role": "user", "content": "x"}]))
    events, choice, usage = _run(ResponsesFormat(state, job), pieces)
    types = sdk_event_types(responses_types.ResponseStreamEvent)
    for event in events:
        types[event["type"]].model_validate(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    final = responses_types.Response.model_validate(events[-1]["response"])
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call"]
    assert final.output[0].content[0].text == "Paris, so\nweather." and final.output_text == "Let me look."
    call = final.output[2]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert deltas == call.arguments == '{"city": "Paris"}' and call.name == "get_weather"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Let me look."
    # the whole body holds the same output (its own ids), and both were stored for previous_response_id
    whole = ResponsesFormat(state, job).body([choice], usage)
    assert [(i["type"], i.get("arguments")) for i in whole["output"]] == \
        [(i.type, getattr(i, "arguments", None)) for i in final.output]
    stored = state.responses.get(whole["id"]).conversation
    assert stored[-1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert stored[-1]["reasoning_content"] == "Paris, so\nweather."


def test_messages_events_validate_against_the_sdk():
    request = MessagesRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "max_tokens": 9})
    pieces = [REPLY[i:i + 5] for i in range(0, len(REPLY), 5)]
    state, job = _job(request)
    events, choice, usage = _run(MessagesFormat(state, job), pieces)
    types = sdk_event_types(anthropic_types.RawMessageStreamEvent)
    for event in events:
        if event["type"] != "ping":  # Anthropic's keep-alive, outside the SDK's union
            types[event["type"]].model_validate(event)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"]
    starts = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use"]
    partial = "".join(e["delta"].get("partial_json", "") for e in events if e["type"] == "content_block_delta")
    assert json.loads(partial) == {"city": "Paris"} and events[-2]["delta"]["stop_reason"] == "tool_use"
    whole = anthropic_types.Message.model_validate(MessagesFormat(state, job).body([choice], usage))
    assert [b.type for b in whole.content] == ["thinking", "text", "tool_use"]
    assert whole.content[2].input == {"city": "Paris"} and whole.stop_reason == "tool_use"
    assert whole.content[0].thinking == "Paris, so\nweather." and whole.content[1].text == "Let me look."


def test_responses_input_items_become_chat_messages():
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
             {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "c1", "output": "21 C"},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "21 C."}]}]
    assert input_messages(items) == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "reasoning_content": "hm", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
        {"role": "assistant", "content": "21 C."}]
    for bad in ([{"type": "web_search_call"}], [{"role": "user", "content": [{"type": "input_image"}]}], [5]):
        with pytest.raises(APIError) as err:
            input_messages(bad)
        assert err.value.status == 400 and err.value.param == "input" and "not supported" in err.value.message


def test_anthropic_blocks_become_chat_messages():
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": ""},
                                                  {"type": "tool_use", "id": "t1", "name": "w", "input": {"c": 1}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                              "content": [{"type": "text", "text": "21 C"}]}]}]
    assert _messages(messages) == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "reasoning_content": "hm", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "w", "arguments": '{"c": 1}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "21 C"}]
    for bad in ([{"role": "user", "content": [{"type": "image", "source": {}}]}],
                [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "w", "input": {}}]}],
                [{"role": "system", "content": "x"}]):
        with pytest.raises(APIError) as err:
            _messages(bad)
        assert err.value.status == 400 and err.value.body("anthropic")["error"]["type"] == "invalid_request_error"
