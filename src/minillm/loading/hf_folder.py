"""Hugging Face checkpoint folders: config.json + safetensors (single or sharded).

Tensors are memory-mapped through `safetensors`; pickled `*.bin` / `*.pt` files are never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from .weights import ModelLoadError, checkpoint_names

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
GEMMA = ("gemma2", "gemma3_text")
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}

_LAYER_NAMES = {
    "attention_norm": "model.layers.{i}.input_layernorm.weight",
    "wq": "model.layers.{i}.self_attn.q_proj.weight",
    "wk": "model.layers.{i}.self_attn.k_proj.weight",
    "wv": "model.layers.{i}.self_attn.v_proj.weight",
    "bq": "model.layers.{i}.self_attn.q_proj.bias",
    "bk": "model.layers.{i}.self_attn.k_proj.bias",
    "bv": "model.layers.{i}.self_attn.v_proj.bias",
    "wo": "model.layers.{i}.self_attn.o_proj.weight",
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "w1": "model.layers.{i}.mlp.gate_proj.weight",
    "w2": "model.layers.{i}.mlp.down_proj.weight",
    "w3": "model.layers.{i}.mlp.up_proj.weight",
}
# Phi-3 stores q/k/v as one qkv_proj and gate/up as one gate_up_proj: "#part" names a slice of them
_PHI3_NAMES = {**_LAYER_NAMES, **{w: "model.layers.{i}.self_attn.qkv_proj.weight#" + w[1] for w in ("wq", "wk", "wv")},
               "w1": "model.layers.{i}.mlp.gate_up_proj.weight#0", "w3": "model.layers.{i}.mlp.gate_up_proj.weight#1"}
# Gemma 2: norms before and after attention and the MLP ("sandwich")
_GEMMA2_NAMES = {**_LAYER_NAMES, "post_attention_norm": "model.layers.{i}.post_attention_layernorm.weight",
                 "ffn_norm": "model.layers.{i}.pre_feedforward_layernorm.weight",
                 "post_ffn_norm": "model.layers.{i}.post_feedforward_layernorm.weight"}
_GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from None


class HFCheckpoint:
    """A folder with config.json and model.safetensors (or model.safetensors.index.json + shards)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        config_file = self.folder / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"{self.folder} has no config.json; a Hugging Face checkpoint folder needs one")
        self.hf_config = read_json(config_file)
        model_type = self.hf_config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(f"{self.folder.name}: model_type {model_type!r} is not supported "
                                 f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        self.model_type = model_type
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
        # transformers 5 writes RoPE settings as rope_parameters (rope_theta included; Gemma 3: one dict
        # per layer type), earlier versions as rope_scaling beside rope_theta: read both, ignore neither
        params = c.get("rope_parameters") or {}
        local = params.get("sliding_attention") if "full_attention" in params else None
        params = params.get("full_attention", params)
        rope = {**(c.get("rope_scaling") or {}), **params}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_theta = c.get("rope_theta") or rope.get("rope_theta", 10000.0)
        local_theta = (local or {}).get("rope_theta") or c.get("rope_local_base_freq")  # Gemma 3's sliding layers
        if local and local.get("rope_type", "default") != "default":
            raise ModelLoadError(f"{self.folder.name}: RoPE scaling on sliding-window layers is not supported")
        context = c.get("max_position_embeddings", 2048)
        scaling = None
        if float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor") or 1.0)) != 1.0:
            raise ModelLoadError(f"{self.folder.name}: partial rotary embeddings are not supported")
        activation = c.get("hidden_activation") or c.get("hidden_act") or "silu"
        if activation not in ACTIVATIONS:
            raise ModelLoadError(f"{self.folder.name}: activation {activation!r} is not supported "
                                 f"(supported: {', '.join(ACTIVATIONS)})")
        if rope_type not in (None, "default"):
            scaling = {k: v for k, v in rope.items() if k not in ("type", "rope_theta")} | {"rope_type": rope_type}
            if rope_type in ("llama3", "yarn", "longrope"):  # transformers' default for the pre-training context
                scaling.setdefault("original_max_position_embeddings", c.get("original_max_position_embeddings", context))
            if rope_type == "longrope":  # Phi-3: the attention factor comes from context / original
                scaling.setdefault("factor", context / scaling["original_max_position_embeddings"])
            if rope_type == "dynamic":  # the checkpoint's context is where the base starts to grow; run to factor x it
                scaling["original_max_position_embeddings"] = context
                context = int(context * scaling.get("factor", 1.0))
        window = c.get("sliding_window") if self.model_type in ("mistral", *GEMMA) else None
        gemma = self.model_type in GEMMA
        layer_types = c.get("layer_types") or (
            ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(c.get("num_hidden_layers", 0))]
            if gemma else None)
        if self.model_type in ("qwen2", "qwen3") and c.get("use_sliding_window"):
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
                rope_theta=float(rope_theta),
                norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v bias; Llama-style configs (Qwen3 too) say so with attention_bias.
                qkv_bias=self.model_type == "qwen2" or bool(c.get("attention_bias", False)),
                qk_norm=self.model_type in ("qwen3", "gemma3_text"),
                local_rope_theta=float(local_theta) if gemma and local_theta else None,
                sliding_window=window if window and window < context else None,
                sliding_layers=[t == "sliding_attention" for t in layer_types] if layer_types else None,
                activation=ACTIVATIONS[activation],
                embedding_multiplier=c["hidden_size"] ** 0.5 if gemma else 1.0,
                sandwich_norms=gemma,
                attention_scale=c["query_pre_attn_scalar"] ** -0.5 if gemma else None,
                attention_softcap=c.get("attn_logit_softcapping") if gemma else None,
                final_softcap=c.get("final_logit_softcapping") if gemma else None,
                rope_scaling=scaling,
                dtype=dtype,
            )
        except KeyError as err:
            raise ModelLoadError(f"{self.folder.name}/config.json lacks {err.args[0]!r}") from None
        except ValueError as err:
            raise ModelLoadError(f"{self.folder.name}/config.json: {err}") from None

    def canonical_names(self, num_layers: int) -> dict[str, str]:
        layers = {"phi3": _PHI3_NAMES, "gemma2": _GEMMA2_NAMES, "gemma3_text": _GEMMA2_NAMES}.get(self.model_type, _LAYER_NAMES)
        return checkpoint_names(_GLOBAL_NAMES, layers, num_layers)

    def tensor(self, name: str, config: ModelConfig) -> torch.Tensor | None:
        name, _, part = name.partition("#")
        tensor = self._read(name)
        if tensor is not None and self.model_type in GEMMA and name.endswith("norm.weight"):
            return tensor.float() + 1.0  # Gemma's RMSNorm scales by (1 + weight)
        if tensor is None or not part:
            return tensor
        if part in "01":  # gate, up
            return tensor.chunk(2)[int(part)]
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        return tensor.split([q, kv, kv])["qkv".index(part)]

    def _read(self, name: str) -> torch.Tensor | None:
        from safetensors import safe_open

        shard = self._files.get(name)
        if shard is None:
            return None
        if shard not in self._open:
            if not shard.is_file():
                raise ModelLoadError(f"shard {shard.name} named in the index is missing")
            self._open[shard] = safe_open(shard, framework="pt")
        return self._open[shard].get_tensor(name)

    def generation_eos_ids(self) -> list[int]:
        ids: list[int] = []
        for file in (self.folder / "generation_config.json", self.folder / "config.json"):
            if file.is_file():
                eos = read_json(file).get("eos_token_id")
                ids += [eos] if isinstance(eos, int) else list(eos or [])
        return list(dict.fromkeys(ids))
