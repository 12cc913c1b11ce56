"""The MiniLLM decoder: a Llama-family transformer (RMSNorm, RoPE, GQA, SwiGLU, optional qkv bias).

Module names follow gpt-fast/Llama: tok_embeddings, layers[i].{attention_norm, attention.{wqkv, wo},
ffn_norm, feed_forward.{w13, w2}}, norm, output (w13: w1 and w3, gate and up, stacked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import LayerAttention
from ..cache.paged_cache import PagedStep
from ..compat.rows import forward_rows
from ..config import ModelConfig
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rotary


@dataclass
class StepContext:
    """What every layer needs for one forward call, computed once per call."""

    cos: Tensor  # [N, head_dim / 2]
    sin: Tensor
    step: PagedStep
    local_cos: Tensor | None = None  # Gemma 3's sliding-window layers: their own RoPE base
    local_sin: Tensor | None = None


class Attention(nn.Module):
    """Token-major throughout: q, k, v are [N, heads, head_dim] from the projection through RoPE, the cache
    write and the attention backend (the step's, chosen once by the cache's owner)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        windowed = config.sliding_window and (config.sliding_layers is None or config.sliding_layers[layer_idx])
        self.settings = LayerAttention(config.sliding_window if windowed else 0, config.attention_scale,
                                       config.attention_softcap or 0.0)
        self.local_rope = bool(windowed and config.local_rope_theta)
        qkv_dim = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        dtype = config.torch_dtype
        self.wqkv = nn.Linear(config.dim_model, qkv_dim, bias=config.qkv_bias, dtype=dtype)
        self.wo = nn.Linear(config.num_heads * config.head_dim, config.dim_model, bias=False, dtype=dtype)
        # Qwen3: each head's query and key RMS-normalised (one weight per head dim) before RoPE
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps, dtype=dtype) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps, dtype=dtype) if config.qk_norm else None

    def forward(self, x: Tensor, ctx: StepContext) -> Tensor:
        step, layer = ctx.step, self.layer_idx
        k_pool, v_pool = step.cache.k[layer], step.cache.v[layer]
        qkv = self.wqkv(x)
        cos, sin = (ctx.local_cos, ctx.local_sin) if self.local_rope else (ctx.cos, ctx.sin)
        if step.attention.rope_write is not None:  # the backend's one kernel for what the else-branch does
            q = step.attention.rope_write(qkv, cos, sin, k_pool, v_pool, step.slot_index, self.num_heads,
                                          self.num_kv_heads, self.q_norm, self.k_norm)
        else:
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q, k = q.view(-1, self.num_heads, self.head_dim), k.view(-1, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            step.write(layer, k, v.view(-1, self.num_kv_heads, self.head_dim))
        out = step.attention.attend(q, k_pool, v_pool, step, self.settings)
        return self.wo(out.reshape(len(x), -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(x W1^T) * x W3^T), with W1 (gate) and W3 (up) stacked in one `w13` matmul
    (GeGLU, Gemma's: gelu with the tanh approximation instead of silu)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dtype = config.torch_dtype
        self.gelu = config.activation == "gelu_tanh"
        self.w13 = nn.Linear(config.dim_model, 2 * config.hidden_dim, bias=False, dtype=dtype)
        self.w2 = nn.Linear(config.hidden_dim, config.dim_model, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2((F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        dtype = config.torch_dtype
        self.attention_norm = RMSNorm(config.dim_model, config.norm_eps, dtype=dtype)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.dim_model, config.norm_eps, dtype=dtype)
        self.feed_forward = FeedForward(config)
        # Gemma 2's sandwich: the attention and MLP outputs normalised too, before the residual add
        self.post_attention_norm = RMSNorm(config.dim_model, config.norm_eps, dtype=dtype) if config.sandwich_norms else None
        self.post_ffn_norm = RMSNorm(config.dim_model, config.norm_eps, dtype=dtype) if config.sandwich_norms else None

    def forward(self, x: Tensor, ctx: StepContext) -> Tensor:
        a = self.attention(self.attention_norm(x), ctx)
        h = x + (a if self.post_attention_norm is None else self.post_attention_norm(a))
        f = self.feed_forward(self.ffn_norm(h))
        return h + (f if self.post_ffn_norm is None else self.post_ffn_norm(f))


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
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        self.local_rope = (RotaryEmbedding(config.head_dim, config.max_seq_len, config.local_rope_theta)
                           if config.local_rope_theta else None)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations and the KV cache (weights may be quantized)."""
        return self.norm.weight.dtype

    def forward(self, input_ids: Tensor, step: PagedStep | None = None, *, last_token_only: bool = False,
                **first_release: Any) -> Tensor:
        """Float32 logits of one packed step planned on a PagedKVCache: input_ids [N] -> [N, vocab], or with
        `last_token_only` each sequence's last token's, [B, vocab] (the step's `logit_rows` when it names more). Without a step, the first release's
        [B, T] rows call (`kv_cache=`, `use_flash_attention=`, `flash_block_size=`, ...: compat/rows.py)."""
        if step is None:
            return forward_rows(self, input_ids, last_token_only=last_token_only, **first_release)
        ctx = self.step_context(step)
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, ctx)
        return self.logits(h, step, last_token_only)

    def reserve_positions(self, count: int) -> None:
        """RoPE tables made now for positions [0, count): a compiled step reads them as they were when traced."""
        for rope in (self.rope, self.local_rope):
            if rope is not None:
                rope.reserve(count)

    def step_context(self, step: PagedStep) -> StepContext:
        cos, sin = self.rope.tables(step.positions, step.token_lengths)
        local = self.local_rope.tables(step.positions) if self.local_rope else (None, None)
        return StepContext(cos, sin, step, *local)

    def embed(self, input_ids: Tensor) -> Tensor:
        h = self.tok_embeddings(input_ids)
        if self.config.embedding_multiplier != 1.0:  # Gemma: sqrt(dim), rounded to the activations' dtype
            h = h * torch.tensor(self.config.embedding_multiplier, dtype=h.dtype)
        return h

    def logits(self, h: Tensor, step: PagedStep, last_token_only: bool) -> Tensor:
        # a decode step's rows are already each sequence's last (the gather is ~3 small ops); a compiled step
        # keeps it, so that one graph serves every step. Speculative decoding asks for more rows per sequence
        # (PagedStep.logit_rows: a draft's every row)
        if last_token_only and (torch.compiler.is_compiling() or h.shape[0] > len(step.counts)):
            h = h[step.query_start[1:] - 1 if step.logit_rows is None else step.logit_rows]
        logits = self.output(self.norm(h)).float()
        cap = self.config.final_softcap
        return cap * torch.tanh(logits / cap) if cap else logits
