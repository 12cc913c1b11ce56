"""`TextGenerator`: batched prefill once, then one token per step from the KV cache."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ..cache.kv_cache import KVCache
from ..model.transformer import MiniLLM
from .sampler import apply_repetition_penalty, sample


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class Generation:
    """One prompt's result: the new token ids, why it stopped, and the text when a tokenizer is set."""

    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    text: str | None = None


# The fastest exact backend in benchmarks/results/attention.md: PyTorch's fused SDPA.
# Our flash kernel computes the same result and is the readable, portable reference.
DEFAULT_ATTENTION_BACKEND = "sdpa"


class TextGenerator:
    def __init__(self, model: MiniLLM, tokenizer: Tokenizer | None = None, attention_backend: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.attention_backend = attention_backend or DEFAULT_ATTENTION_BACKEND

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: str | Sequence[int] | Sequence[str | Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | Sequence[int] | None = None,
        eos_token_ids: int | Iterable[int] | None = None,
    ) -> Generation | list[Generation]:
        """Continue one prompt (ids, or text with a tokenizer) or a batch of prompts of any lengths.

        temperature 0 is greedy. `seed` (one for all rows, or one per prompt) makes sampling
        reproducible per prompt, whatever else is in the batch. Each row stops at one of
        `eos_token_ids` (finish reason "stop", the EOS id included) or after max_new_tokens ("length").
        Returns one `Generation` for a single prompt, a list for a batch.
        """
        single, prompts = self._normalise_prompts(prompt_ids)
        cfg = self.model.config
        _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
        for i, ids in enumerate(prompts):
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
            if len(ids) + max_new_tokens > cfg.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                    f"{len(ids) + max_new_tokens}, beyond the model's max_seq_len {cfg.max_seq_len}")
        seeds = _per_row(seed, len(prompts), "seed")
        eos = {eos_token_ids} if isinstance(eos_token_ids, int) else set(eos_token_ids or ())

        device, batch = self.model.device, len(prompts)
        generators = None
        if any(s is not None for s in seeds):
            generators = [None if s is None else torch.Generator(device).manual_seed(s) for s in seeds]
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        cache = KVCache(cfg, batch, max_seq_len=width + max_new_tokens, dtype=self.model.dtype, device=device)
        padded = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)
        seen = None
        if repetition_penalty is not None and repetition_penalty != 1.0:
            seen = torch.zeros(batch, cfg.vocab_size, dtype=torch.bool, device=device)
            for row, ids in enumerate(prompts):
                seen[row, list(ids)] = True

        logits = self._forward(padded, cache, lengths)
        outputs: list[list[int]] = [[] for _ in prompts]
        reasons: list[str | None] = [None] * batch
        for _ in range(max_new_tokens):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            next_ids = sample(logits, temperature, top_k, top_p, generators)
            for row, token in enumerate(next_ids.tolist()):  # the one host sync per step
                if reasons[row] is not None:
                    continue
                outputs[row].append(token)
                if token in eos:
                    reasons[row] = "stop"
                elif len(outputs[row]) == max_new_tokens:
                    reasons[row] = "length"
            if all(r is not None for r in reasons):
                break
            if seen is not None:
                seen[torch.arange(batch, device=device), next_ids] = True
            # Finished rows keep decoding (their tokens are dropped) so every step stays [B, 1].
            logits = self._forward(next_ids[:, None], cache, None)

        results = [
            Generation(ids, reason, self.tokenizer.decode(ids) if self.tokenizer else None)
            for ids, reason in zip(outputs, reasons)
        ]
        return results[0] if single else results

    def _forward(self, input_ids: torch.Tensor, cache: KVCache, lengths: list[int] | None) -> torch.Tensor:
        logits = self.model(input_ids, kv_cache=cache, attention_backend=self.attention_backend,
                            input_lengths=lengths, last_token_only=True)
        return logits[:, -1]

    def _normalise_prompts(self, prompt_ids) -> tuple[bool, list[list[int]]]:
        def encode(p) -> list[int]:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("a text prompt needs a tokenizer; pass token ids or TextGenerator(model, tokenizer)")
                return self.tokenizer.encode(p)
            return [int(t) for t in p]

        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        if isinstance(prompt_ids, str) or (len(prompt_ids) > 0 and isinstance(prompt_ids[0], int)):
            return True, [encode(prompt_ids)]
        if len(prompt_ids) == 0:
            raise ValueError("no prompt given")
        return False, [encode(p) for p in prompt_ids]


def _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty) -> None:
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


def _per_row(value: int | Sequence[int] | None, rows: int, name: str) -> list[int | None]:
    if value is None or isinstance(value, int):
        return [value] * rows
    values = list(value)
    if len(values) != rows:
        raise ValueError(f"{name} has {len(values)} entries for {rows} prompts")
    return values
