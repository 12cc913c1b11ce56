"""Standard attention: softmax(Q K^T / sqrt(D)) V with the whole score matrix materialised.

This is the plain reference the other backends are tested against, and the memory baseline
(O(Tq x S) per head) that the benchmarks compare with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import check_shapes, dense_visibility, seqlens_tensor


def standard_attention(
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
    """Same arguments and layouts as `flash_attention_with_kv_cache`; computed in float32."""
    num_kv_heads, kv_len = check_shapes(q, k, v)
    batch, num_heads, q_len, head_dim = q.shape
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    groups = num_heads // num_kv_heads
    k = k.float().repeat_interleave(groups, dim=1)
    v = v.float().repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    visible = dense_visibility(q_len, kv_len, seqlens_tensor(cache_seqlens, batch, kv_len, q.device), causal, window)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.where(visible.any(dim=-1, keepdim=True), probs, 0.0)  # rows with no key: zeros, not NaN
    return (probs @ v).to(q.dtype)
