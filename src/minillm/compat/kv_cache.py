"""`KVCache`: the first release's per-row cache, as a view of the paged pools.

Row b owns a fixed run of pages, so its keys are contiguous and `k[layer]` can be shown as
[B, Hkv, S, D]. A [B, T] step (real tokens right-aligned, left padding) is planned as one packed step
of the paged cache with the real tokens only (rows.py runs it through the model).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..attention import select_attention
from ..cache.paged_cache import PagedKVCache, PagedStep
from ..config import ModelConfig

MAX_PAGE = 256  # tokens per page of a row; the reference backends gather whole pages


class CacheOverflowError(RuntimeError):
    """Raised before any write that would go past a row's capacity."""


@dataclass
class RowsStep:
    """A planned [B, T] forward call: the packed step of the rows that feed tokens, and where those
    tokens sit in the input seen flat [B * T]."""

    step: PagedStep | None  # None when no row feeds a token
    rows: list[int]
    token_index: Tensor
    new_lens: list[int]


class KVCache:
    """Per-layer keys and values with a length per row; `k[layer]` / `v[layer]` are [B, Hkv, S, D] views.

    Row lengths live on the host (the host decides what it feeds), so planning a step needs no
    device synchronisation. Slots at or past a row's length are never read by attention.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_seq_len: int | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        capacity = config.max_seq_len if max_seq_len is None else max_seq_len
        if not 0 < capacity <= config.max_seq_len:
            raise ValueError(f"max_seq_len must be in [1, {config.max_seq_len}] (the model's context), got {capacity}")
        self.batch_size, self.max_seq_len = batch_size, capacity
        page = min(capacity, MAX_PAGE)
        self.pages_per_row = -(-capacity // page)
        self.paged = PagedKVCache(config, batch_size * self.pages_per_row, page, dtype,
                                  "cpu" if device is None else device)
        self.dtype, self.device = self.paged.dtype, self.paged.device
        self._lens = [0] * batch_size

    def _rows_view(self, pool: Tensor) -> Tensor:
        _, page, heads, dim = pool.shape
        return pool.view(self.batch_size, self.pages_per_row * page, heads, dim).transpose(1, 2)[:, :, :self.max_seq_len]

    @property
    def k(self) -> list[Tensor]:
        return [self._rows_view(pool) for pool in self.paged.k]

    @property
    def v(self) -> list[Tensor]:
        return [self._rows_view(pool) for pool in self.paged.v]

    @property
    def seq_lens(self) -> list[int]:
        return list(self._lens)

    def get_seq_len(self, batch_idx: int) -> int:
        self._check_row(batch_idx)
        return self._lens[batch_idx]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def reset(self, batch_indices: int | Iterable[int] | None = None) -> None:
        """Forget the cached tokens of the given rows (all rows when None); other rows are untouched."""
        rows = range(self.batch_size) if batch_indices is None else (
            [batch_indices] if isinstance(batch_indices, int) else list(batch_indices))
        for row in rows:
            self._check_row(row)
            self._lens[row] = 0

    def plan_write(self, num_tokens: int, input_lengths: Sequence[int] | None, attention_backend: str,
                   tile_size: int = 128) -> RowsStep:
        """Check capacity and plan a [B, num_tokens] step whose row b feeds its last input_lengths[b] tokens."""
        lengths = [num_tokens] * self.batch_size if input_lengths is None else [int(n) for n in input_lengths]
        if len(lengths) != self.batch_size:
            raise ValueError(f"input_lengths has {len(lengths)} entries for a cache of batch size {self.batch_size}")
        for row, (cached, new) in enumerate(zip(self._lens, lengths)):
            if not 0 <= new <= num_tokens:
                raise ValueError(f"input_lengths[{row}] = {new} is outside [0, {num_tokens}]")
            if cached + new > self.max_seq_len:
                raise CacheOverflowError(
                    f"KV cache full: row {row} holds {cached} tokens and cannot take {new} more "
                    f"(capacity {self.max_seq_len})")
        attention = select_attention(attention_backend, self.device, self.dtype, tile_size)
        rows = [b for b, n in enumerate(lengths) if n]
        index = torch.tensor([b * num_tokens + t for b in rows for t in range(num_tokens - lengths[b], num_tokens)],
                             dtype=torch.long, device=self.device)
        step = None
        if rows:
            per_row = self.pages_per_row
            tables = [list(range(b * per_row, (b + 1) * per_row)) for b in rows]
            step = self.paged.plan(tables, [self._lens[b] for b in rows], [lengths[b] for b in rows], attention)
        return RowsStep(step, rows, index, [cached + new for cached, new in zip(self._lens, lengths)])

    def commit(self, plan: RowsStep) -> None:
        """Advance the row lengths once every layer has written its step."""
        self._lens = list(plan.new_lens)

    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.batch_size:
            raise IndexError(f"row {row} is outside the cache's batch of {self.batch_size}")
