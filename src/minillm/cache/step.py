"""What the model needs from a KV cache for one forward call (contiguous or paged)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class CacheStep(Protocol):
    """One planned forward call's view of a cache.

    positions:   [B, T] RoPE position of every input token
    seqlens:     keys per row once the step's tokens are written (None: every row has them all)
    block_table: None for a contiguous cache; for a paged one, [B, pages] ids into the block pool
    query_start: None for [B, T] rows; for a packed step (the input is [1, N], sequence b's tokens
                 at query_start[b]:query_start[b + 1]), [B + 1] offsets
    write():     store a layer's new K/V [B, Hkv, T, D] and return what attention reads
    """

    positions: Tensor
    seqlens: Tensor | list[int] | None
    block_table: Tensor | None
    query_start: Tensor | None

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...


def left_padded_layout(starts: list[int], counts: list[int], width: int) -> tuple[Tensor, list[int], list[int], list[int]]:
    """Where the real tokens of a left-padded [B, width] input sit.

    Row b feeds counts[b] tokens, right-aligned, the first at position starts[b]. Returns the
    [B, width] RoPE positions (padding clamped to 0) and, one entry per real token, its row, its
    column in the input and its position.
    """
    pads = [width - n for n in counts]
    offsets = torch.tensor([s - p for s, p in zip(starts, pads)])
    positions = (offsets[:, None] + torch.arange(width)).clamp_(min=0)
    rows = [b for b, n in enumerate(counts) for _ in range(n)]
    cols = [t for p in pads for t in range(p, width)]
    token_pos = [starts[b] + c - pads[b] for b, c in zip(rows, cols)]
    return positions, rows, cols, token_pos
