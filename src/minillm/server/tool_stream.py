"""Tool calls parsed out of a reply as it is generated: the reply's text arrives in pieces of any size, and
the parser gives back its content and, for each call, its name as soon as it is known and then its
arguments' JSON text in fragments as they are written. The same parser reads a whole reply (one piece),
so a streamed reply and a whole one always hold the same calls, and a call's fragments concatenate to
exactly its final `arguments` (the model's own JSON text, as OpenAI returns it: not re-serialised).

The formats, chosen from the chat template (`tool_syntax`):

- Hermes (Qwen, and the system prompt we write for templates that do not render tools):
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, anywhere in the reply, any number of them.
- Llama 3.1/3.2 JSON: the reply is `{"name": ..., "parameters": {...}}` (`<|python_tag|>` before it is a
  special token, dropped from the text), calls separated by `;`.
- Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (the tag, a special token, is usually
  dropped from the text too).

Every format also takes a reply that is one bare call object (what a forced call's grammar writes). A call
is recognised once `{"name": "...", "arguments": {` (or `"parameters"`) has been read, in that order; text
that turns out not to be a call is released as content. Around calls, content is trimmed of whitespace
(what separates a call from the text beside it).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ToolSyntax:
    """How a model family writes its calls. `tag`: the text that opens a call anywhere in the reply (with
    `close` ending it); `lead`: text that may open the calls at the reply's start; `arrays`: whether the
    calls may be a JSON list."""

    name: str
    tag: str = ""
    close: str = ""
    lead: str = ""
    arrays: bool = False


HERMES = ToolSyntax("hermes", tag="<tool_call>", close="</tool_call>")
LLAMA3 = ToolSyntax("llama3", lead="<|python_tag|>")
MISTRAL = ToolSyntax("mistral", lead="[TOOL_CALLS]", arrays=True)


def tool_syntax(template: str | None, renders_tools: bool) -> ToolSyntax:
    """The format replies to this chat template write calls in. A template that does not render `tools`
    gets them in our own system prompt, which asks for Hermes calls."""
    if not renders_tools or not template:
        return HERMES
    if MISTRAL.lead in template:
        return MISTRAL
    if LLAMA3.lead in template or "<|start_header_id|>" in template and "<tool_call>" not in template:
        return LLAMA3
    return HERMES


@dataclass(frozen=True)
class Content:
    """Text of the reply that is not a call."""

    text: str


@dataclass(frozen=True)
class CallStart:
    """A call recognised: its index among the reply's calls, the id we give it, the function's name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    """The next fragment of a call's arguments (JSON text)."""

    index: int
    fragment: str


Event = Content | CallStart | CallArguments


@dataclass
class Call:
    id: str
    name: str
    arguments: str = ""


class _Partial(Exception):
    """The text so far may still become a call head: wait for more."""


class _NotACall(Exception):
    """The text cannot be a call head."""


def _call_head(text: str) -> tuple[str, int]:
    """`{"name": "...", "arguments": ` at the start of `text` -> (name, where the arguments' value begins
    with its `{`); _Partial if `text` may still become one, _NotACall if it cannot."""
    i = 0

    def spaces() -> None:
        nonlocal i
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            raise _Partial

    def literal(*options: str) -> None:
        nonlocal i
        for option in options:
            if text.startswith(option, i):
                i += len(option)
                return
        if any(option.startswith(text[i:]) for option in options):
            raise _Partial
        raise _NotACall

    spaces(), literal("{"), spaces(), literal('"name"'), spaces(), literal(":"), spaces(), literal('"')
    end, escaped = i, False
    while end < len(text) and (escaped or text[end] != '"'):
        escaped = not escaped and text[end] == "\\"
        end += 1
    if end == len(text):
        raise _Partial
    try:
        name = json.loads(text[i - 1:end + 1])
    except ValueError:
        raise _NotACall from None
    i = end + 1
    spaces(), literal(","), spaces(), literal('"arguments"', '"parameters"'), spaces(), literal(":"), spaces()
    if text[i] != "{":
        raise _NotACall
    return name, i


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


