"""Text that cannot be encoded as UTF-8 (a lone surrogate such as "\\ud800", which JSON escapes and
Python strings allow) is refused before it reaches the tokenizer, with the field it came from."""

from __future__ import annotations

from typing import Any


def check_text(text: str, name: str) -> None:
    """Raise ValueError naming `name` if `text` is not valid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{name} is not valid Unicode: a lone surrogate U+{ord(text[err.start]):04X} at "
                         f"character {err.start}") from None


def find_invalid_text(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (or dict key) in a JSON-like value that is not valid
    Unicode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and find_invalid_text(key) is not None:
            return path or "body"
        found = find_invalid_text(item, where)
        if found is not None:
            return found
    return None
