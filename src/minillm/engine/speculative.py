"""Speculative decoding: its settings, and the verification of draft tokens.

A decoding sequence feeds its last token and k draft tokens (a drafter's guess at what follows:
engine/drafters.py) in one step, scored like a prompt chunk's rows over the paged cache; row j's logits
are the target's distribution for the token after draft j. The step emits the target's token at each row
while it equals the draft's, then the first that differs, or one more after a wholly accepted draft: 1 to
k + 1 tokens for one read of the weights. The rejected drafts' K/V slots are simply not counted as
computed (the next tokens overwrite them), and the blocks taken for them are given back (`BlockManager.trim`).

Exactness. Greedy rows take the target's argmax at every row, so the tokens are those of plain decoding
whenever a row's logits have the bits of a one-token decode row (our kernels score rows alone: tested).
Sampled rows: our drafts are single tokens (a point mass q), for which Leviathan et al.'s rejection
sampling is "accept d with probability p(d), else draw from p without d, renormalised". Drawing x ~ p and
accepting d iff x == d is that rule exactly (P(x = d) = p(d); given x != d, x is distributed as the
residual), and it draws from the request's generator once per emitted token, as plain decoding does, so
a seeded request gets the same tokens with speculation as without. Penalties see the drafts accepted
before each row, as they would have been.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..generation.sampler import TokenLogprobs, constrained_logits, filtered_logits, greedy_tokens, token_logprobs

METHODS = ("ngram", "draft")
MAX_SPECULATIVE_TOKENS = 32


@dataclass(frozen=True)
class SpeculativeConfig:
    """`LLM(..., speculative=...)`: "ngram", "draft:PATH", or a dict of these fields (vLLM's names)."""

    method: str  # "ngram": prompt lookup in the sequence's own tokens; "draft": a smaller model's greedy guesses
    model: Any = None  # "draft": a GGUF file or Hugging Face folder with the target's vocabulary, or a loaded MiniLLM
    num_speculative_tokens: int = 8  # draft tokens per sequence and step at most (the cost model picks fewer)
    # "ngram": the earlier occurrence of the sequence's last tokens matching at least min of them, and the
    # longest up to max (a longer match is a surer draft: engine/drafters.py)
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 16
    # a draft token is fed when its estimated chance of acceptance is at least this (None: wherever it pays
    # for its row by the step costs measured at start-up: engine/drafters.py)
    min_acceptance: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative: unknown method {self.method!r}; expected one of {METHODS}")
        if (self.method == "draft") != (self.model is not None):
            raise ValueError("speculative: a draft model (model=PATH) goes with method 'draft', and only with it")
        k = self.num_speculative_tokens
        if not _is_int(k) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative: num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], "
                             f"got {k!r}")
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if not (_is_int(low) and _is_int(high) and 1 <= low <= high <= 16):
            raise ValueError("speculative: prompt_lookup_min and prompt_lookup_max must be integers with "
                             f"1 <= min <= max <= 16, got {low!r} and {high!r}")
        rate = self.min_acceptance
        if rate is not None and not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 <= rate <= 1):
            raise ValueError(f"speculative: min_acceptance must be a number in [0, 1], got {rate!r}")

    @classmethod
    def parse(cls, value: str | dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """None (no speculation), "ngram", "draft:PATH", a dict of the fields, or a SpeculativeConfig."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            method, _, path = value.partition(":")
            if method == "draft" and not path:
                raise ValueError("speculative: 'draft:PATH' needs the draft model's path")
            if method != "draft" and path:
                raise ValueError(f"speculative: {value!r}: only 'draft' takes a path")
            return cls(method, path or None)
        if isinstance(value, dict):
            names = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise ValueError(f"speculative: unknown setting(s) {unknown}; expected some of {sorted(names)}")
            options = dict(value)
            options.setdefault("method", "draft" if options.get("model") is not None else "ngram")
            return cls(**options)
        raise ValueError(f"speculative must be 'ngram', 'draft:PATH' or a dict, got {type(value).__name__}")

    @property
    def model_path(self) -> Path | None:
        return Path(self.model) if isinstance(self.model, (str, Path)) else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


Emitted = list[tuple[int, TokenLogprobs | None]]


def accept(draft: Sequence[int], target: Callable[[int], int]) -> list[int]:
    """The tokens one sequence emits: the target's token at each row (`target(j)`, drawn only when asked,
    so a seeded stream advances once per emitted token) while it equals the draft's, then the first that
    differs, or the one after a wholly accepted draft. A -1 (a broken row) ends it."""
    emitted = []
    for j in range(len(draft) + 1):
        token = target(j)
        emitted.append(token)
        if token < 0 or j == len(draft) or token != draft[j]:
            break
    return emitted


def verify(logits: Tensor, params: Sequence[Any], histories: Sequence[list[int]], outputs: Sequence[list[int]],
           generators: Sequence[torch.Generator | None], drafts: Sequence[list[int]],
           allowed: Tensor | None = None) -> list[Emitted]:
    """Each sequence's emitted tokens (with their logprobs if its request asked), from `logits`
    [sum(len(d) + 1), V]: a sequence's rows in order, its last token's then one per draft token. As
    `sample_requests` per row (grammar mask, penalties, temperature, top-k, top-p, the request's generator);
    a sequence without drafts gets the token plain decoding would. A broken row's token is -1."""
    row_params, row_histories, row_outputs = [], [], []
    for p, history, output, draft in zip(params, histories, outputs, drafts):
        penalised = p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
        for j in range(len(draft) + 1):  # row j's penalties count the j drafts before it (copied only if needed)
            row_params.append(p)
            row_histories.append(history + draft[:j] if j and penalised else history)
            row_outputs.append(output + draft[:j] if j and penalised else output)
    adjusted = constrained_logits(logits, row_params, row_histories, row_outputs, allowed)
    temps = [p.temperature for p in row_params]
    greedy_rows = [r for r, t in enumerate(temps) if t == 0]
    sampled_rows = [r for r, t in enumerate(temps) if t > 0]
    greedy = dict(zip(greedy_rows, greedy_tokens(adjusted[greedy_rows] if sampled_rows else adjusted).tolist()))
    probs: dict[int, Tensor] = {}
    broken: dict[int, bool] = {}
    if sampled_rows:
        scaled, bad = filtered_logits(adjusted[sampled_rows], [temps[r] for r in sampled_rows],
                                      [row_params[r].top_k for r in sampled_rows],
                                      [row_params[r].top_p for r in sampled_rows])
        probs = dict(zip(sampled_rows, torch.softmax(scaled, dim=-1)))
        broken = dict(zip(sampled_rows, bad.tolist()))

    def target_of(first: int, generator: torch.Generator | None) -> Callable[[int], int]:
        def target(j: int) -> int:
            row = first + j
            if row in greedy:
                return greedy[row]
            token = int(torch.multinomial(probs[row], 1, generator=generator))
            return -1 if broken[row] else token
        return target

    emitted: list[Emitted] = []
    first = 0
    for p, generator, draft in zip(params, generators, drafts):
        tokens = accept(draft, target_of(first, generator))
        emitted.append([(token, None if p.logprobs is None or token < 0 else token_logprobs(logits[first + j], token,
                                                                                              p.logprobs))
                        for j, token in enumerate(tokens)])
        first += len(draft) + 1
    return emitted
