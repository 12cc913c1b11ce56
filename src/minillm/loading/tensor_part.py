"""The part of a checkpoint tensor that one tensor-parallel rank reads (which part: parallel/shard.py): some of
its rows, a range of its columns (input features), and zero rows to pad a vocabulary that does not divide.
It is cut from the file's rows before anything is dequantized or repacked, so a rank reads only its rows
and, of each row, only the blocks that hold its columns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TensorPart:
    rows: tuple[tuple[int, int], ...] | None = None  # [start, stop) ranges of output rows, kept in order; None: all
    cols: tuple[int, int] | None = None  # [start, stop) of the input features; None: all
    pad_to: int | None = None  # zero rows appended up to this many

    @property
    def row_span(self) -> tuple[int, int] | None:
        """The rows from the first kept to the last (the file's pages a read touches)."""
        return None if self.rows is None else (self.rows[0][0], self.rows[-1][1])


def select(data: np.ndarray, part: TensorPart, per: int = 1, size: int = 1) -> tuple[np.ndarray, int]:
    """The part's rows of `data` ([rows, row], or a vector) and, of each row, the blocks that cover its columns
    (blocks of `per` values in `size` units of `data`: a quantized row's bytes; 1, 1 for floats); also how many
    values of the first block lie before the columns (0 when they start on a block). A single row range of a
    memory map stays a view of it."""
    if part.rows is not None:
        pieces = [data[start:stop] for start, stop in part.rows]
        data = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    if part.cols is None or data.ndim < 2:
        return data, 0
    start, stop = part.cols
    first, last = start // per, -(-stop // per)
    return data[:, first * size:last * size], start - first * per


def padded(data: np.ndarray | torch.Tensor, part: TensorPart | None) -> np.ndarray | torch.Tensor:
    """`data` (a float tensor, or quantized rows) with the zero rows its part asks for (a zero block of every
    GGML type decodes to zeros)."""
    if part is None or part.pad_to is None or len(data) >= part.pad_to:
        return data
    if isinstance(data, torch.Tensor):
        return torch.cat([data, data.new_zeros(part.pad_to - len(data), *data.shape[1:])])
    return np.concatenate([data, np.zeros((part.pad_to - len(data), *data.shape[1:]), dtype=data.dtype)])
