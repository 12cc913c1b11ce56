"""PyTorch's fused `scaled_dot_product_attention` behind the same interface as our kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from .common import check_shapes, dense_visibility, seqlens_tensor


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_seqlens: Tensor | Sequence[int] | None = None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> Tensor:
    """Same arguments and layouts as `flash_attention_with_kv_cache`.

    SDPA's `is_causal` aligns the mask top-left, which is wrong when there are fewer queries than
    keys; so it is used only for square prefill, a single query needs no mask at all, and every
    other case gets an explicit bottom-right boolean mask.
    """
    num_kv_heads, kv_len = check_shapes(q, k, v)
    batch, num_heads, q_len, _ = q.shape
    gqa = num_heads != num_kv_heads
    if cache_seqlens is None and (not causal or q_len == 1):
        return F.scaled_dot_product_attention(q, k, v, scale=softmax_scale, enable_gqa=gqa)
    if cache_seqlens is None and q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale, enable_gqa=gqa)
    mask = dense_visibility(q_len, kv_len, seqlens_tensor(cache_seqlens, batch, kv_len, q.device), causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale, enable_gqa=gqa)
