"""Rotary position embeddings (RoPE), in the "rotate half" layout of HF Llama checkpoints, with the
long-context scalings of the models people run: linear (position interpolation), Llama 3's
wavelength-dependent `llama3`, YaRN, per-frequency divisors (`freq_factors`, what a GGUF file's
`rope_freqs` tensor holds), and two that depend on the sequence's current length L, as transformers
recomputes them per forward pass: Phi-3's `longrope` (long factors once L passes the original context)
and `dynamic` NTK (a larger base as L grows past it). A token's rotation is fixed when its key is
cached, as in transformers' generate. The formulas are transformers' (modeling_rope_utils.py), in float64;
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
    if kind == "dynamic":  # below the original context (the tables): plain; above it: `dynamic_frequencies`
        return inv_freq, 1.0
    original = scaling["original_max_position_embeddings"]
    if kind == "longrope":  # the short factors (inverse_frequencies of {..., "short_factor": long} for the long)
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        return inv_freq / torch.tensor(scaling["short_factor"], dtype=torch.float64), float(attention)
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


def _rows(inv_freq: Tensor, attention: float, start: int, stop: int) -> tuple[Tensor, Tensor]:
    angles = torch.outer(torch.arange(start, stop, dtype=torch.float64, device=inv_freq.device), inv_freq)
    return (angles.cos() * attention).float(), (angles.sin() * attention).float()


# Rows of the tables made at first; each growth doubles them. Made on demand, since a model's whole context is
# tens of MB of tables (131072 positions x 128 values for Llama 3.1 8B, twice that with Gemma's local RoPE)
# where most conversations use a few thousand positions.
_FIRST_ROWS = 4096


class RotaryEmbedding:
    """cos/sin tables for positions 0..max_seq_len-1, kept in float32, made as far as positions are asked for
    (on a GPU: all of them, before the first step, so that a captured graph reads one table).

    A plain object rather than a module buffer, so that casting the model to bf16 never
    rounds the tables; it follows the device of the positions it is asked for.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        self.head_dim, self.max_seq_len, self.theta, self.scaling = head_dim, max_seq_len, theta, scaling or {}
        kind = self.scaling.get("rope_type", "default")
        # longrope / dynamic: frequencies change once the sequence is longer than this
        self.switch_at = self.scaling["original_max_position_embeddings"] if kind in ("longrope", "dynamic") else None
        # Built on the CPU explicitly, so a model constructed under torch.device("meta") still has them.
        with torch.device("cpu"):
            self.frequencies = [inverse_frequencies(head_dim, theta, scaling)]
            if kind == "longrope":
                self.frequencies.append(inverse_frequencies(head_dim, theta, {
                    **self.scaling, "short_factor": self.scaling["long_factor"]}))
            empty = torch.empty(0, head_dim // 2)
        self.cos, self.sin = empty, empty  # [rows made, D / 2]
        self.long = (empty, empty) if kind == "longrope" else None
        self.reserve(_FIRST_ROWS)

    def reserve(self, positions: int) -> None:
        """Tables for at least positions [0, positions), at most max_seq_len. Rows are added in spans that double
        from _FIRST_ROWS, so each row is always computed in the same span: its bits never depend on the order in
        which positions were asked for."""
        while self.cos.shape[0] < min(positions, self.max_seq_len):
            start = self.cos.shape[0]
            stop = min(max(2 * start, _FIRST_ROWS), self.max_seq_len)
            grown = []
            for (cos, sin), frequencies in zip([(self.cos, self.sin), *([self.long] if self.long is not None else [])],
                                               self.frequencies):
                new_cos, new_sin = _rows(*frequencies, start, stop)
                grown.append((torch.cat([cos, new_cos.to(cos.device)]), torch.cat([sin, new_sin.to(sin.device)])))
            (self.cos, self.sin), self.long = grown[0], (grown[1] if self.long is not None else None)

    def tables(self, positions: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin for `positions` [N] -> each [N, head_dim // 2]; `lengths` [N]: each token's sequence
        length so far, for the scalings that depend on it."""
        if positions.device.type != "cpu":
            self.reserve(self.max_seq_len)  # once; a graph captured on the device reads these tables
        elif not torch.compiler.is_compiling() and positions.numel():  # (a compiled step's were made before)
            self.reserve(int(positions.max()) + 1)
        if self.cos.device != positions.device:
            self.cos, self.sin = self.cos.to(positions.device), self.sin.to(positions.device)
            if self.long is not None:
                self.long = tuple(t.to(positions.device) for t in self.long)
        cos, sin = self.cos[positions], self.sin[positions]
        if self.switch_at is None or lengths is None:
            return cos, sin
        beyond = (lengths > self.switch_at).unsqueeze(-1)
        if self.long is not None:
            long_cos, long_sin = self.long[0][positions], self.long[1][positions]
        else:
            long_cos, long_sin = self._dynamic(positions, lengths)
        return torch.where(beyond, long_cos, cos), torch.where(beyond, long_sin, sin)

    def _dynamic(self, positions: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Dynamic NTK: the base for a sequence of length L > M (the original context), per token:
        theta * (factor * L / M - (factor - 1)) ** (D / (D - 2))."""
        factor, dim = float(self.scaling["factor"]), self.head_dim
        length = lengths.double().clamp(min=self.switch_at)
        base = self.theta * (factor * length / self.switch_at - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
        angles = positions.double().unsqueeze(-1) / base.unsqueeze(-1) ** exponents
        return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x [N, H, D] by the angles of each token's position, in float32."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
