"""Weight-only quantization, applied by swapping modules after the model is built (as gpt-fast does),
so the model code stays unchanged.

Every linear layer (attention, MLP and the LM head) is swapped; PyTorch's packed-weight CPU
kernels are fast only with bf16 activations, so inputs are cast to bf16 and outputs back.

"int8": int8 weights with one bfloat16 scale per output row (symmetric), `_weight_int8pack_mm`.
"int4": 4-bit weights in groups of 32 along the input, each with a scale and a zero point
  (asymmetric, min/max), `_weight_int4pack_mm_for_cpu`, every layer re-quantized.
"gguf" (a GGUF file's own quantized blocks, our C++ kernels) is swapped in at load instead
(loading/builder.py, kernels/ggml.py). Speeds: benchmarks/results/.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .model.transformer import MiniLLM
from .model.onednn_linear import OneDNNLinear

QUANTIZATION_MODES = ("int8", "int4", "gguf")
INT4_GROUP_SIZE = 32


class Int8WeightOnlyLinear(nn.Module):
    def __init__(self, linear: nn.Linear | OneDNNLinear) -> None:
        super().__init__()
        weight = linear.weight.detach().float().contiguous()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scales[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized_weight(self) -> Tensor:
        """The float32 weight this module computes with (for reference checks)."""
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        out = out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias


class Int4WeightOnlyLinear(nn.Module):
    """4-bit codes [out, in] (0..15) in groups along the input, weight = (code - 8) * scale + offset."""

    def __init__(self, codes: Tensor, scales: Tensor, offsets: Tensor, bias: Tensor | None,
                 group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__()
        rows, cols = codes.shape
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2))
        # the kernel wants [in / group, out, (scale, offset)]
        self.register_buffer("scales_and_zeros",
                             torch.stack([scales, offsets], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.group_size, self.in_features, self.out_features = group_size, cols, rows

    @classmethod
    def from_linear(cls, linear: nn.Linear | OneDNNLinear, group_size: int = INT4_GROUP_SIZE) -> Int4WeightOnlyLinear:
        """Quantize a float layer: each group's minimum is code 0 and its maximum code 15."""
        weight = linear.weight.detach().float().contiguous()
        rows, cols = weight.shape
        groups = weight.view(rows, cols // group_size, group_size)
        low = groups.amin(dim=-1)
        scales = ((groups.amax(dim=-1) - low) / 15).clamp(min=1e-12)
        codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15)
        return cls(codes.view(rows, cols), scales, low + 8 * scales, linear.bias, group_size)

    def dequantized_weight(self) -> Tensor:
        """The float32 weight the kernel computes with: identity input through the kernel."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return self._matmul(eye).float().T.contiguous()

    def _matmul(self, flat: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_and_zeros)

    def forward(self, x: Tensor) -> Tensor:
        out = self._matmul(x.reshape(-1, self.in_features).to(torch.bfloat16))
        out = out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias


def quantize_model(model: MiniLLM, mode: str | None) -> MiniLLM:
    """Swap the model's linear layers for re-quantized ones ("int8", "int4"), in place; None leaves it as it is."""
    if mode is None:
        return model
    if mode not in ("int8", "int4"):
        raise ValueError(f"unknown quantization {mode!r} for a built model; expected 'int8', 'int4' or None "
                         "('gguf' is chosen when loading a GGUF file)")
    if model.device.type != "cpu":
        raise ValueError(f"quantization {mode!r} uses CPU kernels; the model is on {model.device}")
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Linear, OneDNNLinear)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, _quantized(module, mode))
    return model


def int4_fits(linear: nn.Module) -> bool:
    return linear.in_features % INT4_GROUP_SIZE == 0 and linear.out_features % 16 == 0


def _quantized(linear: nn.Linear | OneDNNLinear, mode: str) -> nn.Module:
    if mode == "int4" and int4_fits(linear):  # the packed int4 kernel's shape limits; int8 has none
        return Int4WeightOnlyLinear.from_linear(linear)
    return Int8WeightOnlyLinear(linear)
