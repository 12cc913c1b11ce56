"""Paged KV cache: one pool of fixed-size blocks per layer, shared by every sequence.

Pools are [num_blocks, block_size, Hkv, D] (token-major pages, as vLLM's); a sequence's keys are found through its block table
(which blocks, in order). The block manager (engine/block_manager.py) decides who owns what; this
file only holds the tensors and writes a step's new K/V into the right slots.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ..attention import AttentionBackend
from ..config import ModelConfig, resolve_dtype
from ..runtime import huge_page_buffers


def bytes_per_block(config: ModelConfig, block_size: int, dtype: str | torch.dtype) -> int:
    element = torch.empty((), dtype=resolve_dtype(dtype)).element_size()
    return 2 * config.num_layers * config.num_kv_heads * block_size * config.head_dim * element


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu") -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.dtype = resolve_dtype(config.dtype if dtype is None else dtype)
        self.device = torch.device(device)
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        # Zero-filled: masked slots still meet a 0-weight multiply, and 0 * NaN is NaN. On the CPU in one
        # mapping on 2 MB pages where the OS grants them (runtime.huge_page_buffers: fewer TLB misses), but for
        # each pool's first 2 MB: the first blocks taken would otherwise fault in 2 MB per pool (112 MB for a
        # 28-layer model's first token), where a short context needs a few KB per pool.
        if self.device.type == "cpu":
            sizes = [math.prod(shape) * self.dtype.itemsize] * (2 * config.num_layers)
            pools = [buffer.view(self.dtype).view(shape) for buffer in huge_page_buffers(sizes, small_head=2 << 20)]
        else:
            pools = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2 * config.num_layers)]
        self.k, self.v = pools[:config.num_layers], pools[config.num_layers:]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def plan(self, block_tables: list[list[int]], starts: list[int], counts: list[int],
             attention: AttentionBackend, totals: list[int] | None = None, prompt_gemm: bool = False,
             logit_counts: list[int] | None = None) -> PagedStep:
        """A packed step: sequence b feeds counts[b] tokens from position starts[b]; the input is
        [N = sum(counts)] token ids, the sequences' tokens one after another (no padding). totals[b]:
        sequence b's whole length so far (a prompt's full length while it is prefilled in chunks), for
        the RoPE scalings whose frequencies depend on it (longrope, dynamic); default: starts + counts.
        prompt_gemm: the prompt chunks' rows may run as a bf16 GEMM (EngineConfig.fast_prefill).
        logit_counts[b]: how many of sequence b's last rows need logits (a draft's verification scores every
        row fed after the sequence's last token); default: its last row only."""
        size = self.block_size
        seqlens = [s + n for s, n in zip(starts, counts)]
        pages = (max(seqlens) + size - 1) // size
        table = [(t[:pages] + [0] * pages)[:pages] for t in block_tables]
        positions = [p for s, n in zip(starts, counts) for p in range(s, s + n)]
        slots = [t[p // size] * size + p % size for t, s, n in zip(block_tables, starts, counts) for p in range(s, s + n)]
        query_start = list(itertools.accumulate(counts, initial=0))
        decode = next((b for b, n in enumerate(counts) if n > 1), len(counts))  # the scheduler puts decode rows first
        lengths = [t for t, n in zip(totals or seqlens, counts) for _ in range(n)]
        logit_rows = [end - m + j for end, m in zip(query_start[1:], logit_counts or [1] * len(counts)) for j in range(m)]
        parts = (positions, seqlens, [i for row in table for i in row], query_start, slots, lengths, logit_rows)
        # one tensor (one host-to-device copy), seen as seven: each tensor made from a list has a fixed cost
        flat = torch.tensor([i for part in parts for i in part], dtype=torch.long, device=self.device)
        positions_t, seqlens_t, table_t, query_start_t, slots_t, lengths_t, logit_rows_t = flat.split(
            [len(p) for p in parts])
        return PagedStep(self, attention, positions_t, seqlens_t, table_t.view(len(table), pages), query_start_t,
                         slots_t, query_start[decode] if prompt_gemm else -1, counts, seqlens, lengths_t, logit_rows_t)


@dataclass
class PagedStep:
    """One forward call over the paged pools: where its tokens go, what they attend to, and how
    (`attention`, chosen once by whoever owns the cache)."""

    cache: PagedKVCache
    attention: AttentionBackend
    positions: Tensor  # [N]
    seqlens: Tensor  # [B]; tensors, so a compiled step does not specialise on lengths
    block_table: Tensor  # [B, pages]
    query_start: Tensor  # [B + 1]
    slot_index: Tensor  # [N]: each token's slot in the pool seen as [num_blocks * block_size, Hkv, D]
    # rows from this one on (the prompt chunks: the scheduler puts decode rows first) may run as one bf16 GEMM
    # on the GGUF blocks dequantized for the call (fast_prefill); -1: every row on the exact int8 kernel
    gemm_from: int
    counts: list[int]  # the same lengths on the host, for the row layout of the reference backends
    host_seqlens: list[int]
    token_lengths: Tensor  # [N]: each token's sequence length so far (longrope / dynamic RoPE pick by it)
    logit_rows: Tensor | None = None  # the packed rows whose logits a last_token_only forward returns; None: each
    # sequence's last (a CUDA graph's decode step, where that is every row)

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Store one layer's new keys and values [N, Hkv, D] in their slots."""
        # index_copy_ on flat slots: one kernel, and (unlike an index_put) nothing for a compiled
        # step to specialise when a single token is written
        for pool, new in ((self.cache.k[layer], k), (self.cache.v[layer], v)):  # (rounded to a 16-bit pool's dtype)
            pool.view(-1, *pool.shape[2:]).index_copy_(0, self.slot_index, new.to(pool.dtype))

    @cached_property
    def rows(self) -> RowLayout:
        return RowLayout(self.counts, self.host_seqlens, self.block_table.shape[1], self.cache.block_size,
                         self.positions.device)


class RowLayout:
    """A packed step seen as right-aligned rows [B, H, width, D], for the backends that take rows."""

    def __init__(self, counts: list[int], seqlens: list[int], pages: int, page: int, device: torch.device) -> None:
        self.batch, self.width, self.seqlens = len(counts), max(counts), seqlens
        self.kv_len = max(seqlens)
        self.pages = min(pages, -(-self.kv_len // page))
        # each packed token's index in the rows seen flat [B * width]
        self.index = torch.tensor([b * self.width + self.width - n + j for b, n in enumerate(counts) for j in range(n)],
                                  dtype=torch.long, device=device)

    def to_rows(self, q: Tensor) -> Tensor:
        """[N, H, D] -> [B, H, width, D] (padding zeros)."""
        rows = q.new_zeros(self.batch * self.width, *q.shape[1:]).index_copy_(0, self.index, q)
        return rows.view(self.batch, self.width, *q.shape[1:]).transpose(1, 2)

    def to_packed(self, rows: Tensor) -> Tensor:
        """[B, H, width, D] -> [N, H, D]."""
        return rows.transpose(1, 2).reshape(self.batch * self.width, *rows.shape[1:2], rows.shape[3])[self.index]
