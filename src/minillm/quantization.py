"""Weight-only quantization, applied by swapping modules after the model is built (as gpt-fast does),
so the model code stays unchanged.

"int8": every linear layer (attention, MLP and the LM head) keeps its weights as int8 with one
bfloat16 scale per output row (symmetric), and multiplies with PyTorch's
`_weight_int8pack_mm`, which is fast on CPU only with bf16 activations: inputs are cast to bf16
and outputs back. Batch-1 decode of SmolLM2-135M on the 2-core CI machine: 57 ms -> 21 ms per
token (measured), at the cost of int8 rounding of the weights and bf16 rounding of the
activations inside each matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .model.transformer import MiniLLM

QUANTIZATION_MODES = ("int8",)


class Int8WeightOnlyLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
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


def quantize_model(model: MiniLLM, mode: str | None) -> MiniLLM:
    """Swap the model's linear layers for quantized ones, in place; None leaves it as it is."""
    if mode is None:
        return model
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"unknown quantization {mode!r}; expected one of {QUANTIZATION_MODES} or None")
    if model.device.type != "cpu":
        raise ValueError(f"quantization {mode!r} uses CPU kernels; the model is on {model.device}")
    _swap_linears(model)
    return model


def _swap_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8WeightOnlyLinear(child))
        else:
            _swap_linears(child)
