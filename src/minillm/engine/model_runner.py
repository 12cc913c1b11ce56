"""Runs one scheduled step on the model over the paged KV cache: prepare the packed input, forward, sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels
from ..attention import select_attention
from ..cache.paged_cache import PagedKVCache, PagedStep, bytes_per_block
from ..generation.guided import allowed_tokens
from ..generation.sampler import TokenLogprobs, sample_requests
from ..model.ggml_decoder import GGMLDecoder
from ..model.transformer import MiniLLM
from .compiled_step import compile_step
from .cuda_graphs import DecodeGraphs
from .scheduler import ScheduledStep


@dataclass
class RowError:
    """Why one sequence of a step could not go on; the step's other sequences are unaffected."""

    message: str


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
    def __init__(self, model: MiniLLM, num_blocks: int, block_size: int, attention_backend: str | None,
                 compile: bool = False, fast_prefill: bool = False, cuda_graphs: bool = False,
                 max_batch: int = 64, kv_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.fast_prefill = fast_prefill and not compile
        # chosen once: every step carries it (kernels load now, not inside the first step or a traced one)
        self.attention = select_attention(attention_backend, model.device, model.dtype, head_dim=model.config.head_dim)
        if model.device.type == "cpu":
            kernels.ops_available()
        kv_dtype = model.dtype if kv_dtype is None else kv_dtype
        if kv_dtype != model.dtype and not (kv_dtype == torch.float16 and model.dtype == torch.float32
                                            and self.attention.name == "paged_cpu"):
            name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
            raise ValueError(f"kv_cache_dtype={name(kv_dtype)} under {name(model.dtype)} activations: a KV cache in "
                             "another dtype than the model's can only be float16 under float32, with the 'paged_cpu' "
                             f"attention backend (here: {self.attention.name} on {model.device.type}); leave "
                             "kv_cache_dtype unset for the model's own")
        # CUDA graphs for decode steps: the Triton kernels take their sizes from the graph (a torch
        # backend's row layout is sized per step), and RoPE must not depend on the sequence's length
        graphs = (cuda_graphs and not compile and model.device.type == "cuda" and self.attention.name == "triton"
                  and model.rope.switch_at is None)
        # a graph's padding rows write their K/V to one block past those the block manager hands out
        self.cache = allocate_cache(model, num_blocks + int(graphs), block_size, kv_dtype)
        # chosen once: a model on GGUF blocks with Llama layers runs every layer in one C++ op
        fused = (self.attention.name == "paged_cpu" and model.dtype == torch.float32 and GGMLDecoder.fits(model))
        self.forward = GGMLDecoder(model).forward if fused else model.forward
        if fast_prefill and not fused:
            raise ValueError("fast_prefill runs prompt chunks as GEMMs in the fused GGUF decoder: it needs a GGUF file "
                             "with Llama-shaped layers on its own blocks (dtype unset), on the CPU with the 'paged_cpu' "
                             "attention backend")
        if compile:
            # the other backends lay a packed step out as rows, whose width is known only at run time
            if self.attention.name != "paged_cpu":
                raise ValueError("compile=True needs the 'paged_cpu' attention backend (our C++ kernel: CPU, built "
                                 f"with g++); here: {self.attention.name!r} on {model.device.type}")
            self.forward = compile_step(self.forward, [*self.cache.k, *self.cache.v])
        self.graphs = DecodeGraphs(self.forward, self.cache, self.attention, max_batch, model.config.max_seq_len,
                                   num_blocks) if graphs else None

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

    def prepare(self, step: ScheduledStep) -> tuple[Tensor, PagedStep]:
        """Each sequence's next tokens packed into one input [N], and where they go in the cache."""
        seqs, counts = step.seqs, step.num_tokens
        ids = [t for s, n in zip(seqs, counts) for t in s.token_ids[s.num_computed:s.num_computed + n]]
        plan = self.cache.plan([s.block_table for s in seqs], [s.num_computed for s in seqs], counts, self.attention,
                               [len(s) for s in seqs], prompt_gemm=self.fast_prefill)
        return torch.tensor(ids, device=self.model.device), plan

    @torch.inference_mode()
    def run(self, step: ScheduledStep) -> list[tuple[int, TokenLogprobs | None] | RowError | None]:
        """Return, per sequence, (sampled token, its logprobs if asked) when it reached its last token,
        None for a prompt still being prefilled in chunks, and a RowError for a row whose logits came
        out non-finite."""
        seqs = step.seqs
        if self.graphs is not None and max(step.num_tokens) == 1 and self.graphs.fits(len(seqs), max(map(len, seqs))):
            logits = self.graphs.run([s.token_ids[s.num_computed] for s in seqs], [s.num_computed for s in seqs],
                                     [s.block_table for s in seqs])
        else:
            ids, plan = self.prepare(step)
            logits = self.forward(ids, plan, last_token_only=True)
        out: list[tuple[int, TokenLogprobs | None] | RowError | None] = [None] * len(step.seqs)
        rows = [i for i, done in enumerate(step.samples) if done]
        if not rows:
            return out
        seqs = [step.seqs[i] for i in rows]
        logits = logits[rows] if len(rows) < len(step.seqs) else logits
        allowed = allowed_tokens([s.state.matcher for s in seqs], logits.shape[-1])
        sampled = sample_requests(logits, [s.params for s in seqs], [s.token_ids for s in seqs],
                                  [s.output_ids for s in seqs], [s.state.generator for s in seqs], allowed)
        for i, seq, (token, logprobs) in zip(rows, seqs, sampled):
            p = seq.params
            out[i] = (token, logprobs) if token >= 0 else RowError(
                f"the logits became non-finite after penalties and temperature (temperature={p.temperature}, "
                f"repetition_penalty={p.repetition_penalty}, presence_penalty={p.presence_penalty}, "
                f"frequency_penalty={p.frequency_penalty})")
        return out
