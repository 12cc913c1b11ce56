"""A float linear layer that stores its weight transposed, for faster one-token decode on CPU.

Measured on the 2-core CI machine with model-sized working sets, one token (M=1): MKL's
`x @ W^T`-with-W^T-contiguous is 33-40 % faster than `F.linear` for layers that widen
(out > in: SmolLM2's qkv 960x576, gate/up 1536x576, and the 49152x576 LM head 10.1 -> 6.4 ms), and
about equal for square layers, but 27 % slower for layers that narrow (down 576x1536). So only
widening layers are swapped. Results equal `nn.Linear` up to float summation order.
"""

from __future__ import annotations

from torch import Tensor, nn


class TransposedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # [in, out]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> Tensor:
        """The usual [out, in] weight (a view), so code written for nn.Linear can read it."""
        return self.weight_t.t()

    def forward(self, x: Tensor) -> Tensor:
        out = x @ self.weight_t
        return out if self.bias is None else out + self.bias


def transpose_widening_linears(module: nn.Module) -> nn.Module:
    """Swap, in place, every nn.Linear with more outputs than inputs for a TransposedLinear."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and child.out_features > child.in_features:
            setattr(module, name, TransposedLinear(child))
        else:
            transpose_widening_linears(child)
    return module
