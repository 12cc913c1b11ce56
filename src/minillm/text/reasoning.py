"""Reasoning output: models whose chat template has a thinking section (Qwen3, DeepSeek-R1) write
`<think>...</think>` before their answer. `Reasoning` says how a reply to one prompt marks it, and
`ReasoningParser` splits the reply into (reasoning, content) as its text arrives in pieces of any size.

A tag split across pieces is held back until it is whole or proves not to be a tag, so no part of a tag
ever reaches either side. Whitespace around a section is dropped (Qwen3 writes `<think>\\n...\\n</think>\\n\\n`).
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class Reasoning:
    """How a reply marks its reasoning: the tags, and whether the prompt already opened the section
    (DeepSeek-R1's generation prompt ends in `<think>\\n`, so its replies start inside it)."""

    start: str = START
    end: str = END
    open_at_start: bool = False

    def parser(self) -> ReasoningParser:
        return ReasoningParser(self)

    def split(self, text: str) -> tuple[str, str]:
        """A whole reply -> (reasoning, content)."""
        parser = self.parser()
        reasoning, content = parser.feed(text)
        rest_reasoning, rest_content = parser.finish()
        return reasoning + rest_reasoning, content + rest_content


def reply_reasoning(template: str | None, prompt: str) -> Reasoning | None:
    """How replies to `prompt` (rendered by `template`) mark their reasoning; None for a template without
    a thinking section."""
    if not template or START not in template or END not in template:
        return None
    return Reasoning(open_at_start=prompt.rstrip().endswith(START))


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (a tag that may be completed by what follows)."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ReasoningParser:
    """The streaming state machine. States: "start" (only whitespace so far: a start tag may still come),
    "reasoning" (inside the section: until the end tag) and "content" (everything else, to the end).
    A start tag counts only at the beginning of the reply; after the section, tags are plain content."""

    def __init__(self, reasoning: Reasoning) -> None:
        self.tags = reasoning
        self.state = "reasoning" if reasoning.open_at_start else "start"
        self._held = ""  # text not released yet: a possible tag's beginning, or whitespace that may end a section
        self._trim = reasoning.open_at_start  # drop whitespace at the start of the section just entered

    def feed(self, text: str) -> tuple[str, str]:
        """The next piece of the reply -> the (reasoning, content) it releases."""
        text, self._held = self._held + text, ""
        reasoning = ""
        if self.state == "start":
            rest = text.lstrip()
            if rest.startswith(self.tags.start):
                self.state, self._trim, text = "reasoning", True, rest[len(self.tags.start):]
            elif self.tags.start.startswith(rest):  # nothing yet, or the start tag's beginning: wait
                self._held = text
                return "", ""
            else:
                self.state = "content"
        if self.state == "reasoning":
            text = self._trimmed(text)
            cut = text.find(self.tags.end)
            if cut < 0:
                body = text[:len(text) - _partial_tag(text, self.tags.end)]
                reasoning = body.rstrip()  # trailing whitespace waits: it may be the section's last
                self._held = text[len(reasoning):]
                return reasoning, ""
            reasoning, text = text[:cut].rstrip(), text[cut + len(self.tags.end):]
            self.state, self._trim = "content", True
        return reasoning, self._trimmed(text)

    def finish(self) -> tuple[str, str]:
        """The end of the reply: what was held back, released as what it turned out to be."""
        held, self._held = self._held, ""
        if self.state == "start":
            return "", held
        return held.rstrip(), ""  # an unfinished section (the reply was cut short): all of it is reasoning

    def _trimmed(self, text: str) -> str:
        if self._trim:
            text = text.lstrip()
            self._trim = not text
        return text
