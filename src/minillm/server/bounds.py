"""Sizes a request's raw JSON must fit before anything is validated or tokenized: a prompt longer
than the model's context, or a request's prompts longer than the KV cache, in token ids or in bytes
of text, is refused at once (a 400), however it would tokenize. N tokens hold at most N times the
longest token's bytes of text, so longer text cannot fit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..text.tokenizer import Tokenizer
from .protocol import MAX_CHOICES, APIError


def longest_token_bytes(tokenizer: Tokenizer) -> int:
    return max(len(tokenizer.decode([i], skip_special_tokens=False).encode())
               for i in range(tokenizer.backend.get_vocab_size(with_added_tokens=True)))


@dataclass(frozen=True)
class Bounds:
    """What a request's raw JSON must fit before anything is validated or tokenized."""

    max_seq_len: int  # tokens in one sequence (prompt and output)
    max_request_tokens: int  # tokens in all of a request's choices together: the KV cache's capacity
    longest_token: int  # bytes: text longer than N times this holds more than N tokens

    def check(self, body: dict[str, Any]) -> None:
        prompt = body.get("prompt")
        if isinstance(prompt, str) or isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if isinstance(prompt, list):
            if len(prompt) > MAX_CHOICES:
                raise APIError(400, f"prompt holds {len(prompt)} prompts; at most {MAX_CHOICES} fit in one request",
                               "prompt")
            for one in prompt:
                if isinstance(one, list) and len(one) >= self.max_seq_len:
                    raise APIError(400, f"a prompt of {len(one)} token ids leaves no room in the model's context of "
                                        f"{self.max_seq_len} tokens", "prompt", code="context_length_exceeded")
                self._text(one, "prompt", self.max_seq_len)
            ids = sum(len(one) for one in prompt if isinstance(one, list))
            if ids > self.max_request_tokens:
                raise APIError(400, f"prompt holds {ids} token ids in all, more than the KV cache's "
                                    f"{self.max_request_tokens} tokens", "prompt", code="context_length_exceeded")
            self._text(prompt, "prompt", self.max_request_tokens)
        messages = body.get("messages")
        if isinstance(messages, list):
            if len(messages) > self.max_seq_len:
                raise APIError(400, f"messages holds {len(messages)} messages, more than the model's context of "
                                    f"{self.max_seq_len} tokens", "messages", code="context_length_exceeded")
            self._text([messages, body.get("tools")], "messages", self.max_seq_len)

    def _text(self, value: Any, name: str, tokens: int) -> None:
        limit = tokens * self.longest_token
        if text_bytes(value, limit) > limit:
            raise APIError(400, f"{name} holds more than {limit} bytes of text, more than {tokens} tokens of "
                                f"{self.longest_token} bytes at most", name, code="context_length_exceeded")


def text_bytes(value: Any, limit: int) -> int:
    """The UTF-8 bytes of every string in a JSON value; counting stops once past `limit`."""
    if isinstance(value, str):
        return len(value) if len(value) > limit else len(value.encode("utf-8", "surrogatepass"))
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    total = 0
    for item in items:
        total += text_bytes(item, limit - total)
        if total > limit:
            break
    return total
