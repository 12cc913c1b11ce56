"""An engine's settings (`EngineConfig`) and what its steps run with, decided once from them and the model
(`resolve`): the attention backend, the KV cache's dtype, the fused GGUF decoder, torch.compile,
fast_prefill, CUDA graphs and speculative decoding. Every combination that cannot run is refused here, saying what to change."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..attention import AttentionBackend, select_attention
from ..config import resolve_dtype
from ..kernels.ggml import GGMLLinear
from ..model.ggml_decoder import GGMLDecoder
from ..model.transformer import MiniLLM
from .speculative import SpeculativeConfig


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes for the paged K/V pools; None: 1 GiB on CPU, on a GPU
    gpu_memory_utilization: float = 0.9  # ... what this fraction of the card leaves (engine/gpu_memory.py)
    # sequences running at once, and tokens in one step (every decode token plus prompt chunks);
    # None: 64 and 512 on CPU, 256 and 16384 on a GPU (vLLM's range)
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    # None: "paged_cpu" (our C++ kernel) where it runs, "triton" on a GPU with triton, else "sdpa"
    attention_backend: str | None = None
    compile: bool = False  # torch.compile the step (engine/compiled_step.py), at start-up
    cuda_graphs: bool = True  # on a GPU: decode steps replayed from CUDA graphs (engine/cuda_graphs.py)
    # GGUF blocks on an AVX512-BF16 CPU: prompt chunks of 64+ tokens as bf16 GEMMs, faster at the price of
    # exactness: a prompt's bits then depend on how it was chunked and batched (decode tokens keep the exact
    # int8 kernel). Off: batched equals alone, bit for bit.
    fast_prefill: bool = False
    # the K/V pools' dtype; None: float16 for a model on GGUF blocks under our C++ attention kernel (as
    # llama.cpp's default f16 cache: half the memory and bytes read per decode token), else the activations'
    kv_cache_dtype: str | None = None
    # speculative decoding (engine/speculative.py): None, "ngram", "draft:PATH" or a dict of SpeculativeConfig's
    # fields; a request opts out with SamplingParams(speculative=False)
    speculative: str | dict | SpeculativeConfig | None = None
    # ranks the model is sharded over (parallel/: `LLM` starts them); kv_cache_memory is then per rank
    tensor_parallel_size: int = 1

    def for_device(self, device: torch.device) -> EngineConfig:
        """The sizes left unset, filled in for the device the engine runs on."""
        gpu = device.type == "cuda"
        return replace(self, max_num_seqs=(256 if gpu else 64) if self.max_num_seqs is None else self.max_num_seqs,
                       max_num_batched_tokens=(16384 if gpu else 512) if self.max_num_batched_tokens is None
                       else self.max_num_batched_tokens)


@dataclass(frozen=True)
class StepSettings:
    attention: AttentionBackend
    kv_dtype: torch.dtype
    fused_decoder: bool  # every layer in one C++ op (model/ggml_decoder.py)
    compile: bool
    fast_prefill: bool
    cuda_graphs: bool
    speculative: SpeculativeConfig | None = None


def resolve(model: MiniLLM, config: EngineConfig) -> StepSettings:
    attention = select_attention(config.attention_backend, model.device, model.dtype, head_dim=model.config.head_dim)
    parallel = config.tensor_parallel_size > 1
    # under tensor parallelism each layer's all-reduces sit between the modules: the per-layer path, not the fused op
    fused = attention.name == "paged_cpu" and model.dtype == torch.float32 and GGMLDecoder.fits(model) and not parallel
    kv_dtype = _kv_dtype(model, config, attention)
    if parallel and (config.compile or config.fast_prefill):
        raise ValueError(f"{'compile' if config.compile else 'fast_prefill'} cannot be combined with "
                         f"tensor_parallel_size={config.tensor_parallel_size} yet (a tensor-parallel step runs the "
                         "per-layer modules eagerly, with all-reduces between them); choose one")
    if config.compile and attention.name != "paged_cpu":
        # the other backends lay a packed step out as rows, whose width is known only at run time
        raise ValueError("compile=True needs the 'paged_cpu' attention backend (our C++ kernel: CPU, built with g++); "
                         f"here: {attention.name!r} on {model.device.type}")
    if config.fast_prefill and not fused:
        raise ValueError("fast_prefill runs prompt chunks as GEMMs in the fused GGUF decoder: it needs a GGUF file with "
                         "Llama-shaped layers on its own blocks (dtype unset), on the CPU with the 'paged_cpu' attention "
                         "backend")
    if config.fast_prefill and config.compile:
        raise ValueError("fast_prefill and compile cannot be combined (a compiled step would specialise on where each "
                         "step's prompt rows start); choose one")
    # CUDA graphs for decode steps: the Triton kernels take their sizes from the graph (a torch backend's row
    # layout is sized per step), and RoPE must not depend on the sequence's length
    graphs = (config.cuda_graphs and not config.compile and model.device.type == "cuda" and attention.name == "triton"
              and model.rope.switch_at is None and not parallel)
    return StepSettings(attention, kv_dtype, fused, config.compile, config.fast_prefill, graphs,
                        _speculative(model, config))


def _speculative(model: MiniLLM, config: EngineConfig) -> SpeculativeConfig | None:
    speculative = SpeculativeConfig.parse(config.speculative)
    if speculative is None:
        return None
    if model.rope.switch_at is not None:
        raise ValueError("speculative: this model's RoPE depends on each sequence's length (longrope, dynamic), so a "
                         "draft row's K/V would change once the draft is accepted; run it without speculative")
    if config.fast_prefill:
        raise ValueError("speculative and fast_prefill cannot be combined (fast_prefill would score draft rows as "
                         "prompt rows in bf16, and their tokens would no longer be exact); choose one")
    if config.compile:
        raise ValueError("speculative and compile cannot be combined yet (a speculative step takes the logits of "
                         "several rows per sequence, which the compiled step's warm-up does not trace); choose one")
    return speculative


def _kv_dtype(model: MiniLLM, config: EngineConfig, attention: AttentionBackend) -> torch.dtype:
    if config.kv_cache_dtype is None:
        on_blocks = any(isinstance(module, GGMLLinear) for module in model.modules())
        return torch.float16 if on_blocks and attention.name == "paged_cpu" else model.dtype
    kv_dtype = resolve_dtype(config.kv_cache_dtype)
    if kv_dtype != model.dtype and not (kv_dtype == torch.float16 and model.dtype == torch.float32
                                        and attention.name == "paged_cpu"):
        name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
        raise ValueError(f"kv_cache_dtype={name(kv_dtype)} under {name(model.dtype)} activations: a KV cache in "
                         "another dtype than the model's can only be float16 under float32, with the 'paged_cpu' "
                         f"attention backend (here: {attention.name} on {model.device.type}); leave "
                         "kv_cache_dtype unset for the model's own")
    return kv_dtype
