"""Decode steps on a GPU replayed from CUDA graphs (as nano-vllm does): one graph per batch size of a
ladder, captured at start-up over static input buffers; a decode step of B sequences fills the buffers
of the smallest captured size >= B (the rows past B write to a scratch block and attend to nothing)
and replays it. A decode step of a small model is mostly kernel launches; replay issues them all at once.

Only steps where every sequence feeds one token (the scheduler's common case once prompts are in)
take a graph; mixed steps and larger batches run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..attention import AttentionBackend
from ..cache.paged_cache import PagedKVCache, PagedStep


def batch_ladder(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch (nano-vllm's ladder)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch + 1, 16))
    return sorted(set(sizes + [max_batch]))


class StaticDecodeInputs:
    """The inputs of decode steps of up to `max_batch` sequences at fixed addresses, as a CUDA graph reads
    them: one host buffer (pinned on a GPU) and one device buffer, so a step costs one copy."""

    def __init__(self, cache: PagedKVCache, max_batch: int, max_seq_len: int, scratch_block: int) -> None:
        self.cache, self.max_batch, self.max_seq_len = cache, max_batch, max_seq_len
        self.pages = -(-max_seq_len // cache.block_size)
        self.scratch_slot = scratch_block * cache.block_size
        n = max_batch
        sizes = {"ids": n, "positions": n, "seqlens": n, "slots": n, "query_start": n + 1, "table": n * self.pages}
        self.offsets, at = {}, 0
        for name, length in sizes.items():
            self.offsets[name] = (at, length)
            at += length
        self.host = torch.zeros(at, dtype=torch.long, pin_memory=cache.device.type == "cuda")
        self.device = torch.zeros(at, dtype=torch.long, device=cache.device)

    def _segment(self, buffer: Tensor, name: str) -> Tensor:
        at, length = self.offsets[name]
        return buffer[at:at + length]

    def step(self, batch: int, attention: AttentionBackend) -> tuple[Tensor, PagedStep]:
        """Token ids and the step of the first `batch` rows: views of the device buffer, with host sizes
        at their largest (the attention kernels read the true lengths from the device)."""
        seg = lambda name: self._segment(self.device, name)  # noqa: E731
        table = seg("table").view(self.max_batch, self.pages)[:batch]
        seqlens = seg("seqlens")[:batch]  # a decode token's sequence length is its row's
        step = PagedStep(self.cache, attention, seg("positions")[:batch], seqlens, table, seg("query_start")[:batch + 1],
                         seg("slots")[:batch], -1, [1] * batch, [self.max_seq_len] * batch, seqlens)
        return seg("ids")[:batch], step

    def load(self, ids: list[int], starts: list[int], tables: list[list[int]], batch: int) -> None:
        """A decode step (sequence b feeds ids[b] at position starts[b]) into the buffers, padded to
        `batch` rows: padding rows write their K/V to the scratch block and attend to no key."""
        size, real = self.cache.block_size, len(ids)
        pad = batch - real
        seg = lambda name: self._segment(self.host, name)  # noqa: E731
        seg("ids")[:batch] = torch.tensor(ids + [0] * pad)
        seg("positions")[:batch] = torch.tensor(starts + [0] * pad)
        seg("seqlens")[:batch] = torch.tensor([s + 1 for s in starts] + [0] * pad)
        seg("slots")[:batch] = torch.tensor([t[s // size] * size + s % size for t, s in zip(tables, starts)]
                                            + [self.scratch_slot] * pad)
        seg("query_start")[:batch + 1] = torch.arange(batch + 1)
        width = max(len(t) for t in tables)
        seg("table").view(self.max_batch, self.pages)[:real, :width] = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        end = self.offsets["table"][0] + (real - 1) * self.pages + width  # the table's unused columns stay behind
        self.device[:end].copy_(self.host[:end], non_blocking=True)


class DecodeGraphs:
    def __init__(self, forward: Callable[..., Tensor], cache: PagedKVCache, attention: AttentionBackend,
                 max_batch: int, max_seq_len: int, scratch_block: int) -> None:
        self.inputs = StaticDecodeInputs(cache, max_batch, max_seq_len, scratch_block)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, Tensor] = {}
        pool = None
        scratch = [[scratch_block]]
        for batch in reversed(batch_ladder(max_batch)):  # largest first: the smaller ones reuse its memory
            self.inputs.load([0], [0], scratch, batch)
            ids, step = self.inputs.step(batch, attention)
            forward(ids, step, last_token_only=True)  # warm-up (Triton compiles, cuBLAS picks) outside capture
            torch.cuda.synchronize(cache.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.outputs[batch] = forward(ids, step, last_token_only=True)
            pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize(cache.device)

    def fits(self, batch: int, max_len: int) -> bool:
        return batch <= self.max_batch and max_len <= self.max_seq_len

    def run(self, ids: list[int], starts: list[int], tables: list[list[int]]) -> Tensor:
        """Logits [B, vocab] of a decode step: sequence b feeds ids[b] at position starts[b]."""
        batch = min(b for b in self.graphs if b >= len(ids))
        self.inputs.load(ids, starts, tables, batch)
        self.graphs[batch].replay()
        return self.outputs[batch][:len(ids)]
