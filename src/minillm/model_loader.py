"""`load_model`: a checkpoint loaded and made ready for the engine's steps, the same way in `LLM` and in every
tensor-parallel worker (parallel/worker.py): re-quantized (int8 / int4), float32 linears on oneDNN, weights in
huge pages."""

from __future__ import annotations

from pathlib import Path

import torch

from .loading import LoadedModel, ModelLoadError, Sharding, load_checkpoint
from .model.onednn_linear import use_onednn_linears
from .quantization import QUANTIZATION_MODES, quantize_model
from .runtime import place_in_huge_pages


def load_model(model: str | Path | None = None, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", quantization: str | None = None, progress: bool = True,
               chat_template: str | None = None, shard: Sharding | None = None,
               with_tokenizer: bool = True) -> LoadedModel:
    """As `LLM`'s arguments (see there); shard: a tensor-parallel rank's share; with_tokenizer False: the
    weights only (a worker)."""
    if quantization == "gguf" and dtype is not None:
        raise ValueError("quantization='gguf' computes with the file's blocks in float32; leave dtype unset")
    if quantization not in (None, *QUANTIZATION_MODES):
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {QUANTIZATION_MODES} or None")
    requantize = quantization in ("int8", "int4")
    if requantize and dtype is None:
        dtype = "float32"  # int8 / int4 re-quantize float weights
    loaded = load_checkpoint(model, dtype=dtype, device=device, progress=progress, chat_template=chat_template,
                             shard=shard, with_tokenizer=with_tokenizer)
    if quantization == "gguf" and not loaded.quantized:
        raise ValueError(f"quantization='gguf' needs a GGUF file on the CPU and the C++ kernels; {loaded.name} "
                         "was loaded dequantized instead")
    if requantize:
        quantize_model(loaded.model, quantization)
    elif not loaded.quantized and loaded.model.device.type == "cpu" and loaded.model.dtype == torch.float32:
        use_onednn_linears(loaded.model)  # MKL is slow on AMD CPUs (model/onednn_linear.py)
    if with_tokenizer and loaded.tokenizer is None:
        raise ModelLoadError(f"{loaded.name} has no tokenizer (tokenizer.json); LLM needs one")
    if loaded.model.device.type == "cpu" and not loaded.quantized:  # (GGUF blocks are loaded into huge pages)
        place_in_huge_pages(loaded.model)  # fewer TLB misses as each decode step streams the weights
    return loaded
