"""Attention backends with one interface: q [B, Hq, Tq, D] over k/v [B, Hkv, S, D].

- "flash":    our FlashAttention-2 (`flash_attention_with_kv_cache`), tiled, O(N) memory
- "standard": the materialised softmax(QK^T)V reference, O(N^2) memory
- "sdpa":     PyTorch's fused `scaled_dot_product_attention`
- "paged":    over a paged cache on CPU, our C++ kernel (paged_cpu.py), which reads the pages in
              place; everything else (contiguous caches, other devices, no kernel) as "sdpa"

Packed steps (the engine's: q [1, Hq, N, D], sequence b's queries at query_start[b]:query_start[b+1])
go to the kernel as they are; the other backends get them as right-aligned rows and back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import paged_cpu
from .common import check_paged_shapes, gather_pages, packed_to_padded, padded_to_packed
from .flash import flash_attention_with_kv_cache
from .reference import standard_attention
from .sdpa import sdpa_attention

BACKENDS = ("flash", "standard", "sdpa", "paged")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_seqlens: Tensor | Sequence[int] | None = None,
    *,
    backend: str = "flash",
    causal: bool = True,
    block_size: int = 128,
    softmax_scale: float | None = None,
    block_table: Tensor | None = None,
    query_start: Tensor | None = None,
) -> Tensor:
    """Dispatch to one backend; all of them compute the same (exact) result.

    With `block_table`, k and v are paged block pools: our flash kernel (and, on CPU, the "paged"
    kernel) reads the pages in place; the others get each row's pages gathered into a contiguous
    copy first. With `query_start` (and a block table), q is a packed step.
    """
    if query_start is not None:
        if block_table is None or q.shape[0] != 1:
            raise ValueError("packed queries (query_start) are [1, H, N, D] over a paged cache (block_table)")
        check_paged_shapes(q, k, v, block_table, batch=query_start.numel() - 1)
        if backend == "paged" and causal and _paged_kernel_fits(q, cache_seqlens):
            scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
            out = paged_cpu.paged_attention(q[0].transpose(0, 1), k, v, block_table, cache_seqlens, query_start, scale)
            return out.transpose(0, 1).unsqueeze(0)
        rows, index = packed_to_padded(q, query_start)
        out = attention(rows, k, v, cache_seqlens, backend=backend, causal=causal, block_size=block_size,
                        softmax_scale=softmax_scale, block_table=block_table)
        return padded_to_packed(out, index)
    if backend == "flash":
        return flash_attention_with_kv_cache(q, k, v, cache_seqlens, causal=causal, block_size=block_size,
                                             softmax_scale=softmax_scale, block_table=block_table)
    if block_table is not None:
        check_paged_shapes(q, k, v, block_table)
        if backend == "paged" and (causal or q.shape[2] == 1) and _paged_kernel_fits(q, cache_seqlens):
            batch, heads, q_len, dim = q.shape  # rows of q_len queries, packed one after another
            starts = torch.arange(0, batch * q_len + 1, q_len, device=q.device)
            packed = q.transpose(0, 1).reshape(1, heads, batch * q_len, dim)
            out = attention(packed, k, v, cache_seqlens, backend=backend, softmax_scale=softmax_scale,
                            block_table=block_table, query_start=starts)
            return out.view(heads, batch, q_len, dim).transpose(0, 1)
        k, v = gather_pages(k, block_table), gather_pages(v, block_table)
    if backend == "standard":
        return standard_attention(q, k, v, cache_seqlens, causal=causal, softmax_scale=softmax_scale)
    if backend in ("sdpa", "paged"):
        return sdpa_attention(q, k, v, cache_seqlens, causal=causal, softmax_scale=softmax_scale)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def _paged_kernel_fits(q: Tensor, cache_seqlens: Tensor | Sequence[int] | None) -> bool:
    return (isinstance(cache_seqlens, Tensor) and q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.bfloat16) and paged_cpu.available())


__all__ = ["BACKENDS", "attention", "flash_attention_with_kv_cache", "sdpa_attention", "standard_attention"]
