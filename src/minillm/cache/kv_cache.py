"""Contiguous, preallocated key/value cache with true per-row lengths."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ModelConfig, resolve_dtype
from .step import left_padded_layout


class CacheOverflowError(RuntimeError):
    """Raised before any write that would go past a row's capacity."""


@dataclass
class CacheWrite:
    """Where one forward step's new tokens go, planned on the host before the step runs.

    Inputs are [B, T] with each row's `n_b` real tokens right-aligned (left padding), so token t of
    row b is real when t >= T - n_b and lands at cache slot lens[b] + t - (T - n_b).
    Implements the `CacheStep` protocol the model runs against.
    """

    cache: "KVCache"
    positions: Tensor  # [B, T] RoPE positions (padding clamped to 0)
    new_lens: list[int]  # row lengths after the step
    uniform_start: int | None  # all rows same length and no padding: a slice write at this slot
    batch_index: Tensor | None  # otherwise, scatter: (row, slot) <- token, one entry per real token
    slot_index: Tensor | None
    token_index: Tensor | None
    block_table = None  # contiguous rows, not pages
    query_start = None  # [B, T] rows, not packed

    @property
    def kv_len(self) -> int:
        """Cache positions attention must read: the longest row after the step."""
        return max(self.new_lens)

    @property
    def seqlens(self) -> list[int] | None:
        """Per-row key lengths for attention, or None when all rows are kv_len long."""
        return None if len(set(self.new_lens)) == 1 else self.new_lens

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store one layer's new k, v [B, Hkv, T, D]; return the cache's K, V up to kv_len."""
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        if self.uniform_start is not None:
            end = self.uniform_start + k.shape[2]
            k_cache[:, :, self.uniform_start:end] = k
            v_cache[:, :, self.uniform_start:end] = v
        else:
            k_cache[self.batch_index, :, self.slot_index] = k[self.batch_index, :, self.token_index]
            v_cache[self.batch_index, :, self.slot_index] = v[self.batch_index, :, self.token_index]
        return k_cache[:, :, : self.kv_len], v_cache[:, :, : self.kv_len]


class KVCache:
    """Per-layer K and V tensors [B, Hkv, S, D], preallocated, with a length per row.

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
        self.batch_size = batch_size
        self.max_seq_len = capacity
        self.dtype = resolve_dtype(config.dtype if dtype is None else dtype)
        self.device = torch.device("cpu" if device is None else device)
        shape = (batch_size, config.num_kv_heads, capacity, config.head_dim)
        # Zero-filled, not empty: masked-out slots still meet a 0-weight multiply, and 0 * NaN is NaN.
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(config.num_layers)]
        self._lens = [0] * batch_size

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

    def plan_write(self, num_tokens: int, input_lengths: Sequence[int] | None = None) -> CacheWrite:
        """Check capacity and compute slots and positions for a [B, num_tokens] step."""
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
        new_lens = [cached + new for cached, new in zip(self._lens, lengths)]
        positions, rows, cols, slots = left_padded_layout(self._lens, lengths, num_tokens)
        positions = positions.to(self.device)
        if len(set(self._lens)) == 1 and all(n == num_tokens for n in lengths):
            return CacheWrite(self, positions, new_lens, self._lens[0], None, None, None)
        as_index = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        return CacheWrite(self, positions, new_lens, None, as_index(rows), as_index(slots), as_index(cols))

    def commit(self, plan: CacheWrite) -> None:
        """Advance the row lengths once every layer has written its step."""
        self._lens = list(plan.new_lens)

    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.batch_size:
            raise IndexError(f"row {row} is outside the cache's batch of {self.batch_size}")
