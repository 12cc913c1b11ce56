"""`TextGenerator`: the first release's generation API, a short wrapper over `LLMEngine`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from .cache.paged_cache import bytes_per_block
from .engine import EngineConfig, LLMEngine
from .generation.sampler import per_row
from .model.transformer import MiniLLM
from .sampling_params import SamplingParams

BLOCK_SIZE = 16


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class Generation:
    """One prompt's result: the new token ids, why it stopped, and the text when a tokenizer is set."""

    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    text: str | None = None


class TextGenerator:
    def __init__(self, model: MiniLLM, tokenizer: Tokenizer | None = None, attention_backend: str | None = None) -> None:
        """attention_backend: see `minillm.attention` (None: the engine's default)."""
        self.model = model
        self.tokenizer = tokenizer
        self.attention_backend = attention_backend

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
        Arguments are checked as `SamplingParams` (max_new_tokens is its max_tokens).
        Returns one `Generation` for a single prompt, a list for a batch.
        """
        single, prompts = self._normalise_prompts(prompt_ids)
        eos = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids or ())
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=1.0 if top_p is None else top_p,
                                 repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty, seed=s)
                  for s in per_row(seed, len(prompts), "seed")]
        # a cache that holds every prompt with its new tokens, so nothing is ever preempted
        blocks = sum(-(-(len(p) + max_new_tokens) // BLOCK_SIZE) for p in prompts)
        config = EngineConfig(block_size=BLOCK_SIZE, max_num_seqs=len(prompts), enable_prefix_caching=False,
                              attention_backend=self.attention_backend,
                              kv_cache_memory=blocks * bytes_per_block(self.model.config, BLOCK_SIZE, self.model.dtype))
        engine = LLMEngine(self.model, None, eos, config)
        results = [Generation(r.token_ids, r.finish_reason, self.tokenizer.decode(r.token_ids) if self.tokenizer else None)
                   for r in engine.generate(prompts, params)]
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
