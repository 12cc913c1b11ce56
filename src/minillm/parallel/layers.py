"""The collectives a tensor-parallel rank wraps around its shard's modules (parallel/shard.py), over the default
torch.distributed group (gloo on the CPU, NCCL on GPUs). Per step: one all-reduce for the embedding, two per
layer (after attention, after the MLP), one gather of the logits on rank 0."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class AllReduced(nn.Module):
    """A row-parallel linear layer: this rank's input features times its columns of the weight, summed over
    the ranks (no bias: o and down have none)."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        dist.all_reduce(y)
        return y


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding table (token ids start..start + count): other tokens' rows are zero
    here and come from their own rank in the all-reduce, exactly (x + 0 = x)."""

    def __init__(self, embedding: nn.Module, start: int, count: int) -> None:
        super().__init__()
        self.embedding, self.start, self.count = embedding, start, count

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.count)
        h = self.embedding(torch.where(inside, local, 0)).masked_fill(~inside.unsqueeze(-1), 0)
        dist.all_reduce(h)
        return h


class GatheredLogits(nn.Module):
    """The LM head on this rank's vocabulary rows; rank 0 gathers every rank's logits in vocabulary order (the
    padding of a vocabulary that does not divide cut off) and samples; the other ranks return none."""

    def __init__(self, head: nn.Module, vocab_size: int) -> None:
        super().__init__()
        self.head, self.vocab_size = head, vocab_size

    def forward(self, h: Tensor) -> Tensor:
        local = self.head(h).contiguous()
        if dist.get_rank() != 0:
            dist.gather(local, dst=0)
            return local[..., :0]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.gather(local, parts, dst=0)
        return torch.cat(parts, dim=-1)[..., :self.vocab_size]
