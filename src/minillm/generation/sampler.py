"""Turning last-position logits into next tokens: penalties, temperature, top-k, top-p, seeded draws,
and the log-probabilities a request asked for. Everything the engine samples goes through
`sample_requests`; `sample` is the per-row core.

The order of the steps is HF transformers': repetition penalty (then OpenAI's presence and
frequency penalties), temperature, top-k, top-p. Every parameter is either one value for the whole
batch or one per row (a request's own SamplingParams).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from .. import kernels

T = TypeVar("T")


def per_row(value: T | Sequence[T], rows: int, name: str = "value") -> list[T]:
    """One value for every row, or a per-row sequence checked for length."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != rows:
            raise ValueError(f"{name} has {len(value)} entries for {rows} rows")
        return list(value)
    return [value] * rows


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float | Tensor) -> Tensor:
    """CTRL-style penalty on tokens already present (`seen` is a [B, V] bool mask): positive logits
    are divided by `penalty`, negative ones multiplied by it. `penalty` may be [B, 1]."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: Tensor, top_k: int | Tensor) -> Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept); `top_k` may be [B]."""
    vocab = logits.shape[-1]
    if isinstance(top_k, int):
        if top_k >= vocab:
            return logits
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    else:
        ranked = torch.sort(logits, dim=-1, descending=True).values
        kth = ranked.gather(-1, (top_k.clamp(1, vocab) - 1).view(-1, 1))
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, top_p: float | Tensor) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose mass reaches top_p
    (`top_p` may be [B, 1]; a value above 1 keeps everything)."""
    if isinstance(top_p, float) and top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False  # the most likely token always stays (a top_p that rounds to 0 in float32)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def greedy_tokens(logits: Tensor) -> Tensor:
    """Each row's argmax (its first index on a tie), or -1 where that logit is not finite or the row holds
    a NaN. On CPU our vectorized kernel (kernels/csrc/greedy.cpp; torch.argmax is a scalar loop there)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and kernels.ops_available():
        return torch.ops.minillm.greedy_tokens(logits)
    best = logits.argmax(dim=-1)  # picks a NaN if there is one, so the picked logit tells whether the row is sound
    return best.masked_fill(~torch.isfinite(logits.gather(-1, best.view(-1, 1)).view(-1)), -1)


def sample(
    logits: Tensor,
    temperature: float | Sequence[float],
    top_k: int | None | Sequence[int | None] = None,
    top_p: float | None | Sequence[float | None] = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> Tensor:
    """Next token per row from float32 logits [B, V]; temperature 0 is greedy.

    `generators` gives each row its own random stream (a per-request seed), so a row draws the
    same tokens whatever else is in the batch. A row whose logits (after temperature) hold a NaN
    or +inf, or nothing finite, gets -1 and draws nothing: one broken row never breaks the others.
    """
    rows = logits.shape[0]
    temps = per_row(temperature, rows)
    greedy = all(t == 0 for t in temps)
    device = logits.device
    if greedy:
        return greedy_tokens(logits)
    scaled, broken = filtered_logits(logits, temps, top_k, top_p)
    probs = torch.softmax(scaled, dim=-1)
    if generators is None or all(g is None for g in generators):
        drawn = torch.multinomial(probs, 1).squeeze(-1)
    else:
        drawn = torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)])
    if any(t == 0 for t in temps):
        drawn = torch.where(torch.tensor([t == 0 for t in temps], device=device), scaled.argmax(dim=-1), drawn)
    return drawn.masked_fill(broken, -1)


