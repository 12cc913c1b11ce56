"""`POST /v1/embeddings` (OpenAI's shape): a text's embedding from the loaded model's hidden states.

The vector is the last layer's hidden states after the final norm (what `last_hidden_state` is in HF
transformers), pooled over the input's tokens: their mean by default, or the last token's with
`"pooling": "last"` (llama.cpp's names; the last token is what decoder-only embedding models such as
e5-mistral and Qwen3-Embedding are trained to pool), then L2-normalised. A chat model's hidden states are
not trained as embeddings: these vectors suit a model made for it, or experiments.

The model lives in the engine process, so the inputs go there (engine_client.embed) and are pooled there
(pooling.py).
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..engine import RequestFailed
from .prepare import load_json, prompt_ids, validated
from .protocol import APIError
from .state import ServerState

class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # refused: the vector is the model's hidden size
    user: str | None = None
    pooling: Literal["mean", "last"] = "mean"


def embeddings_job(state: ServerState, raw: bytes) -> tuple[EmbeddingsRequest, list[list[int]]]:
    """The request and its inputs as token ids (each with the tokenizer's BOS, as a prompt), sized as a
    completion's prompts: at most 128, each within the model's context, all within the KV cache."""
    data = load_json(raw)
    try:
        state.ready()
        state.bounds.check({"prompt": data.get("input")})
        request = validated(data, EmbeddingsRequest)
        if request.dimensions is not None:
            raise APIError(400, "dimensions is not supported: the vector has the model's hidden size", "dimensions")
        state.check_model(request.model)
        return request, prompt_ids(request.input, state.tokenizer, state.bounds.max_seq_len)
    except APIError as err:
        raise err.renamed({"prompt": "input"}) from None


def embeddings_body(state: ServerState, request: EmbeddingsRequest, prompts: list[list[int]],
                    vectors: list[list[float]]) -> dict:
    def encoded(vector: list[float]) -> list[float] | str:
        if request.encoding_format == "float":
            return vector
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()

    tokens = sum(len(ids) for ids in prompts)
    return {"object": "list", "model": state.model_name,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def embed(state: ServerState, request: EmbeddingsRequest, prompts: list[list[int]]) -> dict:
    """The inputs embedded in the engine process, as OpenAI's response."""
    try:
        result = await state.engine.embed(prompts, request.pooling).get()
    except RequestFailed as err:  # the engine process died since ready() looked
        raise APIError(503, str(err), kind="service_unavailable") from None
    if isinstance(result, BaseException):
        raise APIError(500, f"the request failed: {result}", kind="server_error")
    return embeddings_body(state, request, prompts, result)
