"""The reasoning parser: a reply's <think> section split from its content, whole and streamed in pieces
cut at every position (so every tag is split every way it can be)."""

from __future__ import annotations

import itertools

import pytest

from minillm.text.chat_formats import builtin_template
from minillm.text.reasoning import Reasoning, reply_reasoning

CLOSED, OPEN = Reasoning(), Reasoning(open_at_start=True)
# (reasoning at the start, reply, expected reasoning, expected content)
CASES = [
    (CLOSED, "<think>\nLet me think.\n</think>\n\nThe answer is 4.", "Let me think.", "The answer is 4."),
    (OPEN, "Let me think.\n</think>\n\nThe answer is 4.", "Let me think.", "The answer is 4."),
    (CLOSED, "  \n<think>a\n\nb</think>c", "a\n\nb", "c"),
    (CLOSED, "Hello <think> world</think>", "", "Hello <think> world</think>"),  # a tag after content is text
    (CLOSED, "<think>\nstill thinking", "still thinking", ""),  # cut short: all of it is reasoning
    (OPEN, "still </thi", "still </thi", ""),
    (CLOSED, "<think>a</think>b</think>c<think>d", "a", "b</think>c<think>d"),  # only the first section
    (CLOSED, "<thin", "", "<thin"),
    (CLOSED, "<thinking>x", "", "<thinking>x"),
    (CLOSED, " \n", "", " \n"),
    (CLOSED, "", "", ""),
    (CLOSED, "<think></think>", "", ""),
    (CLOSED, "<think>\n\n</think>\n\nHi", "", "Hi"),  # Qwen3 with enable_thinking=false writes this
    (CLOSED, "<think>a < b </ c </thinking> d </th ink></think> x", "a < b </ c </thinking> d </th ink>", "x"),
    (CLOSED, "<think>é 東京\n</think>\n🙂", "é 東京", "🙂"),
    (OPEN, "</think>", "", ""),
    (CLOSED, "no tags at all\n", "", "no tags at all\n"),
]


def _streamed(reasoning: Reasoning, pieces: list[str]) -> tuple[str, str]:
    parser = reasoning.parser()
    thought, said = [], []
    for piece in pieces:
        r, c = parser.feed(piece)
        thought.append(r)
        said.append(c)
    r, c = parser.finish()
    return "".join(thought + [r]), "".join(said + [c])


@pytest.mark.parametrize("reasoning,text,thought,content", CASES)
def test_whole_reply(reasoning, text, thought, content):
    assert reasoning.split(text) == (thought, content)


@pytest.mark.parametrize("reasoning,text,thought,content", CASES)
def test_streamed_with_splits_at_every_position(reasoning, text, thought, content):
    """One cut at every position, two cuts at every pair of positions, and one character at a time."""
    cuts = [(i,) for i in range(len(text) + 1)] + list(itertools.combinations(range(len(text) + 1), 2))
    for points in cuts:
        bounds = [0, *points, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        assert _streamed(reasoning, pieces) == (thought, content), pieces
    assert _streamed(reasoning, list(text)) == (thought, content)


def test_no_tag_reaches_content_while_streaming():
    """Released content never holds a tag's beginning that turned out to be a tag."""
    text = "<think>x</think>y"
    for i in range(len(text) + 1):
        parser = CLOSED.parser()
        released = [parser.feed(text[:i])[1], parser.feed(text[i:])[1], parser.finish()[1]]
        assert "".join(released) == "y" and all(p in ("", "y") for p in released)


def test_reply_reasoning_from_template_and_prompt():
    qwen3, r1 = builtin_template("qwen3"), builtin_template("deepseek-r1")
    assert reply_reasoning(builtin_template("chatml"), "<|im_start|>assistant\n") is None
    assert reply_reasoning(None, "") is None
    assert reply_reasoning(qwen3, "<|im_start|>assistant\n") == CLOSED
    assert reply_reasoning(qwen3, "<|im_start|>assistant\n<think>\n\n</think>\n\n") == CLOSED
    assert reply_reasoning(r1, "<｜User｜>Hi<｜Assistant｜><think>\n") == OPEN
