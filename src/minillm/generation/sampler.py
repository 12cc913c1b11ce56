"""Turning last-position logits into next tokens: penalties, temperature, top-k, top-p, seeded draws.

The order of the steps is HF transformers': repetition penalty, temperature, top-k, top-p.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty on tokens already present (`seen` is a [B, V] bool mask):
    positive logits are divided by `penalty`, negative ones multiplied by it."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: Tensor, top_k: int) -> Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept)."""
    if top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose mass reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= top_p  # the most likely token has 0 before it, so it always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> Tensor:
    """Next token per row from float32 logits [B, V]; temperature 0 is greedy.

    `generators` gives each row its own random stream (a per-request seed), so a row draws the
    same tokens whatever else is in the batch.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None:
        logits = filter_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    if generators is None or all(g is None for g in generators):
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)])
