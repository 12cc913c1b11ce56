"""Bounded quotes of a client's input in error messages: a refusal names what was wrong without sending
back (or logging) megabytes of what was sent."""

from __future__ import annotations

EXCERPT_CHARS = 200


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """`repr(value)` (a string as it is), cut to `limit` characters with a note of the full length."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters in all)"
