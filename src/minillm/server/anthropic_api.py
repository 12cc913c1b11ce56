"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), as Claude Code and the
`anthropic` SDK speak it.

A request is translated into a chat request (`system` into a system message, text / `tool_use` /
`tool_result` / `thinking` blocks into chat messages, tools' `input_schema` into chat tools, `thinking` into
the template's `enable_thinking`) and then goes the chat endpoint's way: the same checks, template, engine
path and reply parsing (reply.py). The reply comes back as content blocks (thinking, text, tool_use) or as
Anthropic's stream events; errors come in Anthropic's shape (app.py chooses it by the path).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..excerpt import excerpt
from .formats import Choice, ReplyShaping, ResponseFormat, sse
from .prepare import Job, chat_body_job, chat_prompt_ids, load_json, validated
from .protocol import APIError, ChatCompletionRequest
from .reply import BlockStream, ReplyEvent
from .state import ServerState
from .tool_stream import CallStart

# chat fields -> the Messages API's, for errors raised while the translated request is checked
FIELDS = {"stop": "stop_sequences"}


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    messages: list[Any]
    max_tokens: int | None = None  # required by /v1/messages, not by count_tokens
    system: str | list[Any] | None = None
    stop_sequences: list[str] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    stream: bool = False
    tools: list[Any] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    # fields of the API that MiniLLM does not implement: refused when set
    container: Any = None
    mcp_servers: list[Any] | None = None

    def check(self) -> None:
        for name in ("container", "mcp_servers"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server", name)


def chat_request(state: ServerState, raw: bytes,
                 counting: bool = False) -> tuple[MessagesRequest, ChatCompletionRequest]:
    """A Messages body checked and translated into a chat request (`counting`: for count_tokens, which
    needs no max_tokens)."""
    request = validated(load_json(raw), MessagesRequest)
    request.check()
    if request.max_tokens is None and not counting:
        raise APIError(400, "max_tokens: Field required", "max_tokens")
    system = _system(request.system)
    thinking = (request.thinking or {}).get("type")
    chat = {"messages": [*([{"role": "system", "content": system}] if system else []), *_messages(request.messages)],
            "max_tokens": request.max_tokens, "temperature": request.temperature, "top_p": request.top_p,
            "top_k": request.top_k, "stop": request.stop_sequences, "stream": request.stream,
            "tools": [_chat_tool(t, i) for i, t in enumerate(request.tools or [])] or None,
            "tool_choice": _chat_tool_choice(request.tool_choice), "model": request.model,
            "enable_thinking": {"enabled": True, "disabled": False}.get(thinking)}
    try:
        return request, validated({k: v for k, v in chat.items() if v is not None}, ChatCompletionRequest,
                                  state.bounds)
    except APIError as err:
        raise err.renamed(FIELDS) from None


def messages_job(state: ServerState, raw: bytes) -> Job:
    request, body = chat_request(state, raw)
    try:
        job = chat_body_job(state, body)
    except APIError as err:
        raise err.renamed(FIELDS) from None
    job.api_body = request
    return job


def count_tokens(state: ServerState, raw: bytes) -> dict[str, int]:
    """The prompt's tokens as /v1/messages would run it (its template and tools), without running it."""
    _, body = chat_request(state, raw, counting=True)
    try:
        state.admit(body)
        return {"input_tokens": len(chat_prompt_ids(body, state.tokenizer))}
    except APIError as err:
        raise err.renamed(FIELDS) from None


def _system(system: str | list[Any] | None) -> str | None:
    if not isinstance(system, list):
        return system
    return "\n".join(_block_text(block, f"system[{j}]") for j, block in enumerate(system))


def _block_text(block: Any, where: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
        raise APIError(400, f"{where} must be a text block {{'type': 'text', 'text': ...}}", where.split("[")[0])
    return block["text"]


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Anthropic's turns as chat messages: a user turn's tool_result blocks become tool messages (before its
    text), an assistant turn's tool_use blocks its tool_calls and its thinking its reasoning_content."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be 'user' or 'assistant'", "messages")
        content = message.get("content")
        if not isinstance(content, list):
            out.append({"role": role, "content": content})  # a string, or a wrong type the chat check refuses
            continue
        texts, thinking, calls, results = [], "", [], []
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            where = f"messages[{i}].content[{j}]"
            if kind == "text":
                texts.append(_block_text(block, where))
            elif kind == "tool_result" and role == "user":
                results.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                                "content": _tool_result(block.get("content"), where)})
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("input"), dict):
                    raise APIError(400, f"{where}.input must be an object", "messages")
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": block.get("name"), "arguments": json.dumps(block["input"])}})
            elif kind == "thinking" and role == "assistant":
                thinking += block.get("thinking") or ""
            elif kind == "redacted_thinking" and role == "assistant":
                continue  # encrypted by Anthropic's models: nothing a local model can read
            else:
                what = f"{excerpt(kind, 40)!r} blocks are" if isinstance(kind, str) else "a block without a type is"
                raise APIError(400, f"{where}: {what} not supported in a {role} turn; this server's model reads "
                                    "text, tool_use, tool_result and thinking blocks", "messages")
        out += results
        if texts or calls or thinking or not results:
            out.append({"role": role, "content": "".join(texts) if texts or not calls else None,
                        **({"tool_calls": calls} if calls else {}),
                        **({"reasoning_content": thinking} if thinking else {})})
    return out


def _tool_result(content: Any, where: str) -> Any:
    if not isinstance(content, list):
        return content if content is not None else ""
    return "".join(_block_text(block, f"{where}.content[{k}]") for k, block in enumerate(content))


