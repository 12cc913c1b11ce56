"""How much GPU memory the paged KV cache may take: vLLM's `gpu_memory_utilization` rule. The engine may
use that fraction of the card; the weights and everything else already allocated, plus the peak of a
profiled step of `max_num_batched_tokens` tokens, come off it, and the KV cache gets the rest."""

from __future__ import annotations

import torch

from ..attention import AttentionBackend
from ..cache.paged_cache import PagedKVCache
from ..model.transformer import MiniLLM

GiB = 2**30


@torch.inference_mode()
def step_peak_bytes(model: MiniLLM, attention: AttentionBackend, tokens: int, batch: int, block_size: int) -> int:
    """Peak memory of one step of `tokens` prompt tokens over a scratch cache, plus `batch` rows of
    float32 logits three times over (logits, penalties, softmax while sampling)."""
    device = model.device
    # as prompts of at most the model's context (positions past it have no RoPE)
    counts = [min(model.config.max_seq_len, tokens - at) for at in range(0, tokens, model.config.max_seq_len)]
    pages = [-(-n // block_size) for n in counts]
    cache = PagedKVCache(model.config, sum(pages), block_size, dtype=model.dtype, device=device)
    starts = [sum(pages[:i]) for i in range(len(pages))]
    plan = cache.plan([list(range(s, s + n)) for s, n in zip(starts, pages)], [0] * len(counts), counts, attention)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    model(torch.zeros(tokens, dtype=torch.long, device=device), plan, last_token_only=True)
    peak = torch.cuda.max_memory_allocated(device) - before
    return peak + 3 * batch * model.config.vocab_size * 4


def kv_cache_bytes(model: MiniLLM, attention: AttentionBackend, utilization: float, tokens: int, batch: int,
                   block_size: int) -> int:
    """Bytes for the KV cache on the model's GPU; a ValueError with the numbers when nothing is left."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    device = model.device
    try:
        activations = step_peak_bytes(model, attention, tokens, batch, block_size)
    except torch.cuda.OutOfMemoryError:
        raise ValueError(f"a step of max_num_batched_tokens={tokens} tokens does not fit in GPU memory next to "
                         "the weights; lower max_num_batched_tokens") from None
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    used = total - free  # the weights, this process's other tensors, and anything else on the card
    budget = int(total * utilization) - used - activations
    if budget <= 0:
        raise ValueError(f"gpu_memory_utilization={utilization} of {total / GiB:.1f} GiB leaves no room for the KV "
                         f"cache: {used / GiB:.1f} GiB are in use (weights and more) and a step of "
                         f"{tokens} tokens needs {activations / GiB:.2f} GiB; raise gpu_memory_utilization or "
                         "lower max_num_batched_tokens")
    return budget
