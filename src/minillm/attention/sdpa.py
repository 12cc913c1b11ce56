"""PyTorch's fused `scaled_dot_product_attention` behind the same interface as our kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import check_shapes, dense_visibility, seqlens_tensor
from .reference import standard_attention


def sdpa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_seqlens: Tensor | Sequence[int] | None = None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> Tensor:
    """Same arguments and layouts as `flash_attention_with_kv_cache`.

    SDPA's `is_causal` aligns the mask top-left, which is wrong when there are fewer queries than
    keys; so it is used only for square prefill, a single query needs no mask at all, and every
    other case gets an explicit bottom-right boolean mask.
    """
    if softcap > 0:  # PyTorch's fused kernel has no soft-capping: the materialised reference does it
        return standard_attention(q, k, v, cache_seqlens, causal=causal, softmax_scale=softmax_scale, window=window,
                                  softcap=softcap)
    num_kv_heads, kv_len = check_shapes(q, k, v)
    batch, num_heads, q_len, _ = q.shape
    if q_len == 1 and q.device.type == "cpu" and q.dtype != torch.float32 and not window:
        return _cpu_low_precision_decode(q, k, v, cache_seqlens, softmax_scale)
    gqa = num_heads != num_kv_heads
    if cache_seqlens is None and (not causal or q_len == 1) and not window:
        return F.scaled_dot_product_attention(q, k, v, scale=softmax_scale, enable_gqa=gqa)
    if cache_seqlens is None and q_len == kv_len and not window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale, enable_gqa=gqa)
    mask = dense_visibility(q_len, kv_len, seqlens_tensor(cache_seqlens, batch, kv_len, q.device), causal, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale, enable_gqa=gqa)


def _cpu_low_precision_decode(q: Tensor, k: Tensor, v: Tensor, cache_seqlens, softmax_scale: float | None) -> Tensor:
    """One query per row, bf16/fp16 on CPU: PyTorch's fused kernel is several times slower there than in
    float32, while two grouped matmuls in the input dtype with a float32 softmax are as fast as float32."""
    batch, num_heads, _, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    q_grouped = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    k, v = k.contiguous(), v.contiguous()  # gathered pages arrive strided; bmm would copy them slower
    scores = (q_grouped @ k.transpose(-1, -2)).float() * scale  # [B, Hkv, G, S]
    if cache_seqlens is not None:
        lengths = seqlens_tensor(cache_seqlens, batch, kv_len, q.device).view(batch, 1, 1, 1)
        scores = scores.masked_fill(torch.arange(kv_len, device=q.device) >= lengths, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # a row with no keys outputs zeros
    return (probs.to(v.dtype) @ v).view(batch, num_heads, 1, head_dim)