@dataclass
class ToolCallParser:
    """The streaming state machine. Modes: "start" (only whitespace so far), "content", "head" (a call may
    begin here: `_opened` holds the text that opened it, released as content if it is not one), "arguments"
    (inside a call's arguments: every character is the call's), "after" (a call's arguments are complete:
    what closes it is skipped, and the next call may follow)."""

    syntax: ToolSyntax
    calls: list[Call] = field(default_factory=list)
    mode: str = "start"
    _buffer: str = ""
    _opened: str = ""
    _container: str = "bare"  # what holds the current call: "tag" (Hermes), "array" (Mistral), "bare"
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _spaces: str = ""  # whitespace after the content released so far: released only if more content follows
    _said: bool = False  # whether any content has been released
    _events: list[Event] = field(default_factory=list)

    def feed(self, text: str) -> list[Event]:
        self._buffer += text
        while self._buffer and getattr(self, "_" + self.mode)():
            pass
        events, self._events = self._events, []
        return events

    def finish(self) -> list[Event]:
        """The end of the reply: an undecided call head is content after all; an unfinished call (cut by
        max_tokens) keeps the arguments it has."""
        if self.mode == "head":
            self._say(self._opened + self._buffer)
        elif self.mode in ("start", "content"):
            self._say(self._buffer)
        self._buffer, self._opened = "", ""
        events, self._events = self._events, []
        return events

    # Each mode's step: True if it made progress and the loop should go on.

    def _start(self) -> bool:
        rest, lead = self._buffer.lstrip(), self.syntax.lead
        if lead and rest.startswith(lead):
            self._opened += lead
            self._buffer = rest = rest[len(lead):].lstrip()
        if not rest or lead and not self._opened and lead.startswith(rest):
            return False  # only whitespace, or the lead's beginning: wait
        if rest[0] == "{" or rest[0] == "[" and self.syntax.arrays:
            self._container = "array" if rest[0] == "[" else "bare"
            if rest[0] == "[":
                self._opened, rest = self._opened + "[", rest[1:]
            self._buffer, self.mode = rest, "head"
        else:
            self._buffer, self._opened, self.mode = self._opened + self._buffer, "", "content"
        return True

    def _content(self) -> bool:
        tag = self.syntax.tag
        cut = self._buffer.find(tag) if tag else -1
        if cut < 0:
            keep = _partial_suffix(self._buffer, tag) if tag else 0
            self._say(self._buffer[:len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return False
        self._say(self._buffer[:cut])
        self._buffer, self._opened, self._container, self.mode = self._buffer[cut + len(tag):], tag, "tag", "head"
        return True

    def _head(self) -> bool:
        try:
            name, start = _call_head(self._buffer)
        except _Partial:
            return False
        except _NotACall:  # what opened it is content, and so is what follows, read on as content
            self._say(self._opened)
            self._opened, self.mode = "", "content"
            return True
        self._spaces = ""  # the whitespace before a call is not content
        call = Call(f"call_{uuid.uuid4().hex[:24]}", name)
        self.calls.append(call)
        self._events.append(CallStart(len(self.calls) - 1, call.id, name))
        self._buffer, self._opened, self.mode = self._buffer[start:], "", "arguments"
        self._depth, self._in_string, self._escaped = 0, False, False
        return True

    def _arguments(self) -> bool:
        end, done = 0, False
        for end, char in enumerate(self._buffer, 1):
            if self._in_string:
                self._in_string = self._escaped or char != '"'
                self._escaped = not self._escaped and char == "\\"
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    done = True
                    break
        fragment, self._buffer = self._buffer[:end], self._buffer[end:]
        call = self.calls[-1]
        call.arguments += fragment
        if fragment:
            self._events.append(CallArguments(len(self.calls) - 1, fragment))
        if done:
            self.mode = "after"
        return done

    def _after(self) -> bool:
        """Skip what closes a call (`}`, then `</tool_call>` or the list's `,` / `]` or `;`)."""
        if self._container == "tag":
            cut = self._buffer.find(self.syntax.close)
            if cut < 0:
                return False
            self._buffer, self.mode = self._buffer[cut + len(self.syntax.close):], "content"
            return True
        rest = self._buffer.lstrip()
        if rest.startswith("}"):
            rest = rest[1:].lstrip()
        if not rest:
            self._buffer = ""
            return False
        if self._container == "array" and rest[0] in ",]":
            self._buffer, self.mode = rest[1:], "head" if rest[0] == "," else "content"
            if rest[0] == ",":
                self._opened = ""
        elif self._container == "bare" and rest[0] in ";{":
            self._buffer, self.mode, self._opened = rest[1:] if rest[0] == ";" else rest, "head", ""
        else:
            self._buffer, self.mode = rest, "content"
        return True

    def _say(self, text: str) -> None:
        """Content, its whitespace held back until more content follows (so never leading or trailing)."""
        text = self._spaces + text
        body = text.rstrip() if self._said else text.strip()
        if not body:
            self._spaces = text if self._said else ""
            return
        self._spaces, self._said = text[len(text.rstrip()):], True
        self._events.append(Content(body))
