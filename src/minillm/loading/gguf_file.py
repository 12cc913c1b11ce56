"""GGUF checkpoints (llama.cpp's format), read with the `gguf` package.

Hyper-parameters, tokenizer and chat template come from the file's metadata; tensors are either
dequantized to float32 by `gguf.quants.dequantize` (`tensor`) or kept as their blocks (`blocks`, for
our quantized kernels). llama.cpp's converter permutes the rows of the
Q and K projections of `llama` models (for its interleaved RoPE); that permutation is undone here
so the weights fit our (Hugging Face) rotate-half RoPE.
"""

from __future__ import annotations

import logging
import re
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from .architectures import gguf_architecture, sliding_layers, supported
from .errors import ModelLoadError
from .gguf_reader import GGUFFile, TensorInfo
from .tensor_part import TensorPart, select

logger = logging.getLogger("minillm")

# Positions the RoPE tables are built for, at most: 2^20 x head_dim x 8 bytes (a few hundred MB). A header's
# context_length beyond it (a crafted 2^31 would ask for 16 GB of tables) serves this many positions.
MAX_CONTEXT = 1 << 20
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                   "IQ4_NL", "IQ4_XS")
DENSE_TYPES = ("F32",)  # every other type can stay as stored: its rows of bytes are `blocks`


