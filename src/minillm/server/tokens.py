"""`POST /tokenize` and `POST /detokenize`, in llama.cpp's server's shapes, with the served model's tokenizer.

/tokenize: `{"content": text, "add_special": false, "parse_special": true, "with_pieces": false}` ->
`{"tokens": [ids]}`, or with `with_pieces` `{"tokens": [{"id": id, "piece": text}]}` (a piece that is part
of a character reads U+FFFD there, where llama.cpp gives its bytes). /detokenize: `{"tokens": [ids]}` ->
`{"content": text}` (special tokens written out, as llama.cpp does). Neither is bounded by the context: a
text of any length up to the body's limit is counted.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from .prepare import load_json, validated
from .protocol import APIError
from .state import ServerState


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    tokens: list[int]


def tokenize(state: ServerState, raw: bytes) -> dict[str, Any]:
    state.ready()
    request = validated(load_json(raw), TokenizeRequest)
    tokenizer = state.tokenizer
    try:
        ids = tokenizer.encode(request.content, add_special_tokens=request.add_special,
                               parse_special=request.parse_special)
    except ValueError as err:  # text that is not valid Unicode
        raise APIError(400, str(err), "content") from None
    if not request.with_pieces:
        return {"tokens": ids}
    return {"tokens": [{"id": i, "piece": tokenizer.decode([i], skip_special_tokens=False)} for i in ids]}


def detokenize(state: ServerState, raw: bytes) -> dict[str, Any]:
    state.ready()
    request = validated(load_json(raw), DetokenizeRequest)
    size = state.tokenizer.vocab_size
    bad = [t for t in request.tokens if not 0 <= t < size]
    if bad:
        raise APIError(400, f"tokens holds ids outside the vocabulary [0, {size}): {bad[:5]}", "tokens")
    return {"content": state.tokenizer.decode(request.tokens, skip_special_tokens=False)}
