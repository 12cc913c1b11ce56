"""OpenAI's JSON for the two completion endpoints: one formatter per endpoint shapes its whole response
body and its streamed chunks (choices, logprobs, usage and, for chat, tool calls and reasoning)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..engine import StepOutput
from ..text.reasoning import ReasoningParser
from .prepare import Job
from .state import ServerState
from .tools import parse_tool_calls


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


def sse(payload: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n"


class ResponseFormat:
    """One endpoint's JSON. Subclasses say how a choice looks, whole or as one streamed piece, and
    how its logprobs look; the envelope (id, object, created, model, usage) is common."""

    id_prefix: ClassVar[str]
    body_object: ClassVar[str]
    chunk_object: ClassVar[str]

    def __init__(self, state: ServerState, job: Job) -> None:
        self.model_name, self.tokenizer = state.model_name, state.tokenizer
        self.want_logprobs = job.logprobs is not None
        self.include_usage = job.body.stream_options is not None and job.body.stream_options.include_usage
        self.id = self.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())

    def choice(self, choice: Choice) -> dict[str, Any]:
        """A finished choice in the whole response."""
        raise NotImplementedError

    def piece(self, choice: Choice, item: StepOutput, finish: str | None) -> dict[str, Any] | None:
        """One output of a choice as a streamed choice; None when it has nothing to show yet."""
        raise NotImplementedError

    def logprobs(self, entries: list[tuple[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def opening(self, choices: list[Choice]) -> list[str]:
        """Events a stream starts with, before any output."""
        return []

    def body(self, choices: list[Choice], usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(self.body_object), "choices": [self.choice(c) for c in choices], "usage": usage}

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


class CompletionFormat(ResponseFormat):
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


class ChatFormat(ResponseFormat):
    id_prefix, body_object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def __init__(self, state: ServerState, job: Job) -> None:
        super().__init__(state, job)
        body = job.body
        # None: no tools; "auto": replies are parsed for calls; "forced": each reply is one call
        self.tool_calls = None if not body.tool_functions() else "forced" if body.constraint()[0] == "tools" else "auto"
        # a reply a grammar shapes (response_format, guided_*, a forced call) is all content
        self.reasoning = None if body.constrained() else job.reasoning
        self._parsers: dict[int, ReasoningParser] = {}  # per choice, while it streams

    def opening(self, choices: list[Choice]) -> list[str]:
        """The role comes first, once per choice."""
        return [self.chunk({"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}) for c in choices]

    def choice(self, choice: Choice) -> dict[str, Any]:
        message, finish = self._message(choice)
        return {"index": choice.index, "message": message, "logprobs": self._choice_logprobs(choice),
                "finish_reason": finish}

    def piece(self, choice: Choice, item: StepOutput, finish: str | None) -> dict[str, Any] | None:
        if self.tool_calls is not None:  # held until the reply ends: a call is parsed from all of it
            return self._whole_reply(choice) if finish else None
        delta = self._delta(choice, item.text, finish is not None)
        if not (delta or finish or self.want_logprobs):  # nothing visible yet (held back)
            return None
        return {"index": choice.index, "delta": delta, "logprobs": self._step_logprobs(item), "finish_reason": finish}

    def _delta(self, choice: Choice, text: str, last: bool) -> dict[str, str]:
        """What one output adds to a streamed reply: its content and, apart, its reasoning."""
        if self.reasoning is None:
            return {"content": text} if text else {}
        parser = self._parsers.setdefault(choice.index, self.reasoning.parser())
        reasoning, content = parser.feed(text)
        if last:
            rest = parser.finish()
            reasoning, content = reasoning + rest[0], content + rest[1]
        return {key: value for key, value in (("reasoning_content", reasoning), ("content", content)) if value}

    def logprobs(self, entries: list[tuple[str, Any]]) -> dict[str, Any]:
        """As for completions, each token's text is the text it released."""
        decode = self.tokenizer.decode
        return {"content": [
            {"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
             "top_logprobs": [{"token": (t := decode([tid])), "logprob": v, "bytes": list(t.encode())}
                              for tid, v in lp.top]}
            for text, lp in entries]}

    def _whole_reply(self, choice: Choice) -> dict[str, Any]:
        """A finished reply as one delta: its tool calls (each whole, as OpenAI's clients accumulate them)
        or its text."""
        message, finish = self._message(choice)
        delta = {"tool_calls": [{"index": k, **call} for k, call in enumerate(message["tool_calls"])]} \
            if "tool_calls" in message else {"content": message["content"]}
        if "reasoning_content" in message:
            delta = {"reasoning_content": message["reasoning_content"], **delta}
        return {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _message(self, choice: Choice) -> tuple[dict[str, Any], str | None]:
        """The reply as OpenAI's assistant message: its reasoning apart (reasoning_content, where there is
        some), its tool calls parsed out of the rest (finish reason "tool_calls")."""
        reasoning, text = self.reasoning.split(choice.text) if self.reasoning else ("", choice.text)
        message = {"role": "assistant", "content": text, **({"reasoning_content": reasoning} if reasoning else {})}
        if self.tool_calls is None:
            return message, choice.finish_reason
        message["content"], calls = parse_tool_calls(text, self.tool_calls == "forced")
        if not calls:
            return message, choice.finish_reason
        return {**message, "tool_calls": calls}, "tool_calls"
