"""Rotary position embeddings (RoPE), in the "rotate half" layout of HF Llama checkpoints, with the
long-context scalings of the models people run: linear (position interpolation), Llama 3's
wavelength-dependent `llama3`, YaRN, and per-frequency divisors (`freq_factors`, what a GGUF file's
`rope_freqs` tensor holds). The formulas are transformers' (modeling_rope_utils.py), in float64;
the accepted types and their keys are checked by `ModelConfig` (config.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[Tensor, float]:
    """Per-pair angular speeds [head_dim / 2] (float64) and the factor cos and sin are multiplied by."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling.get("factor") or 1.0)
    if kind == "linear":  # positions divided by factor
        return inv_freq / factor, 1.0
    if kind == "freq_factors":
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float64), 1.0
    original = scaling["original_max_position_embeddings"]
    if kind == "llama3":  # long wavelengths slowed by factor, short ones kept, a smooth blend between
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, blended, scaled), 1.0
    # yarn: interpolate the slow dimensions, keep the fast ones, ramp between; scale attention up
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all \
            else _yarn_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low if high != low else 0.001)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the original speed), 0: interpolate (divided by factor)
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class RotaryEmbedding:
    """Precomputed cos/sin tables for positions 0..max_seq_len-1, kept in float32.

    A plain object rather than a module buffer, so that casting the model to bf16 never
    rounds the tables; it follows the device of the positions it is asked for.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        # Built on the CPU explicitly, so a model constructed under torch.device("meta") still has them.
        with torch.device("cpu"):
            inv_freq, attention = inverse_frequencies(head_dim, theta, scaling)
            angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.cos = (angles.cos() * attention).float()  # [max_seq_len, head_dim // 2]
        self.sin = (angles.sin() * attention).float()

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
