"""Hugging Face checkpoint folders: config.json + safetensors (single or sharded).

Tensors are memory-mapped through `safetensors`; pickled `*.bin` / `*.pt` files are never loaded.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from .architectures import hf_architecture, sliding_layers, supported
from .errors import ModelLoadError
from .tensor_part import TensorPart

ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from None


class HFFolder:
    """A Hugging Face folder's configuration, whatever its model type or weights (enough for its tokenizer:
    tokenizer.json beside an optional config.json)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.name = self.folder.name
        config_file = self.folder / "config.json"
        self.hf_config = read_json(config_file) if config_file.is_file() else {}
        self.model_type = self.hf_config.get("model_type")

    def generation_eos_ids(self) -> list[int]:
        ids: list[int] = []
        for file in (self.folder / "generation_config.json", self.folder / "config.json"):
            if file.is_file():
                eos = read_json(file).get("eos_token_id")
                ids += [eos] if isinstance(eos, int) else list(eos or [])
        return list(dict.fromkeys(ids))


class HFCheckpoint(HFFolder):
    """A folder with config.json and model.safetensors (or model.safetensors.index.json + shards)."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__(folder)
        if not (self.folder / "config.json").is_file():
            raise ModelLoadError(f"{self.folder} has no config.json; a Hugging Face checkpoint folder needs one")
        model_type = self.model_type
        arch = hf_architecture(model_type)
        if arch is None:
            raise ModelLoadError(f"{self.folder.name}: model_type {model_type!r} is not supported "
                                 f"(supported: {supported('hf')})")
        self.arch, self.tensor_table = arch, arch.hf_tensors
        self._files = self._weight_files()  # tensor name -> shard file
        self._open: dict[Path, Any] = {}

    def _weight_files(self) -> dict[str, Path]:
        from safetensors import safe_open

        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            weight_map = read_json(index).get("weight_map", {})
            return {name: self.folder / shard for name, shard in weight_map.items()}
        if single.is_file():
            try:
                with safe_open(single, framework="pt") as f:
                    return {name: single for name in f.keys()}
            except Exception as err:
                raise ModelLoadError(f"{single} is not a readable safetensors file: {err}") from None
        if any(self.folder.glob("*.bin")) or any(self.folder.glob("*.pt")):
            raise ModelLoadError(f"{self.folder} holds only pickled weights (*.bin/*.pt); MiniLLM loads safetensors "
                                 "only, since unpickling can run arbitrary code")
        raise ModelLoadError(f"{self.folder} has no model.safetensors or model.safetensors.index.json")

    def model_config(self, dtype: str | torch.dtype) -> ModelConfig:
        c = self.hf_config
        rope_theta, local_theta, scaling, context = self._rope()
        activation = c.get("hidden_activation") or c.get("hidden_act") or "silu"
        if activation not in ACTIVATIONS:
            raise ModelLoadError(f"{self.folder.name}: activation {activation!r} is not supported "
                                 f"(supported: {', '.join(ACTIVATIONS)})")
        a = self.arch
        window = c.get("sliding_window") if a.sliding_window else None
        layer_types = c.get("layer_types")
        sliding = ([t == "sliding_attention" for t in layer_types] if layer_types
                   else sliding_layers(c.get("sliding_window_pattern") or a.window_pattern, c.get("num_hidden_layers", 0)))
        if a.refuses_use_sliding_window and c.get("use_sliding_window"):
            # Qwen's window covers only layers from max_window_layers on: a per-layer pattern not done yet
            raise ModelLoadError(f"{self.folder.name}: Qwen's use_sliding_window (on some layers) is not supported")
        try:
            heads = c["num_attention_heads"]
            return ModelConfig(
                dim_model=c["hidden_size"],
                num_heads=heads,
                num_kv_heads=c.get("num_key_value_heads") or heads,
                num_layers=c["num_hidden_layers"],
                hidden_dim=c["intermediate_size"],
                head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                max_seq_len=context,
                vocab_size=c["vocab_size"],
                rope_theta=rope_theta,
                norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v bias; Llama-style configs (Qwen3 too) say so with attention_bias.
                qkv_bias=a.qkv_bias or bool(c.get("attention_bias", False)),
                qk_norm=a.qk_norm,
                local_rope_theta=float(local_theta) if a.local_rope and local_theta else None,
                sliding_window=window if window and window < context else None,
                sliding_layers=sliding,
                activation=ACTIVATIONS[activation],
                embedding_multiplier=c["hidden_size"] ** 0.5 if a.gemma else 1.0,
                sandwich_norms=a.gemma,
                attention_scale=c["query_pre_attn_scalar"] ** -0.5 if a.gemma else None,
                attention_softcap=c.get("attn_logit_softcapping") if a.softcaps else None,
                final_softcap=c.get("final_logit_softcapping") if a.gemma else None,
                rope_scaling=scaling,
                dtype=dtype,
            )
        except KeyError as err:
            raise ModelLoadError(f"{self.folder.name}/config.json lacks {err.args[0]!r}") from None
        except ValueError as err:
            raise ModelLoadError(f"{self.folder.name}/config.json: {err}") from None

    def _rope(self) -> tuple[float, float | None, dict[str, Any] | None, int]:
        """(rope_theta, the sliding layers' own base or None, the scaling in ModelConfig's form, the context).
        transformers 5 writes RoPE settings as rope_parameters (rope_theta included; Gemma 3: one dict per
        layer type), earlier versions as rope_scaling beside rope_theta: read both, ignore neither."""
        c = self.hf_config
        params = c.get("rope_parameters") or {}
        local = params.get("sliding_attention") if "full_attention" in params else None
        params = params.get("full_attention", params)
        rope = {**(c.get("rope_scaling") or {}), **params}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_theta = c.get("rope_theta") or rope.get("rope_theta", 10000.0)
        local_theta = (local or {}).get("rope_theta") or c.get("rope_local_base_freq")
        if local and local.get("rope_type", "default") != "default":
            raise ModelLoadError(f"{self.folder.name}: RoPE scaling on sliding-window layers is not supported")
        if float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor") or 1.0)) != 1.0:
            raise ModelLoadError(f"{self.folder.name}: partial rotary embeddings are not supported")
        context = c.get("max_position_embeddings", 2048)
        if rope_type in (None, "default"):
            return float(rope_theta), local_theta, None, context
        scaling = {k: v for k, v in rope.items() if k not in ("type", "rope_theta")} | {"rope_type": rope_type}
        if rope_type in ("llama3", "yarn", "longrope"):  # transformers' default for the pre-training context
            scaling.setdefault("original_max_position_embeddings", c.get("original_max_position_embeddings", context))
        if rope_type == "longrope":  # Phi-3: the attention factor comes from context / original
            scaling.setdefault("factor", context / scaling["original_max_position_embeddings"])
        if rope_type == "dynamic":  # the checkpoint's context is where the base starts to grow; run to factor x it
            scaling["original_max_position_embeddings"] = context
            context = int(context * scaling.get("factor", 1.0))
        return float(rope_theta), local_theta, scaling, context

    def tensor(self, name: str, config: ModelConfig, part: TensorPart | None = None) -> torch.Tensor | None:
        tensor = self._read(name, part)
        if tensor is not None and self.arch.gemma and name.endswith("norm.weight"):
            return tensor.float() + 1.0  # Gemma's RMSNorm scales by (1 + weight)
        return tensor

    def blocks(self, name: str, config: ModelConfig, part: TensorPart | None = None) -> None:
        return None  # safetensors hold float tensors only

    def reading(self, name: str, part: TensorPart | None = None) -> AbstractContextManager[None]:
        return nullcontext()  # safetensors' reads are copies already

    def quantized_bytes(self) -> int:
        return 0

    def _read(self, name: str, part: TensorPart | None = None) -> torch.Tensor | None:
        """The tensor, or only `part` of it (safetensors reads the slices asked for)."""
        from safetensors import safe_open

        shard = self._files.get(name)
        if shard is None:
            return None
        if shard not in self._open:
            if not shard.is_file():
                raise ModelLoadError(f"shard {shard.name} named in the index is missing")
            self._open[shard] = safe_open(shard, framework="pt")
        if part is None:
            return self._open[shard].get_tensor(name)
        stored = self._open[shard].get_slice(name)
        shape = stored.get_shape()
        cols = slice(*part.cols) if part.cols is not None else slice(None)
        pieces = [stored[start:stop, cols] if len(shape) == 2 else stored[start:stop]
                  for start, stop in part.rows or ((0, shape[0]),)]
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
