"""A GGUF model's decoder as one C++ op per step (kernels/csrc/decoder_layer.cpp), chosen once by the
model runner where it applies: layers whose matmuls are all on GGUF blocks (`GGMLLinear`), float32
activations, our paged attention kernel on the CPU. Llama layers and their relatives' (Qwen2 / 3, Mistral,
Phi-3, Gemma 2 / 3: per-head q/k norms, sandwich norms, GeGLU, soft-capped scores, local RoPE tables).

The op runs the same kernels in the same order as the modules (so the same bits), without the Python
module calls and op dispatches of ~10 small steps a layer, which at batch 1 cost as much as a small
model's matmuls. Only it runs fast_prefill's bf16 GEMM on prompt rows (`PagedStep.gemm_from`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..cache.paged_cache import PagedStep
from ..kernels.ggml import GGMLLinear
from .transformer import MiniLLM


class GGMLDecoder(nn.Module):
    def __init__(self, model: MiniLLM) -> None:
        if not self.fits(model):
            raise ValueError("GGMLDecoder needs decoder layers whose matmuls are all on GGUF blocks")
        super().__init__()
        self.model = model
        norms, weights, formats, parts, biases, windows, local = [], [], [], [], [], [], []
        for block in model.layers:  # gathered once: the op takes every layer's tensors as lists
            attention, mlp = block.attention, block.feed_forward
            linears = (attention.wqkv, attention.wo, mlp.w13, mlp.w2)
            extra = [attention.q_norm, attention.k_norm, block.post_attention_norm, block.post_ffn_norm]
            norms += [block.attention_norm.weight, block.ffn_norm.weight] + [n.weight for n in extra if n is not None]
            for linear in linears:
                weights += linear.weights
                formats += linear.formats
                parts.append(len(linear.formats))
            biases.append(attention.wqkv.bias)
            windows.append(attention.settings.window)
            local.append(int(attention.local_rope))
        config = model.config
        self.layer_arguments = (norms, weights, formats, parts, biases, config.norm_eps)
        scale = config.head_dim ** -0.5 if config.attention_scale is None else config.attention_scale
        self.head_arguments = (config.num_heads, config.num_kv_heads, scale)
        self.windows, self.local_rope = windows, local
        self.variant = (config.qk_norm, config.sandwich_norms, config.activation == "gelu_tanh",
                        config.attention_softcap or 0.0)

    @staticmethod
    def fits(model: MiniLLM) -> bool:
        return all(
            isinstance(linear, GGMLLinear) for block in model.layers for linear in
            (block.attention.wqkv, block.attention.wo, block.feed_forward.w13, block.feed_forward.w2))

    def forward(self, input_ids: Tensor, step: PagedStep, *, last_token_only: bool = False) -> Tensor:
        """As `MiniLLM.forward` on a step (float32 logits)."""
        model = self.model
        ctx = model.step_context(step)
        h = torch.ops.minillm.decoder_layers(
            model.embed(input_ids), *self.layer_arguments, ctx.cos, ctx.sin, ctx.local_cos, ctx.local_sin, step.cache.k,
            step.cache.v, step.slot_index, step.block_table, step.seqlens, step.query_start, *self.head_arguments,
            self.windows, self.local_rope, *self.variant, step.gemm_from)
        return model.logits(h, step, last_token_only)
