"""`DecodeBatch`: prompts of any lengths prefilled together, then decoded one token per step."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from ..cache.kv_cache import KVCache
from ..model.transformer import MiniLLM
from .sampler import apply_repetition_penalty, sample


def check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty!r}")


def check_prompt(ids: Sequence[int], max_new_tokens: int, vocab_size: int, max_seq_len: int,
                 budget_name: str = "max_new_tokens") -> None:
    """A prompt must be non-empty, inside the vocabulary, and leave room for its new tokens."""
    if not ids:
        raise ValueError("the prompt is empty")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    total = len(ids) + max_new_tokens
    if total > max_seq_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; with {budget_name}={max_new_tokens} that is {total}, "
                         f"beyond the model's context of {max_seq_len} tokens")


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int, max_seq_len: int) -> None:
    for i, ids in enumerate(prompts):
        try:
            check_prompt(ids, max_new_tokens, vocab_size, max_seq_len)
        except ValueError as err:
            raise ValueError(f"prompt {i}: {err}") from None


class DecodeBatch:
    """Rows finish on their own: at an EOS id ("stop"), after max_new_tokens ("length"), or when the
    caller calls `finish` (a stop string). Finished rows keep riding along in the [B, 1] decode
    steps so shapes stay static; their tokens are dropped.
    """

    def __init__(
        self,
        model: MiniLLM,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seeds: Sequence[int | None] | None = None,
        eos_token_ids: Collection[int] = (),
        attention_backend: str = "sdpa",
    ) -> None:
        cfg = model.config
        check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
        check_prompts(prompts, max_new_tokens, cfg.vocab_size, cfg.max_seq_len)
        self.model, self.backend = model, attention_backend
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.repetition_penalty = repetition_penalty
        self.eos = set(eos_token_ids)
        batch, device = len(prompts), model.device
        self.generators = None
        if seeds is not None and any(s is not None for s in seeds):
            self.generators = [None if s is None else torch.Generator(device).manual_seed(s) for s in seeds]
        self.lengths = [len(p) for p in prompts]
        width = max(self.lengths)
        self.cache = KVCache(cfg, batch, max_seq_len=width + max_new_tokens, dtype=model.dtype, device=device)
        self._next_input = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)
        self._input_lengths: list[int] | None = self.lengths
        self.seen = None
        if repetition_penalty is not None and repetition_penalty != 1.0:
            self.seen = torch.zeros(batch, cfg.vocab_size, dtype=torch.bool, device=device)
            for row, ids in enumerate(prompts):
                self.seen[row, list(ids)] = True
        self.outputs: list[list[int]] = [[] for _ in prompts]
        self.finish_reasons: list[str | None] = [None] * batch

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    def finish(self, row: int, reason: str) -> None:
        if self.finish_reasons[row] is None:
            self.finish_reasons[row] = reason

    @torch.inference_mode()
    def step(self) -> list[tuple[int, int]]:
        """Run one forward (the prefill first) and sample; return (row, token) for rows still running."""
        logits = self.model(self._next_input, kv_cache=self.cache, attention_backend=self.backend,
                            input_lengths=self._input_lengths, last_token_only=True)[:, -1]
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.repetition_penalty)
        next_ids = sample(logits, self.temperature, self.top_k, self.top_p, self.generators)
        if self.seen is not None:
            self.seen[torch.arange(len(self.outputs), device=next_ids.device), next_ids] = True
        self._next_input, self._input_lengths = next_ids[:, None], None
        events = []
        for row, token in enumerate(next_ids.tolist()):  # the one host sync per step
            if self.finish_reasons[row] is not None:
                continue
            self.outputs[row].append(token)
            events.append((row, token))
            if token in self.eos:
                self.finish_reasons[row] = "stop"
            elif len(self.outputs[row]) == self.max_new_tokens:
                self.finish_reasons[row] = "length"
        return events
