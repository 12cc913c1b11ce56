"""Runs one scheduled step on the model over the paged KV cache: prepare the packed input, forward, sample."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels
from ..cache.paged_cache import PagedKVCache, PagedStep, bytes_per_block
from ..generation.guided import allowed_tokens
from ..generation.sampler import TokenLogprobs, sample_requests
from ..model.ggml_decoder import GGMLDecoder
from ..model.transformer import MiniLLM
from .compiled_step import compile_step
from .cuda_graphs import DecodeGraphs
from .settings import StepSettings
from .scheduler import ScheduledStep
from .speculative import verify


@dataclass
class RowError:
    """Why one sequence of a step could not go on; the step's other sequences are unaffected."""

    message: str


class RunnerFailed(RuntimeError):
    """The runner can run no step any more (a tensor-parallel rank died): every request in flight fails."""


@dataclass
class StepInputs:
    """One step's inputs as plain integers, before they become tensors on a device: what a tensor-parallel
    rank 0 sends every other rank (parallel/group.py), which plans the same step on its own cache."""

    token_ids: list[int]  # the packed input [N]: each sequence's tokens, then its draft tokens
    block_tables: list[list[int]]
    starts: list[int]  # tokens each sequence has in the cache already
    counts: list[int]  # tokens each feeds
    totals: list[int]  # each sequence's whole length (longrope / dynamic RoPE)
    logit_counts: list[int] | None  # rows each needs logits for (speculative decoding), None: its last


def allocate_cache(model: MiniLLM, num_blocks: int, block_size: int, dtype: torch.dtype) -> PagedKVCache:
    try:
        return PagedKVCache(model.config, num_blocks, block_size, dtype=dtype, device=model.device)
    except torch.cuda.OutOfMemoryError:
        size = num_blocks * bytes_per_block(model.config, block_size, dtype)
        free, total = torch.cuda.mem_get_info(model.device)
        raise ValueError(f"the KV cache of {num_blocks} blocks ({size / 2**30:.2f} GiB) does not fit: "
                         f"{free / 2**30:.2f} of {total / 2**30:.1f} GiB free on {model.device}; lower "
                         "gpu_memory_utilization or kv_cache_memory") from None


class ModelRunner:
    failure: str | None = None  # why steps can no longer run (a tensor-parallel rank died); None: they can

    def __init__(self, model: MiniLLM, num_blocks: int, block_size: int, settings: StepSettings,
                 max_batch: int = 64) -> None:
        """settings: what the steps run with, decided once (engine/settings.py)."""
        self.model = model
        self.attention, self.fast_prefill = settings.attention, settings.fast_prefill  # every step carries them
        if model.device.type == "cpu":
            kernels.ops_available()  # loaded now, not inside the first step or a traced one
        # a graph's padding rows write their K/V to one block past those the block manager hands out
        self.cache = allocate_cache(model, num_blocks + int(settings.cuda_graphs), block_size, settings.kv_dtype)
        self.forward = GGMLDecoder(model).forward if settings.fused_decoder else model.forward
        if settings.compile:
            model.reserve_positions(model.config.max_seq_len)
            self.forward = compile_step(self.forward, [*self.cache.k, *self.cache.v])
        self.graphs = DecodeGraphs(self.forward, self.cache, self.attention, max_batch, model.config.max_seq_len,
                                   num_blocks) if settings.cuda_graphs else None

    @torch.inference_mode()
    def warmup(self) -> None:
        """Run steps on scratch slots so a compiled step is traced now, not by the first request.
        Only for a fresh cache: it writes into blocks 0 and 1, which must hold nothing yet."""
        if self.cache.num_blocks < 2:
            return
        size = self.cache.block_size
        for batch in (1, 2):
            plan = self.cache.plan([[0, 1]] * batch, [size] * batch, [1] * batch, self.attention)
            self.forward(torch.zeros(batch, dtype=torch.long, device=self.model.device), plan, last_token_only=True)

    def inputs(self, step: ScheduledStep) -> StepInputs:
        """Each sequence's next tokens (and draft tokens) packed into one input [N], and where they go in the
        cache; a sequence with drafts gets the logits of every row from its last token on."""
        seqs, counts, drafts = step.seqs, step.num_tokens, step.drafts
        ids = [t for s, n, d in zip(seqs, counts, drafts) for t in s.token_ids[s.num_computed:s.num_computed + n - len(d)] + d]
        return StepInputs(ids, [s.block_table for s in seqs], [s.num_computed for s in seqs], counts,
                          [max(len(s), s.num_computed + n) for s, n in zip(seqs, counts)],
                          [len(d) + 1 for d in drafts] if any(drafts) else None)

    def plan(self, inputs: StepInputs) -> tuple[Tensor, PagedStep]:
        """The step's input [N] on the device, and where its tokens go in this runner's cache."""
        plan = self.cache.plan(inputs.block_tables, inputs.starts, inputs.counts, self.attention, inputs.totals,
                               prompt_gemm=self.fast_prefill, logit_counts=inputs.logit_counts)
        return torch.tensor(inputs.token_ids, device=self.model.device), plan

    def execute(self, inputs: StepInputs) -> Tensor:
        """The step's forward pass: the logits of each sequence's last row (or rows, `logit_counts`)."""
        return self.forward(*self.plan(inputs), last_token_only=True)

    def close(self) -> None:
        """Release what the runner holds beyond its tensors (a tensor-parallel runner: its workers)."""

    @torch.inference_mode()
    def run(self, step: ScheduledStep) -> list[list[tuple[int, TokenLogprobs | None]] | RowError | None]:
        """Return, per sequence, the tokens it emits with their logprobs if asked (one, or with draft tokens
        up to all of them and one more: engine/speculative.py) when it reached its last token, None for a
        prompt still being prefilled in chunks, and a RowError for a row whose logits came out non-finite."""
        seqs = step.seqs
        if self.graphs is not None and max(step.num_tokens) == 1 and self.graphs.fits(len(seqs), max(map(len, seqs))):
            logits = self.graphs.run([s.token_ids[s.num_computed] for s in seqs], [s.num_computed for s in seqs],
                                     [s.block_table for s in seqs])
        else:
            logits = self.execute(self.inputs(step))
        out: list[list[tuple[int, TokenLogprobs | None]] | RowError | None] = [None] * len(step.seqs)
        rows = [i for i, done in enumerate(step.samples) if done]
        if not rows:
            return out
        seqs, drafts = [step.seqs[i] for i in rows], [step.drafts[i] for i in rows]
        if len(rows) < len(step.seqs):  # each sampling sequence's logits rows: its last token's, then its drafts'
            first = list(itertools.accumulate((len(d) + 1 for d in step.drafts), initial=0))
            logits = logits[[r for i in rows for r in range(first[i], first[i + 1])]]
        allowed = allowed_tokens([s.state.matcher for s, d in zip(seqs, drafts) for _ in range(len(d) + 1)],
                                 logits.shape[-1])
        args = ([s.params for s in seqs], [s.token_ids for s in seqs], [s.output_ids for s in seqs],
                [s.state.generator for s in seqs])
        emitted = verify(logits, *args, drafts, allowed) if any(drafts) else \
            [[sampled] for sampled in sample_requests(logits, *args, allowed)]
        for i, seq, tokens in zip(rows, seqs, emitted):
            p = seq.params
            out[i] = tokens if tokens[-1][0] >= 0 else RowError(
                f"the logits became non-finite after penalties and temperature (temperature={p.temperature}, "
                f"repetition_penalty={p.repetition_penalty}, presence_penalty={p.presence_penalty}, "
                f"frequency_penalty={p.frequency_penalty})")
        return out
