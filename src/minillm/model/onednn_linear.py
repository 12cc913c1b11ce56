"""Float32 linear layers on oneDNN's matmul, for the float32 setting on CPU.

`F.linear` goes to MKL's sgemm, which on AMD CPUs runs its slower code paths: measured on a Zen 4
(AVX-512), SmolLM2's gate/up layer (3072 x 576, weights from DRAM) took 628 / 1077 / 2386 µs at
1 / 16 / 64 rows, oneDNN's matmul on the same [out, in] weight 303 / 660 / 1439 µs. Results equal
`nn.Linear`'s up to float summation order (both libraries' per-row sums depend on the row count).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class OneDNNLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight  # the same Parameter: a tied LM head stays tied
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def use_onednn_linears(module: nn.Module) -> nn.Module:
    """Swap, in place, every float32 nn.Linear for a OneDNNLinear (where PyTorch has oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.float32:
            setattr(module, name, OneDNNLinear(child))
        else:
            use_onednn_linears(child)
    return module
