"""`TextGenerator`: batched prefill once, then one token per step from the KV cache."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ..model.transformer import MiniLLM
from .batch import DecodeBatch
from .sampler import per_row


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
        eos = {eos_token_ids} if isinstance(eos_token_ids, int) else set(eos_token_ids or ())
        batch = DecodeBatch(self.model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                            per_row(seed, len(prompts), "seed"), eos, self.attention_backend)
        while not batch.done:
            batch.step()
        outputs, reasons = batch.outputs, batch.finish_reasons
        results = [
            Generation(ids, reason, self.tokenizer.decode(ids) if self.tokenizer else None)
            for ids, reason in zip(outputs, reasons)
        ]
        return results[0] if single else results

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
