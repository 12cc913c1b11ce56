"""Our C++ kernel for attention over the paged KV cache on CPU (kernels/csrc/paged_attention_kernel.h).

In PyTorch ops, paged attention is a gather of every sequence's pages into a padded copy and a
masked SDPA (or many tiny matmuls) over it: at 64 decoding sequences it cost more than all the
linear layers. The kernel reads each sequence's pages in place, for a packed batch of any mix of
decode rows and prefill chunks (the engine's step). It is registered as `torch.ops.minillm.paged_attention`,
so a compiled step (torch.compile) calls it as one node. It is built at install (see minillm.kernels);
without a C++ compiler the engine keeps the PyTorch path (`available()` is False).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Module

from .. import kernels

_available: bool | None = None  # a plain global, so a compiled step reads it without tracing a load


def available() -> bool:
    """Whether the kernel builds and loads here (tried once per process)."""
    global _available
    if _available is None:
        _available = kernels.paged_attention_available()
    return _available


def paged_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, seqlens: Tensor,
                    query_start: Tensor, scale: float, window: int = 0, softcap: float = 0.0) -> Tensor:
    """Packed queries q [N, Hq, D] over pools [num_blocks, page, Hkv, D]; returns [N, Hq, D].

    Sequence b's queries are rows query_start[b]:query_start[b + 1] and are its last keys (causal);
    it holds seqlens[b] keys in the blocks block_table[b]; with `window` > 0 a query sees only its last
    `window` keys; `softcap` > 0 caps scores at softcap * tanh(score / softcap). float32 or bfloat16, CPU;
    float16 pools under float32 queries (the engine's 16-bit KV cache).
    """
    return torch.ops.minillm.paged_attention(q, k_pool, v_pool, block_table, seqlens, query_start, scale, window,
                                             softcap)



def rope_cache_write(qkv: Tensor, cos: Tensor, sin: Tensor, k_pool: Tensor, v_pool: Tensor, slots: Tensor,
                     num_heads: int, num_kv_heads: int, q_norm: Module | None = None,
                     k_norm: Module | None = None) -> Tensor:
    """RoPE on q and k of qkv [N, (Hq + 2 Hkv) D] and the K/V write into the pools at `slots`, in one C++ op
    (kernels/csrc/layer_ops.cpp, float32) instead of ~30 small ones; returns q [N, Hq, D]. Qwen3's per-head
    q/k norms, where the model has them, run first as the model's own modules (the same bits as its ops)."""
    if q_norm is not None:
        n, d = qkv.shape[0], k_pool.shape[-1]
        q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
        qkv = torch.cat([q_norm(q.view(n, num_heads, d)).view(n, -1), k_norm(k.view(n, num_kv_heads, d)).view(n, -1),
                         v], dim=-1)
    return torch.ops.minillm.rope_cache_write(qkv, cos, sin, k_pool, v_pool, slots, num_heads, num_kv_heads)
