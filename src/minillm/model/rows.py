"""The first release's [B, T] rows interface of `MiniLLM.forward`: rows laid onto a packed step of a
`KVCache` (a per-row view of the paged pools), so they take the engine's one route through the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..cache.kv_cache import KVCache

if TYPE_CHECKING:
    from .transformer import MiniLLM


def forward_rows(model: MiniLLM, input_ids: Tensor, kv_cache: KVCache | None, backend: str, tile_size: int,
                 input_lengths: Sequence[int] | None, last_token_only: bool) -> Tensor:
    """`MiniLLM.forward` on [B, T] rows (see there): logits [B, T, vocab] or [B, 1, vocab]; padding
    positions, and rows that feed nothing, get zeros."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {list(input_ids.shape)}")
    batch, width = input_ids.shape
    if kv_cache is None:
        if input_lengths is not None:
            raise ValueError("input_lengths (padded rows) needs a kv_cache to hold each row's own length")
        if width > model.config.max_seq_len:
            raise ValueError(f"input of {width} tokens exceeds max_seq_len {model.config.max_seq_len}")
        kv_cache = KVCache(model.config, batch, max_seq_len=max(width, 1), dtype=model.dtype, device=model.device)
    elif kv_cache.batch_size != batch:
        raise ValueError(f"input batch {batch} does not match the cache's batch size {kv_cache.batch_size}")
    plan = kv_cache.plan_write(width, input_lengths, backend, tile_size)
    vocab = model.config.vocab_size
    out = torch.zeros(batch, 1 if last_token_only else width, vocab, device=input_ids.device)
    if plan.step is not None:
        logits = model(input_ids.reshape(-1)[plan.token_index], plan.step, last_token_only=last_token_only)
        if last_token_only:
            out[plan.rows, 0] = logits
        else:
            out.view(-1, vocab)[plan.token_index] = logits
    kv_cache.commit(plan)
    return out
