"""Shape checks, the position-based visibility rule and the page gather shared by the backends."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_shapes(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int]:
    """Validate [B, Hq, Tq, D] queries against [B, Hkv, S, D] keys/values; return (Hkv, S)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, T, D], got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {list(k.shape)} vs {list(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"batch or head dim mismatch: q {list(q.shape)}, k {list(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    return k.shape[1], k.shape[2]


def check_paged_shapes(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor,
                       batch: int | None = None) -> tuple[int, int]:
    """Validate block pools [num_blocks, page, Hkv, D] and a [B, pages] table (B: q's rows, or `batch`
    sequences for packed queries); return (Hkv, page)."""
    batch = q.shape[0] if batch is None else batch
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"paged k/v must be equal [num_blocks, page, Hkv, D] pools, got {list(k_pool.shape)}, {list(v_pool.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be [B={batch}, pages], got {list(block_table.shape)}")
    if q.dim() != 4 or q.shape[3] != k_pool.shape[3] or q.shape[1] % k_pool.shape[2]:
        raise ValueError(f"q {list(q.shape)} does not fit the K/V pool {list(k_pool.shape)}")
    return k_pool.shape[2], k_pool.shape[1]


def gather_pages(pool: Tensor, block_table: Tensor) -> Tensor:
    """Rows' pages [B, n] from a pool [num_blocks, page, Hkv, D], as a [B, Hkv, n * page, D] view.

    Token-major pages make the gather one contiguous copy per page and the head-major result a
    free transpose (the backends accept strided K/V).
    """
    batch, n = block_table.shape
    _, page, heads, dim = pool.shape
    # index_select, not pool[block_table]: several times faster for this gather on CPU
    pages = pool.index_select(0, block_table.reshape(-1))  # [B * n, page, Hkv, D]
    return pages.view(batch, n * page, heads, dim).transpose(1, 2)


def seqlens_tensor(cache_seqlens: Tensor | Sequence[int] | None, batch: int, kv_len: int, device) -> Tensor:
    """Per-row key lengths as a [B] long tensor (None means every row holds kv_len keys)."""
    if cache_seqlens is None:
        return torch.full((batch,), kv_len, dtype=torch.long, device=device)
    return torch.as_tensor(cache_seqlens, dtype=torch.long, device=device).reshape(batch)


def dense_visibility(q_len: int, kv_len: int, seqlens: Tensor, causal: bool, window: int = 0) -> Tensor:
    """[B, 1, Tq, S] boolean mask: key j is visible to query i of row b.

    Query i of row b sits at position seqlens[b] - q_len + i (bottom-right alignment); it sees
    keys j < seqlens[b], with `causal` only j <= its position, and with a sliding `window` > 0 only
    j > its position - window (its last `window` keys). This is the definition every backend
    implements; the flash kernel derives the same rule tile by tile.
    """
    key_pos = torch.arange(kv_len, device=seqlens.device).view(1, 1, -1)
    visible = key_pos < seqlens.view(-1, 1, 1)
    query_pos = (seqlens.view(-1, 1) - q_len + torch.arange(q_len, device=seqlens.device)).unsqueeze(-1)
    if causal:
        visible = visible & (key_pos <= query_pos)
    if window > 0:
        visible = visible & (key_pos > query_pos - window)
    return visible.unsqueeze(1)
