"""RoPE and the paged KV-cache write as one Triton kernel (the GPU's counterpart of the C++
`rope_cache_write` in kernels/csrc/layer_ops.cpp): one launch per layer instead of about twenty small
PyTorch ops, which is most of a batch-1 decode step's time on a GPU. Qwen3's per-head q/k RMSNorm is
applied in the same pass.

The numerics follow the PyTorch path (model/norm.py, model/rope.py): the norm in float32 rounded to
the activations' dtype before its weight, the rotation in float32 rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rope_write_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slots_ptr, q_norm_ptr, k_norm_ptr, eps,
                       num_heads: tl.constexpr, num_kv_heads: tl.constexpr, half: tl.constexpr, NORM: tl.constexpr):
    token, head = tl.program_id(0), tl.program_id(1)  # head: q heads, then k heads, then v heads
    dim: tl.constexpr = 2 * half
    i = tl.arange(0, half)
    src = qkv_ptr + (token * (num_heads + 2 * num_kv_heads) + head) * dim
    x1 = tl.load(src + i).to(tl.float32)
    x2 = tl.load(src + half + i).to(tl.float32)
    slot = tl.load(slots_ptr + token)
    if head >= num_heads + num_kv_heads:  # a value head: stored as it is
        dst = v_ptr + (slot * num_kv_heads + head - num_heads - num_kv_heads) * dim
        tl.store(dst + i, x1.to(v_ptr.dtype.element_ty))
        tl.store(dst + half + i, x2.to(v_ptr.dtype.element_ty))
    else:
        if NORM:
            inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / dim + eps)
            if head < num_heads:
                w1, w2 = tl.load(q_norm_ptr + i).to(tl.float32), tl.load(q_norm_ptr + half + i).to(tl.float32)
            else:
                w1, w2 = tl.load(k_norm_ptr + i).to(tl.float32), tl.load(k_norm_ptr + half + i).to(tl.float32)
            dtype = q_ptr.dtype.element_ty
            x1 = (w1 * (x1 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            x2 = (w2 * (x2 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        cos = tl.load(cos_ptr + token * half + i)
        sin = tl.load(sin_ptr + token * half + i)
        out1 = x1 * cos - x2 * sin
        out2 = x2 * cos + x1 * sin
        if head < num_heads:
            dst = q_ptr + (token * num_heads + head) * dim
        else:
            dst = k_ptr + (slot * num_kv_heads + head - num_heads) * dim
        tl.store(dst + i, out1.to(dst.dtype.element_ty))
        tl.store(dst + half + i, out2.to(dst.dtype.element_ty))


def rope_cache_write(qkv: Tensor, cos: Tensor, sin: Tensor, k_pool: Tensor, v_pool: Tensor, slots: Tensor,
                     num_heads: int, num_kv_heads: int, q_norm: Tensor | None = None, k_norm: Tensor | None = None,
                     eps: float = 0.0) -> Tensor:
    """qkv [N, (Hq + 2 Hkv) * D] -> rotated q [N, Hq, D]; k (rotated) and v written to the pools
    [num_blocks, page, Hkv, D] at slots [N]. With q_norm/k_norm ([D] weights), each q and k head is
    RMS-normalised first (Qwen3). cos, sin: [N, D / 2] float32."""
    n = qkv.shape[0]
    dim = k_pool.shape[-1]
    qkv = qkv.contiguous()
    q = torch.empty(n, num_heads, dim, dtype=qkv.dtype, device=qkv.device)
    if n:
        norm = q_norm is not None
        _rope_write_kernel[(n, num_heads + 2 * num_kv_heads)](
            qkv, cos.contiguous(), sin.contiguous(), q, k_pool, v_pool, slots, q_norm if norm else qkv,
            k_norm if norm else qkv, eps, num_heads, num_kv_heads, dim // 2, norm)
    return q


__all__ = ["rope_cache_write"]
