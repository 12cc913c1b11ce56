"""RMSNorm, computed in float32 as Llama and HF transformers do (on a GPU, PyTorch's fused kernel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda:  # one fused kernel instead of seven (the weight applied before rounding to x's dtype)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class KernelRMSNorm(RMSNorm):
    """The same in one call of our C++ kernel (float32), swapped in for a model on GGUF blocks. Its
    summation order differs from PyTorch's, so the float32 (HF-parity) setting keeps `RMSNorm`."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.minillm.rms_norm(x, self.weight, self.eps)


def use_kernel_norms(module: nn.Module) -> None:
    """Swap, in place, every RMSNorm under `module` for a KernelRMSNorm with the same weight."""
    for name, child in module.named_children():
        if type(child) is RMSNorm:
            kernel = KernelRMSNorm(child.weight.numel(), child.eps)
            kernel.weight = child.weight
            setattr(module, name, kernel)
        else:
            use_kernel_norms(child)