class GGUFMetadata:
    """An open GGUF file's metadata as plain values, whatever its architecture (enough for its tokenizer;
    a vocabulary-only file has nothing else)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.reader = GGUFFile(self.path)
        except Exception as err:  # struct.error, ValueError, ... on damaged files
            raise ModelLoadError(f"{self.path} is not a readable GGUF file ({type(err).__name__}: {err})") from None
        self.name = self.path.name
        self.architecture = self.meta("general.architecture")

    def meta(self, key: str, default: Any = None) -> Any:
        return self.reader.field(key, default)


class GGUFCheckpoint(GGUFMetadata):
    """An open GGUF file of a supported architecture: its metadata and its tensors by name."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.tensors = self.reader.tensors
        arch = gguf_architecture(self.architecture)
        if arch is None:
            raise ModelLoadError(f"{self.path.name}: architecture {self.architecture!r} is not supported "
                                 f"(supported: {supported('gguf')})")
        self.arch, self.tensor_table = arch, arch.gguf_tensors

    def arch_meta(self, key: str, default: Any = None) -> Any:
        return self.meta(f"{self.architecture}.{key}", default)

    def model_config(self, dtype: str | torch.dtype) -> ModelConfig:
        arch = self.arch_meta
        required = {"embedding_length": arch("embedding_length"), "attention.head_count": arch("attention.head_count"),
                    "block_count": arch("block_count"), "feed_forward_length": arch("feed_forward_length")}
        missing = [k for k, v in required.items() if v is None]
        if missing:
            raise ModelLoadError(f"{self.path.name}: metadata lacks {', '.join(f'{self.architecture}.{k}' for k in missing)}")
        self._check_sizes(required)
        dim, heads = required["embedding_length"], required["attention.head_count"]
        if "token_embd.weight" not in self.tensors:
            raise ModelLoadError(f"{self.path.name}: the checkpoint has no tensor 'token_embd.weight'")
        vocab = int(self.tensors["token_embd.weight"].shape[1])  # GGUF shape is [dim, vocab]
        scaling, layers, a = self._rope_scaling(), required["block_count"], self.arch
        head_dim = arch("attention.key_length", dim // heads)
        window = (arch("attention.sliding_window") or a.default_window) if a.sliding_window else None
        pattern = arch("attention.sliding_window_pattern") or a.window_pattern
        scale = (dim / heads if layers in a.wide_scale_layers else head_dim) ** -0.5 if a.gemma else None
        attention_cap, final_cap = a.softcaps or (None, None)
        try:
            return ModelConfig(
                dim_model=dim,
                num_heads=heads,
                num_kv_heads=arch("attention.head_count_kv", heads),
                num_layers=required["block_count"],
                hidden_dim=required["feed_forward_length"],
                head_dim=head_dim,
                max_seq_len=self._context(),
                vocab_size=vocab,
                rope_theta=float(arch("rope.freq_base", 10000.0)),
                norm_eps=float(arch("attention.layer_norm_rms_epsilon", 1e-5)),
                tie_embeddings="output.weight" not in self.tensors,
                qkv_bias=a.qkv_bias or "blk.0.attn_q.bias" in self.tensors,
                qk_norm=a.qk_norm,
                rope_scaling=scaling,
                sliding_window=window or None,
                sliding_layers=sliding_layers(pattern, layers) if window else None,
                activation="gelu_tanh" if a.gemma else "silu",
                embedding_multiplier=dim ** 0.5 if a.gemma else 1.0,
                sandwich_norms=a.gemma,
                attention_scale=scale,
                attention_softcap=(arch("attn_logit_softcapping") or attention_cap) if a.softcaps else None,
                final_softcap=arch("final_logit_softcapping") or final_cap,
                local_rope_theta=float(arch("rope.freq_base_swa", 10000.0)) if a.local_rope and window else None,
                dtype=dtype,
            )
        except ValueError as err:  # a ModelConfig rule
            raise ModelLoadError(f"{self.path.name}: {err}") from None

    def _check_sizes(self, required: dict[str, Any]) -> None:
        """Sizes that are positive integers, and a layer count the file's tensors bear out, before anything is
        sized by them (a crafted header must not start a billion-layer build)."""
        optional = {k: self.arch_meta(k) for k in ("attention.head_count_kv", "attention.key_length", "context_length")}
        for key, value in {**required, **optional}.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ModelLoadError(f"{self.path.name}: {self.architecture}.{key} must be a positive integer, "
                                     f"got {str(value)[:40]!r}")
        layers = {int(name.split(".")[1]) for name in self.tensors if re.match(r"blk\.\d+\.", name)}
        if len(layers) != required["block_count"] or max(layers, default=-1) != len(layers) - 1:  # not 0 .. n - 1
            raise ModelLoadError(f"{self.path.name}: {self.architecture}.block_count is {required['block_count']}, but "
                                 f"the file holds tensors for {len(layers)} layers")

    def _context(self) -> int:
        context = self.arch_meta("context_length", 2048)
        if context > MAX_CONTEXT:
            logger.warning("%s: context_length %d is beyond %d positions; serving %d", self.path.name, context,
                           MAX_CONTEXT, MAX_CONTEXT)
        return min(context, MAX_CONTEXT)

    def _rope_scaling(self) -> dict[str, Any] | None:
        """llama.cpp's RoPE settings in transformers' form: a `rope_freqs` tensor (Llama 3.1's frequency
        divisors, as its converter bakes them), Phi-3's `rope_factors_long/short`, or rope.scaling.type
        linear / yarn; other types are refused."""
        kind, factor = self.arch_meta("rope.scaling.type"), self.arch_meta("rope.scaling.factor")
        if "rope_factors_long.weight" in self.tensors:  # Phi-3's longrope, as llama.cpp's converter stores it
            short, long = (self._vector(f"rope_factors_{k}.weight") for k in ("short", "long"))
            original = self.arch_meta("rope.scaling.original_context_length")
            # llama.cpp scales cos/sin by rope.scaling.attn_factor (its converter writes transformers' value),
            # and by 1 where a file lacks it: not by the factor transformers would derive
            return {"rope_type": "longrope", "short_factor": short, "long_factor": long,
                    "original_max_position_embeddings": original,
                    "factor": self.arch_meta("context_length", original) / original,
                    "attention_factor": float(self.arch_meta("rope.scaling.attn_factor", 1.0))}
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

    def tensor(self, name: str, config: ModelConfig, part: TensorPart | None = None) -> torch.Tensor | None:
        """Dequantized float32 tensor in PyTorch's [out, in] layout (only `part` of it, if given), or None if
        absent. `config` gives the heads of Q/K rows in llama.cpp's order (a part holds whole heads)."""
        import gguf

        info = self.tensors.get(name)
        if info is None:
            return None
        kind = info.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise ModelLoadError(f"{self.path.name}: tensor {name} has type {kind}, which is not supported "
                                 f"(supported: {', '.join(SUPPORTED_TYPES)})")
        # GGUF lists dimensions innermost first; numpy's layout is the reverse.
        shape = tuple(int(d) for d in reversed(info.shape))
        with self.reader.reading(info, None if part is None else part.row_span):  # a copy is made: pages not kept
            raw, lead = (info.data, 0) if part is None else select(info.data, part, *_block(info))
            try:
                data = gguf.quants.dequantize(raw, info.tensor_type)
            except Exception as err:
                raise ModelLoadError(f"{self.path.name}: tensor {name} ({kind}) could not be read: {err}") from None
            data = np.ascontiguousarray(data, dtype=np.float32)
            if part is not None:  # the part's rows, and of the blocks read, only its columns
                data = data.reshape(len(raw), -1) if len(shape) == 2 else data.reshape(-1)
                if part.cols is not None and len(shape) == 2:
                    data = data[:, lead:lead + part.cols[1] - part.cols[0]]
                shape = data.shape
            data = np.ascontiguousarray(data).reshape(shape)
            if not data.flags.writeable:  # F32 tensors are views of the read-only memory map
                data = data.copy()
        return self._rope_rows_in_hf_order(name, torch.from_numpy(data), config)

    def _rope_rows_in_hf_order(self, name: str, rows: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        """Undo llama.cpp's Q/K row permutation on anything laid out by output row (weights, codes, scales)."""
        if self.arch.permuted_qk and (".attn_q." in name or ".attn_k." in name):
            return unpermute_rope_rows(rows, config.num_heads if ".attn_q." in name else config.num_kv_heads)
        return rows

    def blocks(self, name: str, config: ModelConfig, part: TensorPart | None = None) -> tuple[np.ndarray, int, str] | None:
        """A quantized tensor's own blocks, one row of bytes per output feature ([out, bytes], in our row
        order): a read-only view of the memory map where the rows are in order, else a copy; its GGML type id
        and name; F16 and BF16 tensors as their values' bytes. None if the tensor is absent or float32. With
        `part`, only its rows and, in every row, the whole blocks of its columns (a range that splits a block
        is refused)."""
        info = self.tensors.get(name)
        if info is None or info.tensor_type.name in DENSE_TYPES:
            return None
        import gguf

        cols, rows = (int(d) for d in (*info.shape, 1)[:2])
        per, size = gguf.GGML_QUANT_SIZES[info.tensor_type]
        data = info.data.view(np.uint8)  # (an F16 tensor is read as float16 values)
        if len(info.shape) != 2 or cols % per or data.size != rows * cols // per * size:
            raise ModelLoadError(f"{self.path.name}: tensor {name} ({info.tensor_type.name}, shape "
                                 f"{[int(d) for d in info.shape]}) holds {data.size} bytes, which do not fit its shape")
        raw = data.reshape(rows, cols // per * size)
        if part is not None:
            raw, lead = select(raw, part, per, size)
            if lead or (part.cols is not None and part.cols[1] % per):
                raise ModelLoadError(
                    f"{self.path.name}: tensor {name} ({info.tensor_type.name}, blocks of {per} weights) cannot be split "
                    f"at input features {list(part.cols)}: a tensor-parallel rank computes on whole blocks; choose "
                    "another tensor_parallel_size, or dtype='float32'")
        if self.arch.permuted_qk and (".attn_q." in name or ".attn_k." in name):
            raw = np.ascontiguousarray(self._rope_rows_in_hf_order(name, torch.from_numpy(raw.copy()), config).numpy())
        return raw, int(info.tensor_type), info.tensor_type.name

    def reading(self, name: str, part: TensorPart | None = None) -> AbstractContextManager[None]:
        """Around a whole read of the tensor (or of its part's rows): its pages of the map in, then out of this
        process's memory."""
        return self.reader.reading(self.tensors[name], None if part is None else part.row_span)

    def quantized_bytes(self) -> int:
        return sum(info.data.nbytes for info in self.tensors.values() if info.tensor_type.name not in DENSE_TYPES)


def _block(info: TensorInfo) -> tuple[int, int]:
    """Values per block and units of `info.data` per block: a quantized tensor's rows are bytes, a float
    tensor's are values."""
    import gguf

    return gguf.GGML_QUANT_SIZES[info.tensor_type] if info.data.dtype == np.uint8 else (1, 1)


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row order (pairs interleaved) back to HF's rotate-half order.

    llama.cpp's converter maps rows [h, 2, D/2] -> [h, D/2, 2]; this maps them back.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
