"""Reasoning on the chat endpoint: the <think> section returned as reasoning_content, whole and streamed
(tags split across outputs at every position never reach content), and enable_thinking /
chat_template_kwargs reaching the template of a real server."""

from __future__ import annotations

import json

import httpx
import pytest

from minillm.engine import StepOutput
from minillm.server.formats import ChatFormat, Choice
from minillm.server.prepare import Job
from minillm.server.protocol import ChatCompletionRequest
from minillm.server.state import ServerState
from minillm.server.tool_stream import HERMES
from minillm.text.reasoning import Reasoning
from serving import API_KEY, post, start_server

REPLY = "<think>\nLet me think.\n</think>\n\nHi!"


def _format(reasoning: Reasoning | None, **fields) -> ChatFormat:
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **fields})
    return ChatFormat(ServerState("m"), Job(body, [[1]], None, reasoning=reasoning,
                                            tools=HERMES if "tools" in fields else None))


def _stream(fmt: ChatFormat, pieces: list[str]) -> tuple[list[dict], dict]:
    """The deltas of a reply streamed in `pieces`, and its whole-response message."""
    choice, deltas = Choice(0, "r", None), []
    for k, text in enumerate(pieces):
        item = StepOutput("r", text, [k], "stop" if k == len(pieces) - 1 else None)
        choice.add(item)
        piece = fmt.piece(choice, item, choice.finish_reason if item.finished else None)
        if piece is not None:
            deltas.append(piece["delta"])
    return deltas, fmt.choice(choice)["message"]


def _joined(deltas: list[dict], key: str) -> str:
    return "".join(d.get(key, "") for d in deltas)


def test_streamed_reasoning_with_tags_split_at_every_position():
    for cut in range(len(REPLY) + 1):
        for second in range(cut, len(REPLY) + 1):
            pieces = [REPLY[:cut], REPLY[cut:second], REPLY[second:]]
            deltas, message = _stream(_format(Reasoning()), pieces)
            assert _joined(deltas, "reasoning_content") == "Let me think." and _joined(deltas, "content") == "Hi!"
            assert all("<" not in d.get("content", "") for d in deltas), pieces
            assert message == {"role": "assistant", "content": "Hi!", "reasoning_content": "Let me think."}


def test_reasoning_open_at_start_cut_short_and_absent():
    deltas, message = _stream(_format(Reasoning(open_at_start=True)), ["Still ", "thinking </thi"])
    assert _joined(deltas, "content") == "" and message == {"role": "assistant", "content": "",
                                                             "reasoning_content": "Still thinking </thi"}
    deltas, message = _stream(_format(None), [REPLY])  # a template without a thinking section: all content
    assert deltas == [{"content": REPLY}] and message == {"role": "assistant", "content": REPLY}
    # a grammar shapes the reply: all content, whatever the template
    fmt = _format(Reasoning(open_at_start=True), response_format={"type": "json_object"})
    assert _stream(fmt, ['{"a": 1}'])[1] == {"role": "assistant", "content": '{"a": 1}'}


def test_tool_calls_are_parsed_from_the_content_alone():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    reply = '<think>I should call f.</think>\n<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    deltas, message = _stream(_format(Reasoning(), tools=tools), [reply[:9], reply[9:]])
    assert message["reasoning_content"] == "I should call f." and message["content"] is None
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [{"x": 1}]
    assert _joined(deltas, "reasoning_content") == "I should call f." and _joined(deltas, "content") == ""
    assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls", []) if "id" in c] == ["f"]


# A template whose reply starts inside a <think> section (as DeepSeek-R1's) unless enable_thinking is false,
# when it is given an empty one (as Qwen3's): the bundled model never closes a section it did not open.
THINKING_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% else %}{{ '<think>\\n' }}{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    yield from start_server("--api-key", API_KEY, "--chat-template", str(template))


CHAT = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 12, "temperature": 0}


@pytest.mark.slow
def test_server_returns_reasoning_and_passes_enable_thinking(thinking_server):
    whole = post(thinking_server, "/v1/chat/completions", CHAT).json()
    message = whole["choices"][0]["message"]
    assert message["content"] == "" and message["reasoning_content"]  # the section never closed: all reasoning
    with httpx.stream("POST", thinking_server["base"] + "/v1/chat/completions", json={**CHAT, "stream": True},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert _joined(deltas, "reasoning_content") == message["reasoning_content"] and _joined(deltas, "content") == ""
    for fields in ({"enable_thinking": False}, {"chat_template_kwargs": {"enable_thinking": False}},
                   {"enable_thinking": True, "chat_template_kwargs": {"enable_thinking": False}}):
        answer = post(thinking_server, "/v1/chat/completions", {**CHAT, **fields}).json()
        assert answer["usage"]["prompt_tokens"] > whole["usage"]["prompt_tokens"]  # the empty section is in it
        assert "reasoning_content" not in answer["choices"][0]["message"], fields
        assert answer["choices"][0]["message"]["content"]
    refused = post(thinking_server, "/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"messages": []}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template_kwargs"
