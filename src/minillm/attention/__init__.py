"""Attention over the paged KV cache, chosen once per engine (`select_attention`), and the reference
implementations it is tested and measured against.

Every backend takes one step's packed, token-major queries q [N, Hq, D] (sequence b's at
step.query_start[b]:step.query_start[b + 1], its last keys: causal, aligned bottom-right), one layer's
pools [num_blocks, page, Hkv, D], the step and the layer's attention settings (`LayerAttention`:
sliding window, softmax scale, logit soft-cap); it returns [N, Hq, D]:

- "paged_cpu": our C++ kernel (paged_cpu.py), which reads the pages in place (CPU, float32/bfloat16)
- "triton":    our Triton kernels (triton_paged.py): varlen FA2 prefill and split-K decode over the pages,
               the default on a GPU (on CPU tensors under TRITON_INTERPRET=1); needs the optional `triton`
- "flash":     our FlashAttention-2 in PyTorch (flash.py), O(N) memory, tiles of `tile_size`
- "sdpa":      PyTorch's fused `scaled_dot_product_attention`
- "standard":  softmax(QK^T)V materialised, the plain reference

The last three take rows [B, H, T, D]: the step's queries are laid out as right-aligned rows (the
layout is planned on the host with the step, so nothing synchronises) and sdpa/standard get each
sequence's pages gathered into a contiguous copy; flash streams them tile by tile.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .. import kernels
from . import paged_cpu
from .common import gather_pages
from .flash import flash_attention_with_kv_cache
from .reference import standard_attention
from .sdpa import sdpa_attention

BACKENDS = ("paged_cpu", "triton", "flash", "sdpa", "standard")


@dataclass(frozen=True)
class LayerAttention:
    """What a layer's attention computes beyond plain causal softmax(q k^T / sqrt(D)) v."""

    window: int = 0  # > 0: each query sees only its last `window` keys (Mistral, Gemma's local layers)
    scale: float | None = None  # None: head_dim ** -0.5 (Gemma 2: query_pre_attn_scalar ** -0.5)
    softcap: float = 0.0  # > 0: scores capped at softcap * tanh(score / softcap) (Gemma 2)


PLAIN = LayerAttention()


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    attend: Callable[..., Tensor]  # (q [N, Hq, D], k_pool, v_pool, step, LayerAttention) -> [N, Hq, D]
    # (qkv, cos, sin, k_pool, v_pool, slots, Hq, Hkv, q_norm, k_norm) -> q: the q/k norms (modules or None),
    # RoPE and the cache write in one kernel, where the backend has one (None: the model's PyTorch ops)
    rope_write: Callable[..., Tensor] | None = None


def select_attention(backend: str | None, device: str | torch.device, dtype: torch.dtype, tile_size: int = 128,
                     head_dim: int | None = None) -> AttentionBackend:
    """The backend by name, or None for the fastest that runs here: "paged_cpu" where the C++ kernel
    loads (CPU, float32 or bfloat16), "triton" on a GPU where triton is installed, else "sdpa".
    With `head_dim`, a backend that cannot take it (or `dtype`) is refused now, naming what it takes."""
    device = torch.device(device)
    kernel = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and paged_cpu.available()
    name = backend if backend is not None else "paged_cpu" if kernel else "triton" if _gpu_triton(device) else "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    if name == "paged_cpu":
        if not kernel:
            raise ValueError(f"the 'paged_cpu' attention backend needs our C++ kernel on the CPU in float32 or bfloat16 "
                             f"(built with g++); here: {device.type}, {dtype}")
        fused = dtype == torch.float32 and kernels.ops_available()
        return AttentionBackend(name, _paged_cpu, paged_cpu.rope_cache_write if fused else None)
    if name == "triton":
        try:
            from . import triton_paged
        except ImportError:
            raise ValueError("the 'triton' attention backend needs triton: pip install -e \".[gpu]\"") from None
        from .triton_rope import rope_cache_write

        if head_dim is not None:
            triton_paged.check_supported(head_dim, dtype)
        return AttentionBackend(name, partial(_triton, triton_paged), partial(_triton_rope_write, rope_cache_write))
    if name == "flash":
        return AttentionBackend(name, partial(_flash, tile_size))
    return AttentionBackend(name, partial(_gathered, sdpa_attention if name == "sdpa" else standard_attention))


def _gpu_triton(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def _paged_cpu(q: Tensor, k_pool: Tensor, v_pool: Tensor, step: Any, layer: LayerAttention = PLAIN) -> Tensor:
    scale = q.shape[-1] ** -0.5 if layer.scale is None else layer.scale
    return paged_cpu.paged_attention(q, k_pool, v_pool, step.block_table, step.seqlens, step.query_start, scale,
                                     layer.window, layer.softcap)


def _triton(kernels: Any, q: Tensor, k_pool: Tensor, v_pool: Tensor, step: Any, layer: LayerAttention = PLAIN) -> Tensor:
    if layer.window or layer.softcap:
        raise ValueError("the 'triton' attention backend has no sliding window or soft-capping yet; "
                         "use 'sdpa' or 'flash' for this model")
    if max(step.counts) == 1:  # every sequence decodes one token: split-K over its keys
        return kernels.paged_decode(q, k_pool, v_pool, step.block_table, step.seqlens, max(step.host_seqlens),
                                    layer.scale)
    return kernels.paged_prefill(q, k_pool, v_pool, step.block_table, step.seqlens, step.query_start,
                                 max(step.counts), layer.scale)[0]


def _triton_rope_write(kernel: Callable[..., Tensor], qkv: Tensor, cos: Tensor, sin: Tensor, k_pool: Tensor,
                       v_pool: Tensor, slots: Tensor, num_heads: int, num_kv_heads: int, q_norm: Any, k_norm: Any) -> Tensor:
    norms = (q_norm.weight, k_norm.weight, q_norm.eps) if q_norm is not None else ()
    return kernel(qkv, cos, sin, k_pool, v_pool, slots, num_heads, num_kv_heads, *norms)


def _flash(tile_size: int, q: Tensor, k_pool: Tensor, v_pool: Tensor, step: Any, layer: LayerAttention = PLAIN) -> Tensor:
    rows = step.rows
    out = flash_attention_with_kv_cache(rows.to_rows(q), k_pool, v_pool, rows.seqlens, tile_size=tile_size,
                                        block_table=step.block_table[:, :rows.pages], window=layer.window,
                                        softmax_scale=layer.scale, softcap=layer.softcap)
    return rows.to_packed(out)


def _gathered(fn: Callable[..., Tensor], q: Tensor, k_pool: Tensor, v_pool: Tensor, step: Any,
              layer: LayerAttention = PLAIN) -> Tensor:
    rows = step.rows
    table = step.block_table[:, :rows.pages]
    k, v = (gather_pages(pool, table)[:, :, :rows.kv_len] for pool in (k_pool, v_pool))
    out = fn(rows.to_rows(q), k, v, rows.seqlens, window=layer.window, softmax_scale=layer.scale, softcap=layer.softcap)
    return rows.to_packed(out)


__all__ = ["BACKENDS", "PLAIN", "AttentionBackend", "LayerAttention", "flash_attention_with_kv_cache", "sdpa_attention", "select_attention",
           "standard_attention"]
