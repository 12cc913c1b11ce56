"""FlashAttention-2 in plain PyTorch: tiled attention with an online softmax.

The N x N score matrix is never built. Queries are processed in tiles of `tile_size` rows (outer
loop); for each query tile the key/value tiles it can see are streamed through (inner loop) while a
running row maximum `m`, a running softmax denominator `l` and an unnormalised output `acc` are kept
in float32. When a new tile raises the maximum, the old `l` and `acc` are rescaled by
exp(m_old - m_new); the division by `l` happens once at the end (FlashAttention-2's deferred
normalisation). Peak extra memory is O(tile_size^2) per (batch, head) instead of O(N^2).

Causality is computed from positions, never from a dense mask: key tiles that lie entirely above the
diagonal for every row are skipped (not computed), tiles entirely below it are used unmasked, and only
tiles that straddle the diagonal (or a row's key length) get an element-wise mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import check_paged_shapes, check_shapes, gather_pages


def flash_attention_with_kv_cache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor | Sequence[int] | None = None,
    *,
    causal: bool = True,
    tile_size: int = 128,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    block_table: Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention of `q` over a (possibly partly filled) key/value cache, FlashAttention-2 style.

    Layouts (batch B, heads H, sequence T/S, head dim D):
      q:        [B, Hq, Tq, D]   the new queries
      k_cache:  [B, Hkv, S, D]   keys; positions >= cache_seqlens[b] are ignored
      v_cache:  [B, Hkv, S, D]   values, same layout
      Hq must be a multiple of Hkv (grouped-query attention); K/V heads are shared by
      Hq // Hkv query heads without being repeated in memory.

    cache_seqlens: valid keys per row (the new tokens included), shape [B]; None means all S.
      Rows may differ. A host list lets the function skip and leave unmasked more tiles, since the
      bounds are then known without reading device memory; a tensor is never synchronised on.
    causal: queries are aligned bottom-right per row: query i of row b sits at position
      cache_seqlens[b] - Tq + i and sees keys 0..that position. This covers prefill (Tq == S),
      chunked prefill and decode (Tq == 1). A query with no visible key (a padded row) outputs zeros
      and has log-sum-exp -inf, never NaN.
    tile_size: tile edge for queries and keys.
    softmax_scale: defaults to 1/sqrt(D).
    return_lse: also return the log-sum-exp of the scaled scores, [B, Hq, Tq], float32.
    softcap: > 0 caps each scaled score at softcap * tanh(score / softcap) (Gemma 2).
    window: > 0 for sliding-window attention (Mistral's): a query sees only its last `window` keys;
      key tiles wholly before every row's window are skipped like those past the diagonal.
    block_table: paged K/V. k_cache and v_cache are then block pools [num_blocks, page, Hkv, D]
      and row b's key j lives at pool[block_table[b, j // page], j % page]; key tiles are whole
      pages (tile_size // page of them), gathered per row.

    Returns the output [B, Hq, Tq, D] in q's dtype (and the LSE if asked).
    """
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive integer, got {tile_size!r}")
    if block_table is None:
        num_kv_heads, kv_capacity = check_shapes(q, k_cache, v_cache)
        key_step = tile_size

        def kv_tile(start: int, end: int) -> tuple[Tensor, Tensor]:
            return k_cache[:, :, start:end], v_cache[:, :, start:end]
    else:
        num_kv_heads, page = check_paged_shapes(q, k_cache, v_cache, block_table)
        kv_capacity = block_table.shape[1] * page
        key_step = page * max(1, tile_size // page)

        def kv_tile(start: int, end: int) -> tuple[Tensor, Tensor]:  # start is a multiple of page
            pages = block_table[:, start // page: (end + page - 1) // page]
            return gather_pages(k_cache, pages)[:, :, : end - start], gather_pages(v_cache, pages)[:, :, : end - start]
    batch, num_heads, q_len, head_dim = q.shape
    groups = num_heads // num_kv_heads
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    device = q.device

    # Host-side bounds [lo, hi] on the rows' key lengths decide which tiles to skip or mask.
    if cache_seqlens is None:
        seqlens, lo, hi = None, kv_capacity, kv_capacity
    elif isinstance(cache_seqlens, Tensor):
        if cache_seqlens.shape != (batch,):
            raise ValueError(f"cache_seqlens must have shape [{batch}], got {list(cache_seqlens.shape)}")
        seqlens, lo, hi = cache_seqlens.to(device=device, dtype=torch.long), 0, kv_capacity
    else:
        lengths = [int(n) for n in cache_seqlens]
        if len(lengths) != batch or any(not 0 <= n <= kv_capacity for n in lengths):
            raise ValueError(f"cache_seqlens must be {batch} lengths in [0, {kv_capacity}], got {lengths}")
        seqlens = torch.tensor(lengths, device=device, dtype=torch.long)
        lo, hi = min(lengths), max(lengths)

    # [B, Hkv, G, Tq, D]: the G query heads of one KV head are folded into the row dimension below.
    q_grouped = q.unflatten(1, (num_kv_heads, groups))
    out = torch.empty(q_grouped.shape, dtype=q.dtype, device=device)
    lse = torch.empty(q_grouped.shape[:-1], dtype=torch.float32, device=device) if return_lse else None
    # First query position of each row: query i is at offset + i.
    row_offset = None if seqlens is None else (seqlens - q_len).view(batch, 1, 1, 1, 1)

    for q_start in range(0, q_len, tile_size):
        q_end = min(q_start + tile_size, q_len)
        rows = q_end - q_start
        q_tile = (q_grouped[:, :, :, q_start:q_end].float() * scale).reshape(batch, num_kv_heads, groups * rows, head_dim)
        row_max = torch.full((batch, num_kv_heads, groups * rows, 1), float("-inf"), device=device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(batch, num_kv_heads, groups * rows, head_dim, dtype=torch.float32, device=device)

        # Keys any row can see from this query tile; everything past it is skipped, not masked.
        k_stop = min(hi, hi - q_len + q_end) if causal else hi
        # ... and with a window, keys before every row's first query's window are skipped too
        k_first = max(0, lo - q_len + q_start - window + 1) // key_step * key_step if window > 0 else 0
        for k_start in range(k_first, max(k_stop, 0), key_step):
            k_end = min(k_start + key_step, k_stop)
            k_tile, v_tile = (t.float() for t in kv_tile(k_start, k_end))
            scores = q_tile @ k_tile.transpose(-1, -2)  # [B, Hkv, G*rows, cols]
            if softcap > 0:
                scores = softcap * torch.tanh(scores / softcap)

            # A tile needs a mask only if some row's first query of this tile cannot see all of it
            # (or, with a window, some row's last query has left part of it behind).
            fully_visible = (k_end - 1 <= lo - q_len + q_start) if causal else (k_end <= lo)
            if window > 0:
                fully_visible = fully_visible and k_start > hi - q_len + q_end - 1 - window
            if not fully_visible:
                visible = _visible(k_start, k_end, q_start, q_end, q_len, kv_capacity, row_offset, causal, device,
                                   window)
                scores = scores.view(batch, num_kv_heads, groups, rows, -1).masked_fill(~visible, float("-inf"))
                scores = scores.view(batch, num_kv_heads, groups * rows, -1)

            new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
            # Rows that have seen no visible key yet keep max -inf; shift by 0 so exp() gives 0, not NaN.
            shift = torch.where(new_max == float("-inf"), 0.0, new_max)
            probs = torch.exp(scores - shift)
            rescale = torch.exp(row_max - shift)
            row_sum = row_sum * rescale + probs.sum(dim=-1, keepdim=True)
            acc = acc * rescale + probs @ v_tile
            row_max = new_max

        tile_out = acc / torch.where(row_sum == 0, 1.0, row_sum)
        out[:, :, :, q_start:q_end] = tile_out.view(batch, num_kv_heads, groups, rows, head_dim).to(out.dtype)
        if lse is not None:
            lse[:, :, :, q_start:q_end] = (row_max + torch.log(row_sum)).view(batch, num_kv_heads, groups, rows)

    out = out.flatten(1, 2)
    return (out, lse.flatten(1, 2)) if return_lse else out


def _visible(
    k_start: int,
    k_end: int,
    q_start: int,
    q_end: int,
    q_len: int,
    kv_len: int,
    row_offset: Tensor | None,
    causal: bool,
    device: torch.device,
    window: int = 0,
) -> Tensor:
    """Boolean visibility of one tile, broadcastable to [B, Hkv, G, rows, cols], from positions alone."""
    key_pos = torch.arange(k_start, k_end, device=device)
    # Query i of a row sits at offset + i, where offset = the row's key length - q_len.
    offset = kv_len - q_len if row_offset is None else row_offset
    query_pos = offset + torch.arange(q_start, q_end, device=device).view(1, 1, 1, -1, 1)
    # key <= query position also implies key < the row's length
    visible = key_pos <= query_pos if causal else key_pos < offset + q_len
    return visible & (key_pos > query_pos - window) if window > 0 else visible
