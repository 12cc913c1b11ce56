"""Rotary position embeddings (RoPE), in the "rotate half" layout of HF Llama checkpoints."""

from __future__ import annotations

import torch
from torch import Tensor


class RotaryEmbedding:
    """Precomputed cos/sin tables for positions 0..max_seq_len-1, kept in float32.

    A plain object rather than a module buffer, so that casting the model to bf16 never
    rounds the tables; it follows the device of the positions it is asked for.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        # Built on the CPU explicitly, so a model constructed under torch.device("meta") still has them.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim
        inv_freq = 1.0 / (theta**exponents)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64, device="cpu"), inv_freq)
        self.cos = angles.cos().float()  # [max_seq_len, head_dim // 2]
        self.sin = angles.sin().float()

    def tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin for `positions` [N] -> each [N, head_dim // 2]."""
        if self.cos.device != positions.device:
            self.cos, self.sin = self.cos.to(positions.device), self.sin.to(positions.device)
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x [N, H, D] by the angles of each token's position, in float32."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
