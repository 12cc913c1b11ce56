"""An input's embedding, computed in the engine process (engine_core.py) for /v1/embeddings (embeddings.py):
the last layer's hidden states after the final norm, pooled over the tokens (mean, or the last token's),
L2-normalised. Each input runs alone, between two engine steps, on a scratch KV cache of its own length,
so the engine's paged cache and its requests are untouched."""

from __future__ import annotations

import torch

from ..compat.kv_cache import KVCache
from ..model import MiniLLM


@torch.inference_mode()
def pooled(model: MiniLLM, ids: list[int], pooling: str) -> list[float]:
    """One input's embedding; `pooling` "mean" or "last"."""
    cache = KVCache(model.config, 1, max_seq_len=len(ids), dtype=model.dtype, device=model.device)
    context = model.step_context(cache.plan_write(len(ids), None, "sdpa").step)
    hidden = model.embed(torch.tensor(ids, device=model.device))
    for layer in model.layers:
        hidden = layer(hidden, context)
    hidden = model.norm(hidden).float()
    vector = hidden.mean(0) if pooling == "mean" else hidden[-1]
    return torch.nn.functional.normalize(vector, dim=0).tolist()
