"""GGUF checkpoints (llama.cpp's format), read with the `gguf` package.

Hyper-parameters, tokenizer and chat template come from the file's metadata; tensors are either
dequantized to float32 by `gguf.quants.dequantize` (`tensor`) or kept as their blocks (`blocks`, for
our quantized kernels). llama.cpp's converter permutes the rows of the
Q and K projections of `llama` models (for its interleaved RoPE); that permutation is undone here
so the weights fit our (Hugging Face) rotate-half RoPE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from .gguf_reader import GGUFFile
from .weights import ModelLoadError, checkpoint_names

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
GEMMA = ("gemma2", "gemma3")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# canonical name -> GGUF name ({i} is the layer index)
_LAYER_NAMES = {
    "attention_norm": "blk.{i}.attn_norm.weight",
    "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight",
    "bq": "blk.{i}.attn_q.bias",
    "bk": "blk.{i}.attn_k.bias",
    "bv": "blk.{i}.attn_v.bias",
    "wo": "blk.{i}.attn_output.weight",
    "q_norm": "blk.{i}.attn_q_norm.weight",
    "k_norm": "blk.{i}.attn_k_norm.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "w1": "blk.{i}.ffn_gate.weight",
    "w2": "blk.{i}.ffn_down.weight",
    "w3": "blk.{i}.ffn_up.weight",
}
# llama.cpp's Gemma files: norms before and after attention and the MLP, each stored as (1 + w) already
_GEMMA_NAMES = {**_LAYER_NAMES, "post_attention_norm": "blk.{i}.post_attention_norm.weight",
                "post_ffn_norm": "blk.{i}.post_ffw_norm.weight"}
# Phi-3: q/k/v in one attn_qkv, gate then up in one ffn_up ("#part" names a slice of their rows)
_PHI3_NAMES = {**_LAYER_NAMES, **{w: "blk.{i}.attn_qkv.weight#" + w[1] for w in ("wq", "wk", "wv")},
               "w1": "blk.{i}.ffn_up.weight#0", "w3": "blk.{i}.ffn_up.weight#1"}
_GLOBAL_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                 "output.weight": "output.weight"}


class GGUFCheckpoint:
    """An open GGUF file: its metadata as plain values and its tensors by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.reader = GGUFFile(self.path)
        except Exception as err:  # struct.error, ValueError, ... on damaged files
            raise ModelLoadError(f"{self.path} is not a readable GGUF file ({type(err).__name__}: {err})") from None
        self.tensors = self.reader.tensors
        self.architecture = self.meta("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{self.path.name}: architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def meta(self, key: str, default: Any = None) -> Any:
        return self.reader.fields.get(key, default)

    def arch_meta(self, key: str, default: Any = None) -> Any:
        return self.meta(f"{self.architecture}.{key}", default)

    def model_config(self, dtype: str | torch.dtype) -> ModelConfig:
        arch = self.arch_meta
        required = {"embedding_length": arch("embedding_length"), "attention.head_count": arch("attention.head_count"),
                    "block_count": arch("block_count"), "feed_forward_length": arch("feed_forward_length")}
        missing = [k for k, v in required.items() if v is None]
        if missing:
            raise ModelLoadError(f"{self.path.name}: metadata lacks {', '.join(f'{self.architecture}.{k}' for k in missing)}")
        dim, heads = required["embedding_length"], required["attention.head_count"]
        if "token_embd.weight" not in self.tensors:
            raise ModelLoadError(f"{self.path.name}: the checkpoint has no tensor 'token_embd.weight'")
        vocab = int(self.tensors["token_embd.weight"].shape[1])  # GGUF shape is [dim, vocab]
        scaling = self._rope_scaling()
        layers, gemma = required["block_count"], self.architecture in GEMMA
        head_dim = arch("attention.key_length", dim // heads)
        window, pattern = arch("attention.sliding_window"), arch("attention.sliding_window_pattern")
        if self.architecture == "gemma2":
            window, pattern = window or 4096, pattern or 2
        elif self.architecture == "gemma3":
            pattern = pattern or 6
        else:  # llama.cpp ignores a window in the files of other architectures (Phi-3 writes 0)
            window = None
        if gemma and window:
            sliding = [i % pattern < pattern - 1 for i in range(layers)]  # llama.cpp's rule: the last of each period is global
        else:
            sliding = None
        # llama.cpp's Gemma attention scale: 1/sqrt(dim/heads) for the 27B models (46 / 62 layers), 1/sqrt(head_dim) else
        scale = (dim / heads if layers in (46, 62) else head_dim) ** -0.5 if gemma else None
        try:
            return ModelConfig(
                dim_model=dim,
                num_heads=heads,
                num_kv_heads=arch("attention.head_count_kv", heads),
                num_layers=required["block_count"],
                hidden_dim=required["feed_forward_length"],
                head_dim=head_dim,
                max_seq_len=arch("context_length", 2048),
                vocab_size=vocab,
                rope_theta=float(arch("rope.freq_base", 10000.0)),
                norm_eps=float(arch("attention.layer_norm_rms_epsilon", 1e-5)),
                tie_embeddings="output.weight" not in self.tensors,
                qkv_bias="blk.0.attn_q.bias" in self.tensors,
                qk_norm="blk.0.attn_q_norm.weight" in self.tensors,
                rope_scaling=scaling,
                sliding_window=window or None,
                sliding_layers=sliding,
                activation="gelu_tanh" if gemma else "silu",
                embedding_multiplier=dim ** 0.5 if gemma else 1.0,
                sandwich_norms=gemma,
                attention_scale=scale,
                attention_softcap=(arch("attn_logit_softcapping") or 50.0) if self.architecture == "gemma2" else None,
                final_softcap=(arch("final_logit_softcapping") or 30.0) if self.architecture == "gemma2"
                else arch("final_logit_softcapping"),
                local_rope_theta=float(arch("rope.freq_base_swa", 10000.0)) if self.architecture == "gemma3" and window
                else None,
                dtype=dtype,
            )
        except ValueError as err:  # a ModelConfig rule
            raise ModelLoadError(f"{self.path.name}: {err}") from None

    def _rope_scaling(self) -> dict[str, Any] | None:
        """llama.cpp's RoPE settings in transformers' form: a `rope_freqs` tensor (Llama 3.1's frequency
        divisors, as its converter bakes them), Phi-3's `rope_factors_long/short`, or rope.scaling.type
        linear / yarn; other types are refused."""
        kind, factor = self.arch_meta("rope.scaling.type"), self.arch_meta("rope.scaling.factor")
        if "rope_factors_long.weight" in self.tensors:  # Phi-3's longrope, as llama.cpp's converter stores it
            short, long = (self._vector(f"rope_factors_{k}.weight") for k in ("short", "long"))
            original = self.arch_meta("rope.scaling.original_context_length")
            scaling = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
                       "original_max_position_embeddings": original,
                       "factor": self.arch_meta("context_length", original) / original}
            if self.arch_meta("rope.scaling.attn_factor") is not None:
                scaling["attention_factor"] = float(self.arch_meta("rope.scaling.attn_factor"))
            return scaling
        if "rope_freqs.weight" in self.tensors:
            if kind not in (None, "none"):
                raise ModelLoadError(f"{self.path.name}: both rope_freqs and RoPE scaling {kind!r}; not supported")
            return {"rope_type": "freq_factors", "factors": self._vector("rope_freqs.weight")}
        if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(factor)}
        if kind == "yarn":
            yarn = {"beta_fast": self.arch_meta("rope.scaling.yarn_beta_fast"),
                    "beta_slow": self.arch_meta("rope.scaling.yarn_beta_slow")}
            return {"rope_type": "yarn", "factor": float(factor),
                    "original_max_position_embeddings": self.arch_meta("rope.scaling.original_context_length"),
                    **{k: float(v) for k, v in yarn.items() if v is not None}}
        raise ModelLoadError(f"{self.path.name}: RoPE scaling {kind!r} is not supported (supported: linear, yarn, "
                             "Llama 3.1's rope_freqs and Phi-3's rope_factors_long/short)")

    def _vector(self, name: str) -> list[float]:
        import gguf

        info = self.tensors[name]
        return gguf.quants.dequantize(info.data, info.tensor_type).reshape(-1).tolist()

    def canonical_names(self, num_layers: int) -> dict[str, str]:
        layers = _PHI3_NAMES if self.architecture == "phi3" else _GEMMA_NAMES if self.architecture in GEMMA else _LAYER_NAMES
        return checkpoint_names(_GLOBAL_NAMES, layers, num_layers)

    def _rows(self, part: str, rows: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        """A "#part" slice of a fused tensor's output rows (anything laid out by row: weights, blocks)."""
        if not part:
            return rows
        if part in "01":  # gate, up
            return rows.chunk(2)[int(part)]
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        return rows.split([q, kv, kv])["qkv".index(part)]

    def tensor(self, name: str, config: ModelConfig) -> torch.Tensor | None:
        """Dequantized float32 tensor in PyTorch's [out, in] layout, or None if absent."""
        import gguf

        name, _, part = name.partition("#")
        info = self.tensors.get(name)
        if info is None:
            return None
        kind = info.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise ModelLoadError(f"{self.path.name}: tensor {name} has type {kind}, which is not supported "
                                 f"(supported: {', '.join(SUPPORTED_TYPES)})")
        try:
            data = gguf.quants.dequantize(info.data, info.tensor_type)
        except Exception as err:
            raise ModelLoadError(f"{self.path.name}: tensor {name} ({kind}) could not be read: {err}") from None
        # GGUF lists dimensions innermost first; numpy's layout is the reverse.
        data = np.ascontiguousarray(data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(info.shape)))
        if not data.flags.writeable:  # F32 tensors are views of the read-only memory map
            data = data.copy()
        return self._rows(part, self._rope_rows_in_hf_order(name, torch.from_numpy(data), config), config)

    def _rope_rows_in_hf_order(self, name: str, rows: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        """Undo llama.cpp's Q/K row permutation on anything laid out by output row (weights, codes, scales)."""
        if self.architecture == "llama" and (".attn_q." in name or ".attn_k." in name):
            return unpermute_rope_rows(rows, config.num_heads if ".attn_q." in name else config.num_kv_heads)
        return rows

    def blocks(self, name: str, config: ModelConfig) -> tuple[np.ndarray, int] | None:
        """A quantized tensor's own blocks, one row of bytes per output feature ([out, bytes], in our
        row order), and its GGML type id; None if the tensor is absent or not quantized."""
        name, _, part = name.partition("#")
        info = self.tensors.get(name)
        if info is None or info.tensor_type.name in ("F32", "F16", "BF16"):
            return None
        import gguf

        cols, rows = (int(d) for d in (*info.shape, 1)[:2])
        per, size = gguf.GGML_QUANT_SIZES[info.tensor_type]
        if len(info.shape) != 2 or cols % per or info.data.size != rows * cols // per * size:
            raise ModelLoadError(f"{self.path.name}: tensor {name} ({info.tensor_type.name}, shape "
                                 f"{[int(d) for d in info.shape]}) holds {info.data.size} bytes, which do not fit its shape")
        raw = np.array(info.data, dtype=np.uint8).reshape(rows, cols // per * size)  # a copy: the map is read-only
        rows_in_order = self._rope_rows_in_hf_order(name, torch.from_numpy(raw), config)
        return np.ascontiguousarray(self._rows(part, rows_in_order, config).numpy()), int(info.tensor_type)


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row order (pairs interleaved) back to HF's rotate-half order.

    llama.cpp's converter maps rows [h, 2, D/2] -> [h, D/2, 2]; this maps them back.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
