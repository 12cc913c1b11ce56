"""Incremental detokenisation for streaming, with stop strings.

Text is released only when it is final: never half of a multi-byte character (the decoder's
U+FFFD shows an incomplete UTF-8 sequence) and never a tail that could be the start of a stop
string. The concatenation of everything released equals the non-streamed text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # released so far
        self.stopped = False  # a stop string was found; text ends just before it
        self._pending = ""  # decoded but held back (may start a stop string)
        # Decoding restarts at _prefix (a few tokens back, so context-dependent decoders such as
        # SentencePiece's leading-space rule see the same neighbours); text up to _read is done.
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text that became final (possibly "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        done = self.tokenizer.decode(self.ids[self._prefix:self._read])
        full = self.tokenizer.decode(self.ids[self._prefix:])
        if full.endswith("\ufffd") or len(full) <= len(done):
            return ""  # an incomplete character (or nothing visible yet): wait for more tokens
        self._prefix, self._read = self._read, len(self.ids)
        return self._release(full[len(done):], final=False)

    def finish(self) -> str:
        """End of generation (EOS or length): release everything still held back."""
        if self.stopped:
            return ""
        done = self.tokenizer.decode(self.ids[self._prefix:self._read])
        tail = self.tokenizer.decode(self.ids[self._prefix:])[len(done):]
        self._prefix = self._read = len(self.ids)
        return self._release(tail, final=True)

    def _release(self, new: str, final: bool) -> str:
        self._pending += new
        hits = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self._pending, self.stopped = self._pending[: min(hits)], "", True
        else:
            hold = 0 if final else self._stop_prefix_len(self._pending)
            cut = len(self._pending) - hold
            out, self._pending = self._pending[:cut], self._pending[cut:]
        self.text += out
        return out

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
