"""The JSON of a request's response: one formatter per API shapes its whole response body and its stream's
events. Here OpenAI's two completion endpoints (choices, logprobs, usage and, for chat, tool calls and
reasoning); the Responses and Messages APIs' formats are in responses_api.py and anthropic_api.py."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..engine import StepOutput
from ..text.reasoning import Reasoning
from .prepare import Job
from .protocol import APIError
from .reply import CallArguments, CallStart, Content, ReplyEvent, ReplyParser, Thinking, whole_reply
from .state import ServerState
from .tool_stream import ToolSyntax


@dataclass
class Choice:
    """One generated sequence of a response, as it accumulates."""

    index: int
    request_id: str
    outputs: asyncio.Queue
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[str, Any]] = field(default_factory=list)  # (token text, TokenLogprobs)
    finish_reason: str | None = None

    def add(self, item: StepOutput) -> None:
        self.text += item.text
        self.token_ids += item.token_ids
        if item.logprobs:
            self.logprobs += [(item.text, lp) for lp in item.logprobs]
        if item.finished:
            self.finish_reason = "length" if item.finish_reason == "length" else "stop"


def sse(payload: Any, event: str | None = None) -> str:
    """One server-sent event (named, for the APIs whose events have names: Responses, Messages)."""
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(payload)}\n\n"


class ResponseFormat:
    """One API's JSON for a request's choices: its whole response body, and its stream's events (the
    stream's machinery is common: responses.py)."""

    id_prefix: ClassVar[str]
    include_usage = False

    def __init__(self, state: ServerState, job: Job) -> None:
        self.model_name, self.tokenizer = state.model_name, state.tokenizer
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())

    def body(self, choices: list[Choice], usage: dict[str, int]) -> dict[str, Any]:
        """The whole response, once every choice has finished (`usage` in OpenAI's names)."""
        raise NotImplementedError

    def opening(self, choices: list[Choice]) -> list[str]:
        """Events a stream starts with, before any output."""
        return []

    def events(self, choice: Choice, item: StepOutput, finish: str | None) -> list[str]:
        """The events of one output of a choice (`finish`: its finish reason, if it is the last)."""
        raise NotImplementedError

    def closing(self, choices: list[Choice], usage: dict[str, int]) -> list[str]:
        """Events a stream ends with, once every choice has finished."""
        return []

    def error_event(self, err: APIError) -> str:
        """A failure in the middle of a stream (the status line has gone already)."""
        return sse(err.body())


