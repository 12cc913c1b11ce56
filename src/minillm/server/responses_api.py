"""OpenAI's Responses API (`POST /v1/responses`, `GET` / `DELETE /v1/responses/{id}`).

A request is translated into a chat request (its `input` items into messages, its flat function tools into
chat tools, `text.format` into `response_format`) and then goes the chat endpoint's way: the same checks,
template, engine path and reply parsing (reply.py), so the two APIs agree. Its errors name the Responses
API's fields. The reply comes back as output items (reasoning, message, function_call) or as the API's typed
stream events. With `store` (the default), the response and its conversation are kept in a bounded store
(response_store.py) for `previous_response_id`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..excerpt import excerpt
from .formats import Choice, ReplyShaping, ResponseFormat, sse
from .prepare import Job, chat_body_job, load_json, validated
from .protocol import APIError, ChatCompletionRequest
from .reply import BlockStream, ReplyEvent
from .state import ServerState
from .tool_stream import CallStart

# chat fields -> the Responses API's, for errors raised while the translated request is checked
FIELDS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format"}
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    tools: list[Any] = []
    tool_choice: str | dict[str, Any] = "auto"
    text: dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    user: str | None = None
    metadata: dict[str, str] | None = None
    # fields of the API that MiniLLM does not implement: refused when set
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    include: list[Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    reasoning: dict[str, Any] | None = None

    def check(self) -> None:
        refused = {"background": bool(self.background), "conversation": self.conversation is not None,
                   "prompt": self.prompt is not None, "include": bool(self.include),
                   "truncation": self.truncation == "auto", "top_logprobs": bool(self.top_logprobs),
                   "max_tool_calls": self.max_tool_calls is not None,
                   "reasoning": bool((self.reasoning or {}).get("effort"))}
        for name, set_ in refused.items():
            if set_:
                raise APIError(400, f"{name} is not supported by this server", name)


@dataclass
class ResponsesCall:
    """A Responses request as its job carries it: the request, and the conversation its response continues
    (the previous response's, then this request's input; never the instructions, which OpenAI does not
    carry over to the next response)."""

    request: ResponsesRequest
    conversation: list[dict[str, Any]]


def responses_job(state: ServerState, raw: bytes) -> Job:
    data = load_json(raw)
    request = validated(data, ResponsesRequest)
    request.check()
    history = [] if request.previous_response_id is None else \
        state.responses.get(request.previous_response_id, "previous_response_id").conversation
    conversation = [*history, *input_messages(request.input)]
    system = [{"role": "system", "content": request.instructions}] if request.instructions else []
    chat = {"messages": [*system, *conversation], "temperature": request.temperature, "top_p": request.top_p,
            "stream": request.stream, "tools": [_chat_tool(t, i) for i, t in enumerate(request.tools)] or None,
            "tool_choice": _chat_tool_choice(request.tool_choice), "response_format": _response_format(request.text),
            "max_completion_tokens": request.max_output_tokens, "model": request.model, "user": request.user}
    try:
        body = validated({k: v for k, v in chat.items() if v is not None}, ChatCompletionRequest, state.bounds)
        job = chat_body_job(state, body)
    except APIError as err:
        raise err.renamed(FIELDS) from None
    job.api_body = ResponsesCall(request, conversation)
    return job


def input_messages(items: str | list[Any]) -> list[dict[str, Any]]:
    """`input` as chat messages: messages, function calls (joined into the assistant message before them),
    function call outputs (tool messages) and reasoning (the next assistant message's reasoning_content)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    reasoning = ""
    for i, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            message = {"role": item.get("role"), "content": _text(item.get("content"), f"input[{i}].content")}
            if message["role"] == "assistant" and reasoning:
                message["reasoning_content"], reasoning = reasoning, ""
            messages.append(message)
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call],
                                 **({"reasoning_content": reasoning} if reasoning else {})})
                reasoning = ""
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _text(item.get("output"), f"input[{i}].output")})
        elif kind == "reasoning":
            reasoning += "".join(part.get("text", "") for part in item.get("content") or [] if isinstance(part, dict))
        else:
            what = f"{excerpt(kind, 40)!r} items are" if isinstance(kind, str) else "an item that is not an object is"
            raise APIError(400, f"input[{i}]: {what} not supported (message, function_call, function_call_output, "
                                "reasoning)", "input")
    return messages


