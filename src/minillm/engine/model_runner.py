"""Runs one scheduled step on the model over the paged KV cache, and samples per request."""

from __future__ import annotations

import torch

from ..cache.paged_cache import PagedKVCache
from ..generation.sampler import apply_repetition_penalty, sample
from ..model.transformer import MiniLLM
from .scheduler import ScheduledStep


class ModelRunner:
    def __init__(self, model: MiniLLM, num_blocks: int, block_size: int, attention_backend: str) -> None:
        self.model = model
        self.backend = attention_backend
        self.cache = PagedKVCache(model.config, num_blocks, block_size, dtype=model.dtype, device=model.device)

    @torch.inference_mode()
    def run(self, step: ScheduledStep) -> list[int | None]:
        """Feed each sequence its tokens; return the sampled token for sequences that reached
        their last token (None for prompts still being prefilled in chunks)."""
        seqs, counts = step.seqs, step.num_tokens
        width = max(counts)
        rows = [[0] * (width - n) + s.token_ids[s.num_computed:s.num_computed + n] for s, n in zip(seqs, counts)]
        device = self.model.device
        plan = self.cache.plan([s.block_table for s in seqs], [s.num_computed for s in seqs], counts, width)
        logits = self.model.forward_step(torch.tensor(rows, device=device), plan, self.backend, last_token_only=True)[:, -1]

        sampling = [i for i, done in enumerate(step.samples) if done]
        if not sampling:
            return [None] * len(seqs)
        picked = [seqs[i] for i in sampling]
        logits = logits[sampling] if len(sampling) < len(seqs) else logits
        params = [s.params for s in picked]
        penalised = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if penalised:
            seen = torch.zeros(len(picked), logits.shape[-1], dtype=torch.bool, device=device)
            for i in penalised:
                seen[i, picked[i].token_ids] = True
            penalty = torch.tensor([p.repetition_penalty for p in params], device=device).view(-1, 1)
            logits = apply_repetition_penalty(logits, seen, penalty)
        tokens = sample(logits, [p.temperature for p in params], [p.top_k for p in params],
                        [p.top_p for p in params], [s.state.generator for s in picked]).tolist()
        out: list[int | None] = [None] * len(seqs)
        for i, token in zip(sampling, tokens):
            out[i] = token
        return out
