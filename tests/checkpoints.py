"""Tiny checkpoints written by the tests: HF safetensors folders (via transformers) and GGUF files
(via the gguf package, with llama.cpp's Q/K row permutation applied as its converter does)."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, rms_norm_eps=1e-5,
            rope_theta=10000.0)


def hf_model(kind: str = "llama", **overrides):
    import transformers

    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
               "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
               "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
               "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}
    config_cls, model_cls = classes[kind]
    extra = {"mistral": {"sliding_window": None}, "qwen3": {"head_dim": 16},
             "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
             # small soft-caps, so that capping changes the result; eager: transformers' SDPA path has no soft-cap
             "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 24, "pad_token_id": 0, "sliding_window": 16,
                        "attn_logit_softcapping": 0.5, "final_logit_softcapping": 3.0,
                        "attn_implementation": "eager"},
             "gemma3": {"head_dim": 16, "query_pre_attn_scalar": 24, "pad_token_id": 0, "sliding_window": 16, "rope_theta": 1e6,
                        "layer_types": ["sliding_attention", "full_attention"], "attn_implementation": "eager"}}.get(kind, {})
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**TINY, **extra, **overrides})).eval()
    with torch.no_grad():  # random non-trivial norms and biases, so that a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                # Gemma's norms scale by 1 + w: around 0 there, as in its trained checkpoints
                p.normal_(1.0 if "norm" in name and "gemma" not in kind else 0.0, 0.2)
    return model


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows of llama models."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_freqs(hf) -> np.ndarray:
    """Llama 3.1's per-frequency divisors of a transformers model's RoPE, as llama.cpp's converter bakes them
    into a rope_freqs tensor (base 10000)."""
    head_dim = hf.config.hidden_size // hf.config.num_attention_heads
    plain = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    return (plain / hf.model.rotary_emb.inv_freq.float()).numpy()


def write_gguf(path: Path, hf, arch: str = "llama", qtype: str = "F32", skip: tuple[str, ...] = (),
               rope_freqs: np.ndarray | None = None, metadata: dict | None = None, vocabulary: bool = False) -> Path:
    """Write an HF Llama/Qwen2/Qwen3/Gemma 2/Gemma 3/Phi-3 model as GGUF the way llama.cpp's converter
    does (Q/K rows permuted for llama, Gemma norms stored as 1 + w, Phi-3's fused tensors kept); 2-D
    weights (not norms) in `qtype`; `rope_freqs` (Llama 3.1's per-frequency divisors) and extra
    `metadata` keys ({arch} filled in; None: a key the converter writes left out) when given; with
    `vocabulary`, a SentencePiece one of the model's size, without which llama.cpp loads no model."""
    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), arch=arch)
    gemma = arch in ("gemma2", "gemma3")
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    if gemma:
        metadata = {"{arch}.attention.sliding_window": cfg.sliding_window,
                    "{arch}.attention.sliding_window_pattern": 2, **(metadata or {})}
        if cfg.final_logit_softcapping:
            metadata["{arch}.final_logit_softcapping"] = float(cfg.final_logit_softcapping)
        if arch == "gemma2":
            metadata["{arch}.attn_logit_softcapping"] = float(cfg.attn_logit_softcapping)
        else:
            metadata["{arch}.rope.freq_base_swa"] = float(rope["sliding_attention"]["rope_theta"])
    for key, value in (metadata or {}).items():
        key = key.format(arch=arch)
        if value is None:  # a key the converter would write, left out
            continue
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, value)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    longrope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type") == "longrope"
    if longrope:  # Phi-3, as llama.cpp's converter writes it
        params = cfg.rope_parameters
        writer.add_tensor("rope_factors_long.weight", np.array(params["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(params["short_factor"], dtype=np.float32))
        original = params["original_max_position_embeddings"]
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length", original)
        scale = cfg.max_position_embeddings / original  # the converter's attention factor
        if "{arch}.rope.scaling.attn_factor" not in (metadata or {}):
            writer.add_float32(f"{arch}.rope.scaling.attn_factor",
                               math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    if vocabulary:
        _add_sentencepiece_vocabulary(writer, [f"\u2581w{i}" for i in range(cfg.vocab_size - 259)])
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if getattr(cfg, "head_dim", None):
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                 "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
                 "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
                 "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
                 "self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight"}
    if gemma:
        per_layer.update({"post_attention_layernorm.weight": "post_attention_norm.weight",
                          "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                          "post_feedforward_layernorm.weight": "post_ffw_norm.weight"})
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}": f"blk.{i}.{v}" for k, v in per_layer.items()})
    state = hf.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        name = names[hf_name]
        if name in skip:
            continue
        data = tensor.float().numpy()
        if gemma and hf_name.endswith("norm.weight"):
            data = data + 1.0  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores the sum
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            data = llama_cpp_permute(data, heads)
        if data.ndim == 2 and qtype != "F32":
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantized_copy(hf, qtype: str):
    """The HF model with each 2-D weight replaced by its `qtype` round trip: the exact weights a
    GGUF of that type holds."""
    import copy

    clone = copy.deepcopy(hf)
    if qtype == "F32":
        return clone
    kind = gguf.GGMLQuantizationType[qtype]
    with torch.no_grad():
        for p in clone.parameters():
            if p.dim() == 2:
                data = p.float().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, kind), kind)))
    return clone


def write_sentencepiece_gguf(path: Path) -> Path:
    """A GGUF holding only a small SentencePiece-style ("llama") vocabulary: byte tokens, scored pieces."""
    words = ["▁", "a", "b", "c", "h", "e", "l", "o", "w", "r", "d", "é", "he", "hel", "hell", "hello", "▁hello",
             "▁h", "▁w", "or", "wor", "worl", "world", "▁world", "ab", "abc", "▁abc", "▁a", "▁▁", "▁c", "ll"]
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    _add_sentencepiece_vocabulary(writer, words)
    writer.add_tensor("token_embd.weight", np.zeros((259 + len(words), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_sentencepiece_vocabulary(writer: gguf.GGUFWriter, words: list[str]) -> None:
    """<unk>, <s>, </s>, the 256 byte tokens, then `words` scored in order."""
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + words)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(words))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(words))  # unknown, control, byte, normal
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
