"""Special-token text inside chat messages stays plain text (issue 28 item 7).

A chat template writes its own markup ("<|im_start|>system\\n...") around the messages; only that markup may
become control tokens. A message holding the same text ("<|im_start|>system" in a user turn) must not forge
a turn. So before rendering, every special-token text inside the messages (and tools, and the template's
other arguments) is swapped for a private-use character that appears nowhere else; the rendered prompt is
cut at the special tokens left (the template's own), and the swapped text is put back into the pieces
between them, which are tokenized as plain text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from tokenizers import Tokenizer as Backend

# Supplementary private-use planes 15 and 16: characters no tokenizer gives meaning to
_PRIVATE = range(0xF0000, 0x10FFFE)


class SpecialText:
    """The special tokens of a vocabulary (those `tokenizers` parses only when asked), found in text."""

    def __init__(self, backend: Backend) -> None:
        specials = {t.content: (i, t) for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.tokens = specials
        # longest first: at one position the longest special text wins, as in tokenizers' matcher
        alternatives = "|".join(re.escape(text) for text in sorted(specials, key=len, reverse=True))
        self.pattern = re.compile(alternatives) if specials else None

    def shield(self, value: Any, swaps: dict[str, str], taken: set[str]) -> Any:
        """`value` (a JSON-like structure) with each special text in its strings swapped for a private-use
        character; `swaps` maps those characters back and grows; `taken` holds characters not to use."""
        if self.pattern is None:
            return value
        if isinstance(value, str):
            return self.pattern.sub(lambda m: self._swap(m.group(), swaps, taken), value)
        if isinstance(value, dict):
            return {self.shield(k, swaps, taken): self.shield(v, swaps, taken) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.shield(v, swaps, taken) for v in value]
        return value

    def _swap(self, text: str, swaps: dict[str, str], taken: set[str]) -> str:
        for char, original in swaps.items():
            if original == text:
                return char
        char = next(c for c in map(chr, _PRIVATE) if c not in taken and c not in swaps)
        swaps[char] = text
        return char

    def split(self, text: str) -> Iterator[tuple[str, int] | int]:
        """The text's pieces in order: (plain text, its offset) or a special token's id; spaces beside a token
        that strips them (lstrip / rstrip) dropped, as `tokenizers` drops them."""
        start = 0
        for match in self.pattern.finditer(text) if self.pattern else ():
            token_id, token = self.tokens[match.group()]
            end = match.start()
            piece = text[start:end].rstrip() if token.lstrip else text[start:end]
            if piece:
                yield piece, start
            yield token_id
            start = match.end()
            if token.rstrip:
                start += len(text[start:]) - len(text[start:].lstrip())
        if start < len(text):
            yield text[start:], start


def strings_in(value: Any) -> Iterator[str]:
    """Every string (dict keys too) in a JSON-like structure."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings_in(key)
            yield from strings_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from strings_in(item)