def _text(content: Any, where: str) -> Any:
    """Content as text: text parts joined; other parts (images, files, audio) refused by name."""
    if not isinstance(content, list):
        return content  # a string, or a wrong type the chat request's check refuses
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            what = f"{excerpt(kind, 40)!r} parts are" if isinstance(kind, str) else "a part without a type is"
            raise APIError(400, f"{where}[{j}]: {what} not supported; this server's model reads text only "
                                "(input_text, output_text)", "input")
        text = part.get("refusal" if kind == "refusal" else "text")
        if not isinstance(text, str):
            raise APIError(400, f"{where}[{j}].text must be a string", "input")
        texts.append(text)
    return "".join(texts)


def _chat_tool(tool: Any, i: int) -> dict[str, Any]:
    """A Responses function tool (flat: name, description, parameters) as a chat tool."""
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        what = f"{excerpt(kind, 40)!r} tools are" if isinstance(kind, str) else "a tool without a type is"
        raise APIError(400, f"tools[{i}]: {what} not supported; this server runs function tools only", "tools")
    function = {key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}
    if not isinstance(function.get("name"), str):
        raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'name': ..., 'parameters': {{...}}}}", "tools")
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any]) -> Any:
    if isinstance(choice, str):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}",
                       "tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format") or {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(400, "text.format must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                            "'json_schema', 'name': ..., 'schema': {...}}", "text.format")
    if fmt["type"] == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema")}}
    return {"type": fmt["type"]}


class ResponsesFormat(ResponseFormat):
    """A Responses API response: output items, whole or as typed events (each with its sequence_number)."""

    id_prefix = "resp_"

    def __init__(self, state: ServerState, job: Job) -> None:
        super().__init__(state, job)
        self.call: ResponsesCall = job.api_body
        self.store = state.responses
        self.parser = ReplyShaping(job).parser()  # one choice: the API has no n
        self.items = _OutputItems(self)
        self.sequence = 0
        self.failed: APIError | None = None

    def event(self, kind: str, **fields: Any) -> str:
        self.sequence += 1
        return sse({"type": kind, "sequence_number": self.sequence - 1, **fields}, event=kind)

    def opening(self, choices: list[Choice]) -> list[str]:
        response = self.response("in_progress", None)
        return [self.event("response.created", response=response),
                self.event("response.in_progress", response=response)]

    def events(self, choice: Choice, item: Any, finish: str | None) -> list[str]:
        return self._add(self.parser.feed(item.text, last=finish is not None), finish is not None)

    def closing(self, choices: list[Choice], usage: dict[str, int]) -> list[str]:
        if self.failed is not None:
            error = {"code": self.failed.code or self.failed.kind, "message": self.failed.message}
            return [self.event("response.failed", response={**self.response("failed", usage), "error": error})]
        response = self._finished(choices[0], usage)
        return [self.event("response.completed" if response["status"] == "completed" else "response.incomplete",
                           response=response)]

    def error_event(self, err: APIError) -> str:
        self.failed = err
        return self.event("error", code=err.code or err.kind, message=err.message, param=err.param)

    def body(self, choices: list[Choice], usage: dict[str, int]) -> dict[str, Any]:
        self._add(self.parser.feed(choices[0].text, last=True), True)
        return self._finished(choices[0], usage)

    def response(self, status: str, usage: dict[str, int] | None) -> dict[str, Any]:
        request = self.call.request
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
                "model": self.model_name, "output": self.items.output if status != "in_progress" else [],
                "parallel_tool_calls": request.parallel_tool_calls,
                "previous_response_id": request.previous_response_id, "reasoning": {"effort": None, "summary": None},
                "store": request.store, "temperature": request.temperature,
                "text": request.text or {"format": {"type": "text"}}, "tool_choice": request.tool_choice,
                "tools": request.tools, "top_p": request.top_p, "truncation": "disabled",
                "usage": None if usage is None else self._usage(usage), "user": request.user,
                "metadata": request.metadata or {}}

    def _add(self, events: list[ReplyEvent], last: bool) -> list[str]:
        out = [event for reply_event in events for event in self.items.add(reply_event)]
        return out + (self.items.end() if last else [])

    def _finished(self, choice: Choice, usage: dict[str, int]) -> dict[str, Any]:
        """The whole response, kept in the store unless the request said store=false."""
        response = self.response("incomplete" if choice.finish_reason == "length" and not self.parser.calls
                                 else "completed", usage)
        if self.call.request.store:
            reply = {"role": "assistant", "content": self.parser.content or None,
                     **({"reasoning_content": self.parser.thinking} if self.parser.thinking else {}),
                     **({"tool_calls": [{"id": c.id, "type": "function",
                                         "function": {"name": c.name, "arguments": c.arguments}}
                                        for c in self.parser.calls]} if self.parser.calls else {})}
            self.store.put(response, [*self.call.conversation, reply])
        return response

    def _usage(self, usage: dict[str, int]) -> dict[str, Any]:
        thinking = len(self.tokenizer.encode(self.parser.thinking, add_special_tokens=False)) \
            if self.parser.thinking else 0
        return {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": thinking},
                "total_tokens": usage["total_tokens"]}


