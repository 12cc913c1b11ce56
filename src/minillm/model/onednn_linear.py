"""Float32 linear layers on oneDNN's matmul, for the float32 setting on CPU.

`F.linear` goes to MKL's sgemm, which on AMD CPUs runs its slower code paths; oneDNN's matmul on the
same [out, in] weight is up to twice as fast there (docs/performance.md). Results equal
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