def _chat_tool(tool: Any, i: int) -> dict[str, Any]:
    """A custom tool (name, description, input_schema) as a chat tool; Anthropic's server tools refused."""
    kind = tool.get("type", "custom") if isinstance(tool, dict) else None
    if kind != "custom":
        what = f"{excerpt(kind, 40)!r} tools are" if isinstance(kind, str) else "a tool that is not an object is"
        raise APIError(400, f"tools[{i}]: {what} not supported; this server runs custom tools only (name, "
                            "description, input_schema)", "tools")
    if not isinstance(tool.get("name"), str):
        raise APIError(400, f"tools[{i}].name must be a string", "tools")
    function = {"name": tool["name"], "parameters": tool.get("input_schema", {"type": "object"}),
                **({"description": tool["description"]} if tool.get("description") is not None else {})}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: dict[str, Any] | None) -> Any:
    kind = (choice or {}).get("type", "auto")
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind not in ("auto", "any", "none"):
        raise APIError(400, "tool_choice must be {'type': 'auto'}, {'type': 'any'}, {'type': 'none'} or "
                            "{'type': 'tool', 'name': ...}", "tool_choice")
    return {"auto": "auto", "any": "required", "none": "none"}[kind] if choice else None


class MessagesFormat(ResponseFormat):
    """A Messages API response: content blocks, whole or as Anthropic's stream events."""

    id_prefix = "msg_"

    def __init__(self, state: ServerState, job: Job) -> None:
        super().__init__(state, job)
        self.request: MessagesRequest = job.api_body
        self.eos_ids = set(state.tokenizer.eos_token_ids)
        self.prompt_tokens = sum(len(ids) for ids in job.prompts)
        self.parser = ReplyShaping(job).parser()  # one choice: the API has no n
        self.blocks = _ContentBlocks()
        self.failed = False

    def opening(self, choices: list[Choice]) -> list[str]:
        message = {**self._message([]), "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0}}
        return [sse({"type": "message_start", "message": message}, "message_start"),
                sse({"type": "ping"}, "ping")]

    def events(self, choice: Choice, item: Any, finish: str | None) -> list[str]:
        return self._add(self.parser.feed(item.text, last=finish is not None), finish is not None)

    def closing(self, choices: list[Choice], usage: dict[str, int]) -> list[str]:
        if self.failed:  # the error event ended the stream
            return []
        reason, sequence = self._stop(choices[0])
        return [sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                     "usage": {"output_tokens": usage["completion_tokens"]}}, "message_delta"),
                sse({"type": "message_stop"}, "message_stop")]

    def error_event(self, err: APIError) -> str:
        self.failed = True
        return sse(err.body("anthropic"), "error")

    def body(self, choices: list[Choice], usage: dict[str, int]) -> dict[str, Any]:
        self._add(self.parser.feed(choices[0].text, last=True), True)
        reason, sequence = self._stop(choices[0])
        return {**self._message(self.blocks.content), "stop_reason": reason, "stop_sequence": sequence,
                "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}}

    def _message(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model_name, "content": content}

    def _add(self, events: list[ReplyEvent], last: bool) -> list[str]:
        out = [event for reply_event in events for event in self.blocks.add(reply_event)]
        return out + (self.blocks.end() if last else [])

    def _stop(self, choice: Choice) -> tuple[str, str | None]:
        """Anthropic's stop_reason, and the stop sequence that ended the reply: the engine reports a stop
        string and EOS alike, so a reply that did not end on EOS ended on the stop sequence that comes first
        in its whole decoded text (the text returned stops before it)."""
        if self.parser.calls:
            return "tool_use", None
        if choice.finish_reason == "length":
            return "max_tokens", None
        if self.request.stop_sequences and choice.token_ids and choice.token_ids[-1] not in self.eos_ids:
            text = self.tokenizer.decode(choice.token_ids)
            found = [(text.find(s, len(choice.text)), s) for s in self.request.stop_sequences
                     if text.find(s, len(choice.text)) >= 0]
            if found:
                return "stop_sequence", min(found)[1]
        return "end_turn", None


class _ContentBlocks(BlockStream):
    """Content blocks as the reply's blocks: thinking, text, tool_use."""

    def __init__(self) -> None:
        super().__init__()
        self.content: list[dict[str, Any]] = []
        self.text = ""

    def open(self, event: ReplyEvent) -> list[str]:
        self.text = ""
        if isinstance(event, CallStart):
            block = {"type": "tool_use", "id": "toolu_" + event.id.removeprefix("call_"), "name": event.name,
                     "input": {}}
        elif self.kind == "thinking":
            block = {"type": "thinking", "thinking": "", "signature": ""}  # no signature: nothing is encrypted here
        else:
            block = {"type": "text", "text": ""}
        self.content.append(block)
        return [sse({"type": "content_block_start", "index": len(self.content) - 1, "content_block": dict(block)},
                    "content_block_start")]

    def extend(self, text: str) -> list[str]:
        self.text += text
        delta = {"call": {"type": "input_json_delta", "partial_json": text},
                 "thinking": {"type": "thinking_delta", "thinking": text},
                 "text": {"type": "text_delta", "text": text}}[self.kind]
        return [sse({"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta},
                    "content_block_delta")]

    def close(self) -> list[str]:
        block = self.content[-1]
        if self.kind == "call":
            try:
                arguments = json.loads(self.text)
            except ValueError:  # cut short by max_tokens: the stream had the fragments; the block needs an object
                arguments = {}
            block["input"] = arguments if isinstance(arguments, dict) else {}
        else:
            block["thinking" if self.kind == "thinking" else "text"] = self.text
        return [sse({"type": "content_block_stop", "index": len(self.content) - 1}, "content_block_stop")]
