"""A GGUF file's model computing with its own quantized blocks (minillm.kernels.ggml), built without
dequantizing them: layers whose type has a kernel become `GGMLLinear` (the token table `GGMLEmbedding`),
float tensors and types without a kernel are dequantized as usual (logged once per type)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..kernels.ggml import KERNEL_TYPES, GGMLEmbedding, GGMLLinear, kernel_weights
from ..model.norm import use_kernel_norms
from ..model.transformer import MiniLLM
from .gguf_file import GGUFCheckpoint
from .weights import ModelLoadError, linear_sources

logger = logging.getLogger("minillm")


def build_quantized_model(checkpoint: GGUFCheckpoint, config: ModelConfig,
                          progress: Callable[[], None] = lambda: None) -> MiniLLM:
    """config must be float32 (activations, norms and the KV cache stay in it)."""
    names = checkpoint.canonical_names(config.num_layers)
    kernel_ids = set(KERNEL_TYPES.values())
    without_kernel: set[str] = set()

    def blocks(canonical: str) -> tuple | None:
        found = checkpoint.blocks(names[canonical], config)
        if found is not None and found[1] not in kernel_ids:
            without_kernel.add(checkpoint.tensors[names[canonical].partition("#")[0]].tensor_type.name)
            return None
        return found

    def dense(canonical: str) -> Tensor:
        tensor = checkpoint.tensor(names[canonical], config) if canonical in names else None
        if tensor is None:
            raise ModelLoadError(f"the checkpoint has no tensor for {canonical!r}")
        return tensor.float()

    def linear(module: str, old: nn.Linear, bias: Tensor | None, swiglu: bool = False) -> nn.Module:
        sources = linear_sources(module, config.tie_embeddings)
        parts = [blocks(name) for name in sources]
        if all(p is not None for p in parts):
            weight, fmt = kernel_weights(parts)
            if weight.shape[0] != old.out_features:
                raise ModelLoadError(f"{module} has {weight.shape[0]} output rows, the config implies {old.out_features}")
            return GGMLLinear(torch.from_numpy(weight), fmt, old.in_features, bias, swiglu)
        new = nn.Linear(old.in_features, old.out_features, bias=bias is not None)
        with torch.no_grad():
            new.weight.copy_(torch.cat([dense(name) for name in sources]))
            if bias is not None:
                new.bias.copy_(bias)
        return new.requires_grad_(False)

    with torch.device("meta"):
        model = MiniLLM(config)
    table = blocks("tok_embeddings.weight")
    if table is None:
        model.tok_embeddings = nn.Embedding.from_pretrained(dense("tok_embeddings.weight"))
    else:
        rows, fmt = kernel_weights([table])
        model.tok_embeddings = GGMLEmbedding(torch.from_numpy(rows), fmt, config.dim_model)
    if config.tie_embeddings and table is not None:  # the LM head reads the same blocks
        model.output = GGMLLinear(model.tok_embeddings.weight, model.tok_embeddings.fmt, config.dim_model)
    elif config.tie_embeddings:
        model.output = nn.Linear(config.dim_model, config.vocab_size, bias=False)
        model.output.weight = model.tok_embeddings.weight
    else:
        model.output = linear("output", model.output, None)
    model.norm.weight = nn.Parameter(dense("norm.weight"), requires_grad=False)
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        layer.attention_norm.weight = nn.Parameter(dense(p + "attention_norm.weight"), requires_grad=False)
        layer.ffn_norm.weight = nn.Parameter(dense(p + "ffn_norm.weight"), requires_grad=False)
        if config.sandwich_norms:
            layer.post_attention_norm.weight = nn.Parameter(dense(p + "post_attention_norm.weight"), requires_grad=False)
            layer.post_ffn_norm.weight = nn.Parameter(dense(p + "post_ffn_norm.weight"), requires_grad=False)
        attn, ffn = layer.attention, layer.feed_forward
        if config.qk_norm:
            attn.q_norm.weight = nn.Parameter(dense(p + "attention.q_norm.weight"), requires_grad=False)
            attn.k_norm.weight = nn.Parameter(dense(p + "attention.k_norm.weight"), requires_grad=False)
        bias = torch.cat([dense(p + f"attention.{w}.bias") for w in ("wq", "wk", "wv")]) if config.qkv_bias else None
        attn.wqkv = linear(p + "attention.wqkv", attn.wqkv, bias)
        attn.wo = linear(p + "attention.wo", attn.wo, None)
        ffn.w13 = linear(p + "feed_forward.w13", ffn.w13, None, swiglu=config.activation == "silu")
        ffn.w2 = linear(p + "feed_forward.w2", ffn.w2, None)
        progress()
    for kind in sorted(without_kernel):
        logger.warning("%s: %s tensors have no quantized kernel; they are dequantized to float32", checkpoint.path.name, kind)
    use_kernel_norms(model)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f"{checkpoint.path.name}: no weights for {', '.join(left)}")
    return model.eval()
