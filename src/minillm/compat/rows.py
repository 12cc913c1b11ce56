"""`MiniLLM.forward` on the first release's [B, T] rows: laid onto a packed step of a `KVCache`, so they
take the engine's one route through the model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .kv_cache import KVCache


def forward_rows(model: nn.Module, input_ids: Tensor, *, last_token_only: bool = False,
                 kv_cache: KVCache | None = None, use_flash_attention: bool = True, flash_block_size: int = 128,
                 attention_backend: str | None = None, input_lengths: Sequence[int] | None = None) -> Tensor:
    """Float32 logits [B, T, vocab] for input_ids [B, T] (or [T]), or [B, 1, vocab] with `last_token_only`;
    padding positions, and rows that feed nothing, get zeros.

    With `kv_cache`, each row's new tokens are written at that row's current length and attend to
    everything it has cached; `input_lengths` says how many of each row's T tokens are real
    (right-aligned: left padding). Without a cache: plain causal attention over the rows. The backend is
    `attention_backend` ("paged_cpu", "flash", "sdpa", "standard"), else our FlashAttention-2 (tiles of
    `flash_block_size`) when `use_flash_attention`, else standard attention."""
    backend = attention_backend or ("flash" if use_flash_attention else "standard")
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
    plan = kv_cache.plan_write(width, input_lengths, backend, flash_block_size)
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
