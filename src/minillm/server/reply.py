"""A chat reply read as it is generated, for every API that shapes one (chat completions, Responses,
Messages): its reasoning apart (text/reasoning.py), then its tool calls parsed out of the rest
(tool_stream.py). Each format renders the same events, streamed or collected, so the APIs agree on what
a reply holds."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..text.reasoning import Reasoning, ReasoningParser
from .tool_stream import CallArguments, CallStart, Content, Event, ToolCallParser, ToolSyntax


@dataclass(frozen=True)
class Thinking:
    """Text of the reply's reasoning section."""

    text: str


ReplyEvent = Thinking | Event


@dataclass
class ReplyParser:
    """One reply's parser: `reasoning` None for a template without a thinking section (or a reply a grammar
    shapes), `tools` None for a request without tools. It also accumulates the whole reply."""

    reasoning: Reasoning | None
    tools: ToolSyntax | None
    thinking: str = ""
    content: str = ""
    _reasoning: ReasoningParser | None = field(init=False, default=None)
    _tools: ToolCallParser | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._reasoning = self.reasoning.parser() if self.reasoning else None
        self._tools = ToolCallParser(self.tools) if self.tools else None

    @property
    def calls(self) -> list:
        return self._tools.calls if self._tools else []

    def feed(self, text: str, last: bool = False) -> list[ReplyEvent]:
        """The next piece of the reply -> what it releases; `last`: the reply ends with it."""
        thought, said = self._reasoning.feed(text) if self._reasoning else ("", text)
        if last and self._reasoning:
            rest = self._reasoning.finish()
            thought, said = thought + rest[0], said + rest[1]
        events: list[ReplyEvent] = [Thinking(thought)] if thought else []
        if self._tools is None:
            events += [Content(said)] if said else []
        else:
            events += self._tools.feed(said) + (self._tools.finish() if last else [])
        for event in events:
            if isinstance(event, Thinking):
                self.thinking += event.text
            elif isinstance(event, Content):
                self.content += event.text
        return events


def whole_reply(reasoning: Reasoning | None, tools: ToolSyntax | None, text: str) -> ReplyParser:
    """A finished reply parsed at once (the same parser as a stream, so both hold the same calls)."""
    parser = ReplyParser(reasoning, tools)
    parser.feed(text, last=True)
    return parser


class BlockStream:
    """A reply's events grouped into its API's blocks (Responses' output items, Messages' content blocks):
    a run of reasoning, a run of text, one tool call each. Subclasses say what opening, extending and
    closing a block sends; `kind` is "thinking", "text" or "call"."""

    def __init__(self) -> None:
        self.kind: str | None = None

    def add(self, event: ReplyEvent) -> list[str]:
        kind = "thinking" if isinstance(event, Thinking) else "text" if isinstance(event, Content) else "call"
        out = []
        if isinstance(event, CallStart) or kind != self.kind:
            out += self.end()
            self.kind = kind
            out += self.open(event)
        if not isinstance(event, CallStart):
            out += self.extend(event.fragment if isinstance(event, CallArguments) else event.text)
        return out

    def end(self) -> list[str]:
        """Close the open block, if any."""
        if self.kind is None:
            return []
        out, self.kind = self.close(), None
        return out

    def open(self, event: ReplyEvent) -> list[str]:
        raise NotImplementedError

    def extend(self, text: str) -> list[str]:
        raise NotImplementedError

    def close(self) -> list[str]:
        raise NotImplementedError
