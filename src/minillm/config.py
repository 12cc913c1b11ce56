"""Model hyper-parameters (`ModelConfig`) and named presets (`Configs`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name ("float32", "bf16", ...) or a torch dtype to a floating torch dtype."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


# RoPE scaling types (model/rope.py) -> the keys each needs besides "rope_type"
ROPE_SCALINGS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "freq_factors": ("factors",),  # a divisor per frequency (a GGUF file's rope_freqs tensor)
    # by the sequence's current length (as transformers, per forward): Phi-3's short / long factors, and
    # dynamic NTK, whose base grows past original_max_position_embeddings
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "dynamic": ("factor", "original_max_position_embeddings"),
}


def check_rope_scaling(scaling: dict[str, Any] | None, head_dim: int) -> None:
    """A ValueError naming what is wrong; an unknown type is refused, never ignored (it changes the math)."""
    if scaling is None:
        return
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"RoPE scaling {kind!r} is not supported (supported: {', '.join(ROPE_SCALINGS)})")
    missing = [key for key in ROPE_SCALINGS[kind] if scaling.get(key) is None]
    if missing:
        raise ValueError(f"RoPE scaling {kind!r} needs {', '.join(missing)}")
    for key in ("factors", "short_factor", "long_factor"):
        if key in scaling and len(scaling[key]) != head_dim // 2:
            raise ValueError(f"RoPE {key} has {len(scaling[key])} values for head_dim {head_dim} "
                             f"({head_dim // 2} frequencies)")


def _llama_hidden_dim(dim: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder.

    Only the first five fields are required; the rest default to Llama conventions.
    `num_kv_heads < num_heads` gives grouped-query attention; `qkv_bias` is Qwen2's bias on q/k/v;
    `qk_norm` is Qwen3's RMSNorm of each head's query and key before RoPE; `sliding_window` is Mistral's
    sliding-window attention (a token sees its last that many tokens); `rope_scaling` is a dict in
    transformers' form ({"rope_type": "llama3" | "linear" | "yarn" | "freq_factors", ...}; None: plain RoPE).
    """

    dim_model: int
    num_heads: int
    num_layers: int
    max_seq_len: int
    vocab_size: int
    num_kv_heads: int | None = None  # None: same as num_heads (multi-head attention)
    hidden_dim: int | None = None  # None: Llama's 8/3 * dim rounded up to 256
    head_dim: int | None = None  # None: dim_model // num_heads
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None  # Mistral: each token attends to its last `sliding_window` tokens
    sliding_layers: list[bool] | None = None  # which layers the window applies to (None: all; Gemma 2: every other)
    # Gemma 2: GeGLU, embeddings times sqrt(dim), norms after attention and MLP too, its own softmax scale,
    # attention and final logits soft-capped
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embedding_multiplier: float = 1.0
    sandwich_norms: bool = False
    attention_scale: float | None = None  # None: head_dim ** -0.5
    attention_softcap: float | None = None
    final_softcap: float | None = None
    local_rope_theta: float | None = None  # Gemma 3: the sliding-window layers' own RoPE base (no scaling)
    dtype: str | torch.dtype = "float32"

    def __post_init__(self) -> None:
        for name in ("dim_model", "num_heads", "num_layers", "max_seq_len", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_kv_heads <= 0:
            raise ValueError(f"num_kv_heads must be positive, got {self.num_kv_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim is None:
            if self.dim_model % self.num_heads:
                raise ValueError(
                    f"dim_model ({self.dim_model}) must be divisible by num_heads ({self.num_heads})"
                )
            self.head_dim = self.dim_model // self.num_heads
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even number (RoPE rotates pairs), got {self.head_dim}")
        if self.hidden_dim is None:
            self.hidden_dim = _llama_hidden_dim(self.dim_model)
        if self.hidden_dim <= 0:
            raise ValueError(f"hidden_dim must be positive, got {self.hidden_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        check_rope_scaling(self.rope_scaling, self.head_dim)
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.sliding_layers is not None and len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"activation must be 'silu' or 'gelu_tanh', got {self.activation!r}")
        resolve_dtype(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)

    def num_parameters(self) -> int:
        """Parameter count of `MiniLLM(self)`, computed from the shapes (tested against the real module)."""
        d, hd, h, hkv = self.dim_model, self.head_dim, self.num_heads, self.num_kv_heads
        qkv_out = (h + 2 * hkv) * hd
        attention = d * qkv_out + (qkv_out if self.qkv_bias else 0) + h * hd * d + (2 * hd if self.qk_norm else 0)
        mlp = 3 * d * self.hidden_dim
        per_layer = attention + mlp + (4 if self.sandwich_norms else 2) * d  # RMSNorm weights
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + d  # + final norm


class Configs:
    """Named presets. Parameter counts (untied embeddings, vocab 32000) are from `num_parameters()`:

    ======== ====== ===== ====== ====== ======== ==================
    preset   dim    heads layers hidden kv heads params
    ======== ====== ===== ====== ====== ======== ==================
    tiny     64     4     2      192    2        0.16 M (vocab 512)
    small    512    8     8      1536   8        60.0 M
    medium   1024   16    16     2816   16       271.1 M
    large    2048   32    22     5632   8        1.12 B
    ======== ====== ===== ====== ====== ======== ==================
    """

    @staticmethod
    def tiny(**overrides) -> ModelConfig:
        """For tests: two layers, grouped-query heads, small vocabulary."""
        base = dict(dim_model=64, num_heads=4, num_kv_heads=2, num_layers=2, hidden_dim=192,
                    max_seq_len=256, vocab_size=512)
        return ModelConfig(**{**base, **overrides})

    @staticmethod
    def small(**overrides) -> ModelConfig:
        base = dict(dim_model=512, num_heads=8, num_layers=8, hidden_dim=1536,
                    max_seq_len=2048, vocab_size=32000)
        return ModelConfig(**{**base, **overrides})

    @staticmethod
    def medium(**overrides) -> ModelConfig:
        base = dict(dim_model=1024, num_heads=16, num_layers=16, hidden_dim=2816,
                    max_seq_len=4096, vocab_size=32000)
        return ModelConfig(**{**base, **overrides})

    @staticmethod
    def large(**overrides) -> ModelConfig:
        """TinyLlama-1.1B's shape: 22 layers, GQA with 8 KV heads."""
        base = dict(dim_model=2048, num_heads=32, num_kv_heads=8, num_layers=22, hidden_dim=5632,
                    max_seq_len=4096, vocab_size=32000)
        return ModelConfig(**{**base, **overrides})