class _OutputItems(BlockStream):
    """Output items as the reply's blocks: a reasoning item, a message, a function call each."""

    def __init__(self, fmt: ResponsesFormat) -> None:
        super().__init__()
        self.fmt = fmt
        self.output: list[dict[str, Any]] = []
        self.text = ""

    @property
    def _where(self) -> dict[str, Any]:
        return {"item_id": self.output[-1]["id"], "output_index": len(self.output) - 1}

    def open(self, event: ReplyEvent) -> list[str]:
        self.text = ""
        if isinstance(event, CallStart):
            item = {"id": "fc_" + event.id.removeprefix("call_"), "type": "function_call", "call_id": event.id,
                    "name": event.name, "arguments": "", "status": "in_progress"}
            self.output.append(item)
            return [self.fmt.event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item))]
        if self.kind == "thinking":
            item = {"id": "rs_" + uuid.uuid4().hex, "type": "reasoning", "summary": [], "content": [],
                    "status": "in_progress"}
        else:
            item = {"id": "msg_" + uuid.uuid4().hex, "type": "message", "status": "in_progress", "role": "assistant",
                    "content": []}
        self.output.append(item)
        return [self.fmt.event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item)),
                self.fmt.event("response.content_part.added", **self._where, content_index=0, part=self._part(""))]

    def extend(self, text: str) -> list[str]:
        self.text += text
        if self.kind == "call":
            return [self.fmt.event("response.function_call_arguments.delta", **self._where, delta=text)]
        if self.kind == "thinking":
            return [self.fmt.event("response.reasoning_text.delta", **self._where, content_index=0, delta=text)]
        return [self.fmt.event("response.output_text.delta", **self._where, content_index=0, delta=text, logprobs=[])]

    def close(self) -> list[str]:
        item = self.output[-1]
        item["status"] = "completed"
        if self.kind == "call":
            item["arguments"] = self.text
            done = [self.fmt.event("response.function_call_arguments.done", **self._where, name=item["name"],
                                   arguments=self.text)]
        else:
            part = self._part(self.text)
            item["content"] = [part]
            kind = "response.reasoning_text.done" if self.kind == "thinking" else "response.output_text.done"
            done = [self.fmt.event(kind, **self._where, content_index=0, text=self.text,
                                   **({} if self.kind == "thinking" else {"logprobs": []})),
                    self.fmt.event("response.content_part.done", **self._where, content_index=0, part=part)]
        return [*done, self.fmt.event("response.output_item.done", output_index=len(self.output) - 1, item=item)]

    def _part(self, text: str) -> dict[str, Any]:
        if self.kind == "thinking":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
