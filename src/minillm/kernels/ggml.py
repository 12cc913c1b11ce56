"""GGUF quantized weights computed on the file's own blocks, by our C++ kernels (csrc/ggml_matmul.cpp).

Every type in KERNEL_TYPES keeps its bits: a tensor's rows are only interleaved in groups of 16 at load
(`repack`, csrc/ggml_formats.h), so that the kernels compute 16 rows per vector instruction (F16 and BF16
rows stay as stored: csrc/ggml_float.h); a tensor takes the bytes it takes in the file. A linear layer
stacking tensors of different types (Q/K/V or gate/up in a Q4_K_M file) keeps one part per tensor. An
embedding table that is not also the LM head is read as stored. Other types have no kernel: the builder
keeps a dequantized float layer and says what that costs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# the GGML types our kernels compute on: name -> type id
KERNEL_TYPES = {"F16": 1, "BF16": 30, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10,
                "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ4_NL": 20, "IQ4_XS": 23}


def repack(raw: Tensor, fmt: int, out: Tensor | None = None) -> Tensor:
    """Rows of file blocks [rows, bytes] (uint8) -> the kernels' interleaved layout in `out` (uint8, as many
    bytes; default: a new tensor), shaped as `raw`."""
    out = torch.empty_like(raw) if out is None else out.view(raw.shape)
    torch.ops.minillm.ggml_repack(raw, fmt, out)
    return out


class GGMLLinear(nn.Module):
    """y = x W^T (+ b) on quantized tensors stacked by output rows ([out_i, bytes] each, as `repack` returns
    them, with their GGML types); float32 in and out.

    With `swiglu`, the rows are gate then up (as FeedForward.w13) and the layer returns
    silu(gate) * up, fused in the kernel (see GGMLFeedForward)."""

    def __init__(self, parts: list[tuple[Tensor, int]], in_features: int, bias: Tensor | None = None,
                 swiglu: bool = False) -> None:
        super().__init__()
        for i, (weight, _) in enumerate(parts):
            self.register_buffer(f"weight_{i}", weight, persistent=False)
        self.formats = [fmt for _, fmt in parts]
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.in_features, self.out_features = in_features, sum(weight.shape[0] for weight, _ in parts)
        self.applies_swiglu = swiglu

    @property
    def weights(self) -> list[Tensor]:
        return [getattr(self, f"weight_{i}") for i in range(len(self.formats))]

    @property
    def parts(self) -> list[tuple[Tensor, int]]:
        return list(zip(self.weights, self.formats))

    def forward(self, x: Tensor) -> Tensor:
        # every row on the exact int8 kernel (-1: no GEMM rows); fast_prefill's GEMM runs in the fused decoder
        return torch.ops.minillm.ggml_linear(x.float(), self.weights, self.formats, self.in_features, self.bias,
                                             self.applies_swiglu, -1)

    def dequantized_weight(self) -> Tensor:
        """The float32 [out, in] weight the kernel computes with."""
        return torch.cat([torch.ops.minillm.ggml_dequantize_rows(weight, fmt, self.in_features,
                                                                 torch.arange(weight.shape[0]))
                          for weight, fmt in self.parts])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, formats={self.formats}, "
                f"swiglu={self.applies_swiglu}")


class GGMLFeedForward(nn.Module):
    """FeedForward (SwiGLU) whose gate/up layer applies silu(gate) * up in its kernel: swapped in for the
    model's FeedForward when that layer is on GGUF blocks (w2 may be too, or a dequantized nn.Linear)."""

    def __init__(self, w13: GGMLLinear, w2: nn.Module) -> None:
        super().__init__()
        self.w13 = GGMLLinear(w13.parts, w13.in_features, w13.bias, swiglu=True)  # the same blocks
        self.w2 = w2

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.w13(x))


class GGMLEmbedding(nn.Module):
    """Token embeddings looked up in a quantized table: only the rows asked for are dequantized. The table is
    the file's own rows (`interleaved=False`, read from the memory map) or, when the LM head shares it, the
    head's interleaved blocks."""

    def __init__(self, weight: Tensor, fmt: int, dim: int, interleaved: bool) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.fmt, self.embedding_dim, self.num_embeddings = fmt, dim, weight.shape[0]
        self.interleaved = interleaved

    def forward(self, ids: Tensor) -> Tensor:
        rows = torch.ops.minillm.ggml_dequantize_rows(self.weight, self.fmt, self.embedding_dim, ids.reshape(-1),
                                                      self.interleaved)
        return rows.view(*ids.shape, self.embedding_dim)


__all__ = ["GGMLEmbedding", "GGMLFeedForward", "GGMLLinear", "KERNEL_TYPES", "repack"]
