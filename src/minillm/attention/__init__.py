"""Attention backends with one interface: q [B, Hq, Tq, D] over k/v [B, Hkv, S, D].

- "flash":    our FlashAttention-2 (`flash_attention_with_kv_cache`), tiled, O(N) memory
- "standard": the materialised softmax(QK^T)V reference, O(N^2) memory
- "sdpa":     PyTorch's fused `scaled_dot_product_attention`
- "paged":    for decode over a paged cache on CPU, our C++ kernel (paged_cpu.py), which reads the
              pages in place; everything else (prefill, contiguous caches, no kernel) as "sdpa"
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import paged_cpu
from .common import check_paged_shapes, gather_pages
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
) -> Tensor:
    """Dispatch to one backend; all of them compute the same (exact) result.

    With `block_table`, k and v are paged block pools: our flash kernel (and, for decode on CPU, the
    "paged" kernel) reads the pages in place; the others get each row's pages gathered into a
    contiguous copy first.
    """
    if backend == "flash":
        return flash_attention_with_kv_cache(q, k, v, cache_seqlens, causal=causal, block_size=block_size,
                                             softmax_scale=softmax_scale, block_table=block_table)
    if block_table is not None:
        check_paged_shapes(q, k, v, block_table)
        if backend == "paged" and _paged_kernel_fits(q, cache_seqlens):
            scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
            return paged_cpu.paged_decode(q.squeeze(2), k, v, block_table, cache_seqlens, scale).unsqueeze(2)
        k, v = gather_pages(k, block_table), gather_pages(v, block_table)
    if backend == "standard":
        return standard_attention(q, k, v, cache_seqlens, causal=causal, softmax_scale=softmax_scale)
    if backend in ("sdpa", "paged"):
        return sdpa_attention(q, k, v, cache_seqlens, causal=causal, softmax_scale=softmax_scale)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def _paged_kernel_fits(q: Tensor, cache_seqlens: Tensor | Sequence[int] | None) -> bool:
    # one query per row sees every cached key, causal or not
    return (q.shape[2] == 1 and isinstance(cache_seqlens, Tensor) and q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.bfloat16) and paged_cpu.available())


__all__ = ["BACKENDS", "attention", "flash_attention_with_kv_cache", "sdpa_attention", "standard_attention"]