class OpenAIFormat(ResponseFormat):
    """The two completion endpoints' JSON. Subclasses say how a choice looks, whole or as one streamed
    piece, and how its logprobs look; the envelope (id, object, created, model, usage) is common."""

    body_object: ClassVar[str]
    chunk_object: ClassVar[str]

    def __init__(self, state: ServerState, job: Job) -> None:
        super().__init__(state, job)
        self.want_logprobs = job.logprobs is not None
        self.include_usage = job.body.stream_options is not None and job.body.stream_options.include_usage

    def choice(self, choice: Choice) -> dict[str, Any]:
        """A finished choice in the whole response."""
        raise NotImplementedError

    def piece(self, choice: Choice, item: StepOutput, finish: str | None) -> dict[str, Any] | None:
        """One output of a choice as a streamed choice; None when it has nothing to show yet."""
        raise NotImplementedError

    def logprobs(self, entries: list[tuple[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def body(self, choices: list[Choice], usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(self.body_object), "choices": [self.choice(c) for c in choices], "usage": usage}

    def events(self, choice: Choice, item: StepOutput, finish: str | None) -> list[str]:
        piece = self.piece(choice, item, finish)
        return [] if piece is None else [self.chunk(piece)]

    def closing(self, choices: list[Choice], usage: dict[str, int]) -> list[str]:
        return [*([self.usage_chunk(usage)] if self.include_usage else []), "data: [DONE]\n\n"]

    def chunk(self, choice_json: dict[str, Any]) -> str:
        payload = {**self._head(self.chunk_object), "choices": [choice_json]}
        if self.include_usage:  # OpenAI's chunks carry "usage": null until the last
            payload["usage"] = None
        return sse(payload)

    def usage_chunk(self, usage: dict[str, int]) -> str:
        return sse({**self._head(self.chunk_object), "choices": [], "usage": usage})

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    def _choice_logprobs(self, choice: Choice) -> dict[str, Any] | None:
        return self.logprobs(choice.logprobs) if self.want_logprobs else None

    def _step_logprobs(self, item: StepOutput) -> dict[str, Any] | None:
        return self.logprobs([(item.text, lp) for lp in item.logprobs or []]) if self.want_logprobs else None

    def _shows(self, item: StepOutput, finish: str | None) -> bool:
        """False for an output with nothing visible yet (a held-back character or stop-string prefix)."""
        return bool(item.text or finish or self.want_logprobs)


class CompletionFormat(OpenAIFormat):
    id_prefix, body_object, chunk_object = "cmpl-", "text_completion", "text_completion"

    def choice(self, choice: Choice) -> dict[str, Any]:
        return {"index": choice.index, "text": choice.text, "logprobs": self._choice_logprobs(choice),
                "finish_reason": choice.finish_reason}

    def piece(self, choice: Choice, item: StepOutput, finish: str | None) -> dict[str, Any] | None:
        if not self._shows(item, finish):
            return None
        return {"index": choice.index, "text": item.text, "logprobs": self._step_logprobs(item),
                "finish_reason": finish}

    def logprobs(self, entries: list[tuple[str, Any]]) -> dict[str, Any]:
        """Each token's text is the text it released, so the tokens always join back into the output
        text (a multi-byte character is credited to its last byte)."""
        offsets, position = [], 0
        for text, _ in entries:
            offsets.append(position)
            position += len(text)
        return {"tokens": [text for text, _ in entries], "token_logprobs": [lp.logprob for _, lp in entries],
                "top_logprobs": [{self.tokenizer.decode([tid]): v for tid, v in lp.top} for _, lp in entries],
                "text_offset": offsets}


class ChatFormat(OpenAIFormat):
    id_prefix, body_object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def __init__(self, state: ServerState, job: Job) -> None:
        super().__init__(state, job)
        self.replies = ReplyShaping(job)
        self._parsers: dict[int, ReplyParser] = {}  # per choice, while it streams

    def opening(self, choices: list[Choice]) -> list[str]:
        """The role comes first, once per choice."""
        return [self.chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}) for c in choices]

    def choice(self, choice: Choice) -> dict[str, Any]:
        reply = self.replies.whole(choice)
        message = {"role": "assistant", "content": reply.content or (None if reply.calls else ""),
                   **({"reasoning_content": reply.thinking} if reply.thinking else {})}
        if reply.calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in reply.calls]
        return {"index": choice.index, "message": message, "logprobs": self._choice_logprobs(choice),
                "finish_reason": "tool_calls" if reply.calls else choice.finish_reason}

    def piece(self, choice: Choice, item: StepOutput, finish: str | None) -> dict[str, Any] | None:
        """The reply's reasoning, content and tool calls as they are parsed: a call's name as soon as it
        is known, then its arguments in fragments (OpenAI's clients join them by the call's index)."""
        parser = self._parsers.setdefault(choice.index, self.replies.parser())
        delta = _delta(parser.feed(item.text, last=finish is not None))
        if not (delta or finish or self.want_logprobs):  # nothing visible yet (held back)
            return None
        if finish and parser.calls:
            finish = "tool_calls"
        return {"index": choice.index, "delta": delta, "logprobs": self._step_logprobs(item), "finish_reason": finish}

    def logprobs(self, entries: list[tuple[str, Any]]) -> dict[str, Any]:
        """As for completions, each token's text is the text it released."""
        decode = self.tokenizer.decode
        return {"content": [
            {"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
             "top_logprobs": [{"token": (t := decode([tid])), "logprob": v, "bytes": list(t.encode())}
                              for tid, v in lp.top]}
            for text, lp in entries]}


def _delta(events: list[ReplyEvent]) -> dict[str, Any]:
    """A chat delta of what one output released: reasoning_content, content and tool_calls entries."""
    delta: dict[str, Any] = {}
    for kind, key in ((Thinking, "reasoning_content"), (Content, "content")):
        text = "".join(e.text for e in events if isinstance(e, kind))
        if text:
            delta[key] = text
    calls: list[dict[str, Any]] = []
    for event in events:
        if isinstance(event, CallStart):
            calls.append({"index": event.index, "id": event.id, "type": "function",
                          "function": {"name": event.name, "arguments": ""}})
        elif isinstance(event, CallArguments):
            if calls and calls[-1]["index"] == event.index:
                calls[-1]["function"]["arguments"] += event.fragment
            else:
                calls.append({"index": event.index, "function": {"arguments": event.fragment}})
    if calls:
        delta["tool_calls"] = calls
    return delta


class ReplyShaping:
    """How a request's replies are read (every chat-shaped API): their reasoning section, unless a grammar
    shapes them (response_format, guided_*, a forced call: all content), and their tool calls' syntax,
    where the request has tools."""

    def __init__(self, job: Job) -> None:
        self.reasoning: Reasoning | None = None if job.body.constrained() else job.reasoning
        self.tools: ToolSyntax | None = job.tools

    def parser(self) -> ReplyParser:
        return ReplyParser(self.reasoning, self.tools)

    def whole(self, choice: Choice) -> ReplyParser:
        return whole_reply(self.reasoning, self.tools, choice.text)