def filtered_logits(logits: Tensor, temperature: Sequence[float], top_k: int | None | Sequence[int | None] = None,
                    top_p: float | None | Sequence[float | None] = None) -> tuple[Tensor, Tensor]:
    """Logits [B, V] after temperature (0 counts as 1), top-k and top-p, and which rows are broken (a NaN
    or +inf, or nothing finite: zeroed here, their draw is to be thrown away). Their softmax is what a
    sampled row draws from."""
    rows, vocab = logits.shape
    device = logits.device
    scaled = logits / torch.tensor([t if t > 0 else 1.0 for t in temperature], device=device).view(-1, 1)
    broken = ~torch.isfinite(scaled.amax(dim=-1))  # amax propagates NaN
    if broken.any():
        scaled = scaled.masked_fill(broken.view(-1, 1), 0.0)
    ks = [vocab if k is None else min(k, vocab) for k in per_row(top_k, rows)]
    if any(k < vocab for k in ks):
        scaled = filter_top_k(scaled, ks[0] if len(set(ks)) == 1 else torch.tensor(ks, device=device))
    ps = per_row(top_p, rows)
    if any(p is not None and p < 1 for p in ps):
        p_values = [2.0 if p is None or p >= 1 else float(p) for p in ps]  # 2.0: the row keeps everything
        scaled = filter_top_p(scaled, p_values[0] if len(set(p_values)) == 1 else torch.tensor(p_values, device=device).view(-1, 1))
    return scaled, broken


@dataclass
class TokenLogprobs:
    """A sampled token's log-probability under the model's raw distribution, and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def _id_matrix(rows: Sequence[Sequence[int]], vocab: int, device: torch.device) -> Tensor:
    """Token id lists as one [B, longest] tensor, padded with `vocab` (a column past the vocabulary)."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [vocab] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def apply_penalties(logits: Tensor, params: Sequence[Any], histories: Sequence[Sequence[int]],
                    outputs: Sequence[Sequence[int]]) -> Tensor:
    """HF's repetition penalty on every token of `histories` (prompt and output), then OpenAI's
    presence and frequency penalties on the `outputs` so far; each row with its own values, built as
    [B, V] tensors in a few ops. Rows without a penalty are passed untouched (x / 1 and x * 1 are exact)."""
    rows, vocab = logits.shape
    device = logits.device
    if any(p.repetition_penalty != 1.0 for p in params):
        ids = _id_matrix([h if p.repetition_penalty != 1.0 else [] for p, h in zip(params, histories)], vocab, device)
        seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=device).scatter_(1, ids, True)[:, :vocab]
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device).view(-1, 1)
        logits = apply_repetition_penalty(logits, seen, penalty)
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        ids = _id_matrix(outputs, vocab, device)
        counts = torch.zeros(rows, vocab + 1, device=device).scatter_add_(1, ids, torch.ones(ids.shape, device=device))
        counts = counts[:, :vocab]
        presence = torch.tensor([p.presence_penalty for p in params], device=device).view(-1, 1)
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device).view(-1, 1)
        logits = logits - frequency * counts - presence * (counts > 0)
    return logits


def constrained_logits(logits: Tensor, params: Sequence[Any], histories: Sequence[Sequence[int]],
                       outputs: Sequence[Sequence[int]], allowed: Tensor | None = None) -> Tensor:
    """The grammar's mask (`allowed` [B, V], structured output), then each request's penalties."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    return apply_penalties(logits, params, histories, outputs)


def sample_requests(logits: Tensor, params: Sequence[Any], histories: Sequence[Sequence[int]],
                    outputs: Sequence[Sequence[int]], generators: Sequence[torch.Generator | None],
                    allowed: Tensor | None = None) -> list[tuple[int, TokenLogprobs | None]]:
    """One token per row for requests with their own `SamplingParams`: (token, its logprobs if the
    request asked for them). `allowed` [B, V] (structured output: guided.py) masks what each row may
    draw. A row whose logits turned non-finite gets token -1."""
    raw = logits
    logits = constrained_logits(logits, params, histories, outputs, allowed)
    tokens = sample(logits, [p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params],
                    generators).tolist()
    return [(token, None if p.logprobs is None or token < 0 else token_logprobs(raw[i], token, p.logprobs))
            for i, (token, p) in enumerate(zip(tokens, params))]  # (no row views unless a request asks)


def token_logprobs(logits: Tensor, token: int, top: int) -> TokenLogprobs:
    """The model's raw distribution (before penalties and temperature), as OpenAI reports it."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, top) if top else (logprobs[:0], logprobs[:0].long())
    return TokenLogprobs(token, logprobs[token].item(), list(zip(ids.tolist(), values.tolist())))
