"""Runs one scheduled step on the model over the paged KV cache, and samples per request."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..attention import paged_cpu
from ..cache.paged_cache import PagedKVCache
from ..generation.sampler import apply_repetition_penalty, sample
from ..kernels import ggml
from ..model.transformer import MiniLLM
from .compiled_step import compile_step
from .scheduler import ScheduledStep


class ModelRunner:
    def __init__(self, model: MiniLLM, num_blocks: int, block_size: int, attention_backend: str,
                 compile: bool = False, fast_prefill: bool = False) -> None:
        self.model = model
        self.backend = attention_backend
        self.fast_prefill = fast_prefill and not compile
        if attention_backend == "paged" and model.device.type == "cpu":
            paged_cpu.available()  # load the kernels now, not inside the first step (or a traced one)
            kernels.ops_available()
        self.cache = PagedKVCache(model.config, num_blocks, block_size, dtype=model.dtype, device=model.device)
        self.forward = model.forward_step
        if compile:
            # the other backends turn a packed step into padded rows, whose width is known only at run time
            if attention_backend != "paged" or model.device.type != "cpu" or not paged_cpu.available():
                raise ValueError("compile=True needs the 'paged' attention backend's C++ kernel (CPU, built with g++); "
                                 f"here: backend {attention_backend!r} on {model.device.type}")
            self.forward = compile_step(model.forward_step, [*self.cache.k, *self.cache.v])

    @torch.inference_mode()
    def warmup(self) -> None:
        """Run steps on scratch slots so a compiled step is traced now, not by the first request.
        Only for a fresh cache: it writes into blocks 0 and 1, which must hold nothing yet."""
        if self.cache.num_blocks < 2:
            return
        size = self.cache.block_size
        for batch in (1, 2):
            plan = self.cache.plan([[0, 1]] * batch, [size] * batch, [1] * batch)
            ids = torch.zeros(1, batch, dtype=torch.long, device=self.model.device)
            self.forward(ids, plan, self.backend, last_token_only=True)

    @torch.inference_mode()
    def run(self, step: ScheduledStep) -> list[tuple[int, TokenLogprobs | None] | RowError | None]:
        """Feed each sequence its tokens, all packed into one [1, N] input; return (sampled token, its
        logprobs if asked) for sequences that reached their last token, None for prompts still being
        prefilled in chunks, and a RowError for a row whose logits came out non-finite."""
        seqs, counts = step.seqs, step.num_tokens
        ids = [t for s, n in zip(seqs, counts) for t in s.token_ids[s.num_computed:s.num_computed + n]]
        device = self.model.device
        plan = self.cache.plan([s.block_table for s in seqs], [s.num_computed for s in seqs], counts)
        with ggml.prefill_rows(plan.first_prompt_row if self.fast_prefill else -1):
            logits = self.forward(torch.tensor([ids], device=device), plan, self.backend, last_token_only=True)[:, -1]

        sampling = [i for i, done in enumerate(step.samples) if done]
        if not sampling:
            return [None] * len(seqs)
        picked = [seqs[i] for i in sampling]
        logits = raw = logits[sampling] if len(sampling) < len(seqs) else logits
        params = [s.params for s in picked]
        penalised = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if penalised:
            seen = torch.zeros(len(picked), logits.shape[-1], dtype=torch.bool, device=device)
            for i in penalised:
                seen[i, picked[i].token_ids] = True
            penalty = torch.tensor([p.repetition_penalty for p in params], device=device).view(-1, 1)
            logits = apply_repetition_penalty(logits, seen, penalty)
        counted = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
        if counted:  # OpenAI's penalties, on the tokens generated so far
            counts = torch.zeros_like(logits)
            for i in counted:
                ids = torch.tensor(picked[i].output_ids, dtype=torch.long, device=device)
                counts[i].index_add_(0, ids, torch.ones(len(ids), device=device))
            presence = torch.tensor([p.presence_penalty for p in params], device=device).view(-1, 1)
            frequency = torch.tensor([p.frequency_penalty for p in params], device=device).view(-1, 1)
            logits = logits - frequency * counts - presence * (counts > 0)
        tokens = sample(logits, [p.temperature for p in params], [p.top_k for p in params],
                        [p.top_p for p in params], [s.state.generator for s in picked]).tolist()
        out: list[tuple[int, TokenLogprobs | None] | RowError | None] = [None] * len(seqs)
        for row, (i, token) in enumerate(zip(sampling, tokens)):
            p = params[row]
            if token < 0:
                out[i] = RowError(f"the logits became non-finite after penalties and temperature (temperature="
                                  f"{p.temperature}, repetition_penalty={p.repetition_penalty}, presence_penalty="
                                  f"{p.presence_penalty}, frequency_penalty={p.frequency_penalty})")
            else:
                out[i] = (token, None if p.logprobs is None else _logprobs(raw[row], token, p.logprobs))
        return out


@dataclass
class RowError:
    """Why one sequence of a step could not go on; the step's other sequences are unaffected."""

    message: str


@dataclass
class TokenLogprobs:
    """A sampled token's log-probability under the model's raw distribution, and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def _logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, top) if top else (logprobs[:0], logprobs[:0].long())
    return TokenLogprobs(token, logprobs[token].item(), list(zip(ids.tolist(), values.tolist())))
