"""The MiniLLM decoder: a Llama-family transformer (RMSNorm, RoPE, GQA, SwiGLU, optional qkv bias).

Module names follow gpt-fast/Llama: tok_embeddings, layers[i].{attention_norm, attention.{wqkv, wo},
ffn_norm, feed_forward.{w13, w2}}, norm, output (w13: w1 and w3, gate and up, stacked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..kernels import ggml
from ..attention import BACKENDS, attention, paged_cpu
from ..cache.kv_cache import KVCache
from ..cache.step import CacheStep
from ..config import ModelConfig
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rotary


@dataclass
class StepContext:
    """What every layer needs for one forward call, computed once per call."""

    cos: Tensor
    sin: Tensor
    backend: str
    block_size: int
    cache_step: CacheStep | None = None
    # the engine's packed step over float32 paged pools on CPU with our kernels loaded: RoPE and the
    # cache write in one op, q token-major straight into the paged kernel (see Attention.forward)
    fused: bool = False


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        qkv_dim = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        dtype = config.torch_dtype
        self.wqkv = nn.Linear(config.dim_model, qkv_dim, bias=config.qkv_bias, dtype=dtype)
        self.wo = nn.Linear(config.num_heads * config.head_dim, config.dim_model, bias=False, dtype=dtype)

    def forward(self, x: Tensor, ctx: StepContext) -> Tensor:
        batch, seq_len, _ = x.shape
        if ctx.fused:
            return self._fused(x, ctx)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        seqlens = block_table = query_start = None
        if ctx.cache_step is not None:
            k, v = ctx.cache_step.write(self.layer_idx, k, v)
            step = ctx.cache_step
            seqlens, block_table, query_start = step.seqlens, step.block_table, step.query_start
        out = attention(q, k, v, seqlens, block_table=block_table, backend=ctx.backend, causal=True,
                        block_size=ctx.block_size, query_start=query_start)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))

    def _fused(self, x: Tensor, ctx: StepContext) -> Tensor:
        """The same computation in two kernel calls: the unfused path costs ~30 small ops per layer."""
        step = ctx.cache_step
        k_pool, v_pool = step.cache.k[self.layer_idx], step.cache.v[self.layer_idx]
        qkv = self.wqkv(x)
        q = torch.ops.minillm.rope_cache_write(qkv.view(-1, qkv.shape[-1]), ctx.cos, ctx.sin, k_pool, v_pool,
                                               step.slot_index, self.num_heads, self.num_kv_heads)
        out = paged_cpu.paged_attention(q, k_pool, v_pool, step.block_table, step.seqlens, step.query_start,
                                        self.head_dim ** -0.5)
        return self.wo(out.view(*x.shape[:-1], -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(x W1^T) * x W3^T), with W1 (gate) and W3 (up) stacked in one `w13` matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dtype = config.torch_dtype
        self.w13 = nn.Linear(config.dim_model, 2 * config.hidden_dim, bias=False, dtype=dtype)
        self.w2 = nn.Linear(config.hidden_dim, config.dim_model, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w13(x)
        if not getattr(self.w13, "applies_swiglu", False):  # fused kernels (kernels.ggml) apply it themselves
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.w2(h)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        dtype = config.torch_dtype
        self.attention_norm = RMSNorm(config.dim_model, config.norm_eps, dtype=dtype)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.dim_model, config.norm_eps, dtype=dtype)
        self.feed_forward = FeedForward(config)
        self.one_op = False  # set by loading/quantized.py when every matmul is on GGUF blocks

    def forward(self, x: Tensor, ctx: StepContext) -> Tensor:
        if ctx.fused and self.one_op:  # the same computation as below in one C++ op, for the Python overhead
            return ggml.decoder_layer(self, x, ctx)
        h = x + self.attention(self.attention_norm(x), ctx)
        return h + self.feed_forward(self.ffn_norm(h))


class MiniLLM(nn.Module):
    """A decoder-only Llama-family language model; `model(input_ids)` returns float32 logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        dtype = config.torch_dtype
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim_model, dtype=dtype)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.dim_model, config.norm_eps, dtype=dtype)
        self.output = nn.Linear(config.dim_model, config.vocab_size, bias=False, dtype=dtype)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations and the KV cache (weights may be quantized)."""
        return self.norm.weight.dtype

    def forward(
        self,
        input_ids: Tensor,
        kv_cache: KVCache | None = None,
        use_flash_attention: bool = True,
        flash_block_size: int = 128,
        attention_backend: str | None = None,
        input_lengths: Sequence[int] | None = None,
        last_token_only: bool = False,
    ) -> Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with `last_token_only`) in float32.

        input_ids: [B, T] token ids ([T] is taken as one row).
        kv_cache: when given, each row's new tokens are written at that row's current length,
            get RoPE positions from it, and attend to everything the row has cached.
        use_flash_attention: our FlashAttention-2 (tiles of `flash_block_size`) or, when False,
            standard attention. `attention_backend` ("flash", "standard", "sdpa") overrides it.
        input_lengths: with a cache, how many of each row's T tokens are real; real tokens are
            right-aligned (left padding), so rows of different prompt lengths prefill together.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {list(input_ids.shape)}")
        backend = attention_backend or ("flash" if use_flash_attention else "standard")
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
        batch, seq_len = input_ids.shape
        if kv_cache is None:
            if input_lengths is not None:
                raise ValueError("input_lengths (padded rows) needs a kv_cache to hold each row's own length")
            if seq_len > self.config.max_seq_len:
                raise ValueError(f"input of {seq_len} tokens exceeds max_seq_len {self.config.max_seq_len}")
            return self.forward_step(input_ids, None, backend, flash_block_size, last_token_only)
        if kv_cache.batch_size != batch:
            raise ValueError(f"input batch {batch} does not match the cache's batch size {kv_cache.batch_size}")
        step = kv_cache.plan_write(seq_len, input_lengths)
        logits = self.forward_step(input_ids, step, backend, flash_block_size, last_token_only)
        kv_cache.commit(step)
        return logits

    def _fusable(self, step: CacheStep | None, backend: str) -> bool:
        return (backend == "paged" and getattr(step, "query_start", None) is not None and self.device.type == "cpu"
                and self.dtype == torch.float32 and kernels.ops_available() and paged_cpu.available())

    def forward_step(self, input_ids: Tensor, cache_step: CacheStep | None, backend: str, block_size: int = 128,
                     last_token_only: bool = False) -> Tensor:
        """The forward pass proper, against any cache step (contiguous or paged) or none (plain causal).

        With a packed step (`cache_step.query_start`: the engine's), input_ids are [1, N] and
        `last_token_only` gives each sequence's last token: logits [B, 1, vocab].
        """
        if cache_step is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        else:
            positions = cache_step.positions.to(input_ids.device)
        cos, sin = self.rope.tables(positions)
        ctx = StepContext(cos, sin, backend, block_size, cache_step, fused=self._fusable(cache_step, backend))
        h = self.tok_embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, ctx)
        if last_token_only:
            packed = cache_step is not None and cache_step.query_start is not None
            h = h[0, cache_step.query_start[1:] - 1].unsqueeze(1) if packed else h[:, -1:]
        return self.output(self.norm(h)).float()
