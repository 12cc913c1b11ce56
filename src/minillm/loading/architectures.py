"""The architectures MiniLLM loads, one entry each: where each parameter of the built `MiniLLM` is found
in a GGUF file and in a Hugging Face folder, and the architecture's quirks as data. The readers
(gguf_file.py, hf_folder.py) and the one builder (builder.py) know no architecture by name: adding
one is an entry here, plus its tests.

A tensor table maps a parameter of the model (`layers.{i}...` for layer i) to the checkpoint tensors
stacked by rows to make it: wqkv is q, k and v, w13 is gate then up (Phi-3 stores both stacked already).
"""

from __future__ import annotations

from dataclasses import dataclass, field

Tensors = dict[str, tuple[str, ...]]

LLAMA_GGUF: Tensors = {
    "tok_embeddings.weight": ("token_embd.weight",),
    "norm.weight": ("output_norm.weight",),
    "output.weight": ("output.weight",),
    "layers.{i}.attention_norm.weight": ("blk.{i}.attn_norm.weight",),
    "layers.{i}.attention.wqkv.weight": ("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"),
    "layers.{i}.attention.wqkv.bias": ("blk.{i}.attn_q.bias", "blk.{i}.attn_k.bias", "blk.{i}.attn_v.bias"),
    "layers.{i}.attention.wo.weight": ("blk.{i}.attn_output.weight",),
    "layers.{i}.attention.q_norm.weight": ("blk.{i}.attn_q_norm.weight",),
    "layers.{i}.attention.k_norm.weight": ("blk.{i}.attn_k_norm.weight",),
    "layers.{i}.ffn_norm.weight": ("blk.{i}.ffn_norm.weight",),
    "layers.{i}.feed_forward.w13.weight": ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"),
    "layers.{i}.feed_forward.w2.weight": ("blk.{i}.ffn_down.weight",),
}
GEMMA_GGUF: Tensors = {**LLAMA_GGUF, "layers.{i}.post_attention_norm.weight": ("blk.{i}.post_attention_norm.weight",),
                       "layers.{i}.post_ffn_norm.weight": ("blk.{i}.post_ffw_norm.weight",)}
PHI3_GGUF: Tensors = {**LLAMA_GGUF, "layers.{i}.attention.wqkv.weight": ("blk.{i}.attn_qkv.weight",),
                      "layers.{i}.feed_forward.w13.weight": ("blk.{i}.ffn_up.weight",)}

_HF_LAYER = "model.layers.{i}."
LLAMA_HF: Tensors = {
    "tok_embeddings.weight": ("model.embed_tokens.weight",),
    "norm.weight": ("model.norm.weight",),
    "output.weight": ("lm_head.weight",),
    "layers.{i}.attention_norm.weight": (_HF_LAYER + "input_layernorm.weight",),
    "layers.{i}.attention.wqkv.weight": tuple(_HF_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"),
    "layers.{i}.attention.wqkv.bias": tuple(_HF_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv"),
    "layers.{i}.attention.wo.weight": (_HF_LAYER + "self_attn.o_proj.weight",),
    "layers.{i}.attention.q_norm.weight": (_HF_LAYER + "self_attn.q_norm.weight",),
    "layers.{i}.attention.k_norm.weight": (_HF_LAYER + "self_attn.k_norm.weight",),
    "layers.{i}.ffn_norm.weight": (_HF_LAYER + "post_attention_layernorm.weight",),
    "layers.{i}.feed_forward.w13.weight": (_HF_LAYER + "mlp.gate_proj.weight", _HF_LAYER + "mlp.up_proj.weight"),
    "layers.{i}.feed_forward.w2.weight": (_HF_LAYER + "mlp.down_proj.weight",),
}
GEMMA_HF: Tensors = {**LLAMA_HF, "layers.{i}.post_attention_norm.weight": (_HF_LAYER + "post_attention_layernorm.weight",),
                     "layers.{i}.ffn_norm.weight": (_HF_LAYER + "pre_feedforward_layernorm.weight",),
                     "layers.{i}.post_ffn_norm.weight": (_HF_LAYER + "post_feedforward_layernorm.weight",)}
PHI3_HF: Tensors = {**LLAMA_HF, "layers.{i}.attention.wqkv.weight": (_HF_LAYER + "self_attn.qkv_proj.weight",),
                    "layers.{i}.feed_forward.w13.weight": (_HF_LAYER + "mlp.gate_up_proj.weight",)}


@dataclass(frozen=True)
class Architecture:
    gguf_name: str | None  # general.architecture in a GGUF file (None: loaded from HF folders only)
    hf_types: tuple[str, ...]  # model_type in config.json
    gguf_tensors: Tensors = field(default_factory=lambda: LLAMA_GGUF)
    hf_tensors: Tensors = field(default_factory=lambda: LLAMA_HF)
    # Gemma: GeGLU, embeddings times sqrt(dim), norms after attention and the MLP too, the softmax scale from
    # query_pre_attn_scalar (HF) or the head size (GGUF); HF stores norm weights as w for a (1 + w) scale
    gemma: bool = False
    sliding_window: bool = False  # the checkpoint's window is used (others' are ignored, as the references do)
    window_pattern: int | None = None  # every window_pattern-th layer is global, the others slide (else: all slide)
    default_window: int | None = None  # for GGUF files that omit it
    softcaps: tuple[float, float] | None = None  # (attention, final logits) soft-caps, defaults where not stored
    local_rope: bool = False  # the sliding layers have their own RoPE base
    qkv_bias: bool = False  # always (others: when the checkpoint has the tensors / says attention_bias)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE
    permuted_qk: bool = False  # llama.cpp's converter interleaved Q/K rows for its RoPE; undone on load
    # llama.cpp's 27B Gemma models (known by layer count) scale scores by 1/sqrt(dim/heads), not 1/sqrt(head_dim)
    wide_scale_layers: tuple[int, ...] = ()
    refuses_use_sliding_window: bool = False  # Qwen's window covers only some layers: not supported


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", ("llama",), permuted_qk=True),
    "mistral": Architecture(None, ("mistral",), sliding_window=True),
    "qwen2": Architecture("qwen2", ("qwen2",), qkv_bias=True, refuses_use_sliding_window=True),
    "qwen3": Architecture("qwen3", ("qwen3",), qk_norm=True, refuses_use_sliding_window=True),
    "phi3": Architecture("phi3", ("phi3",), PHI3_GGUF, PHI3_HF),
    "gemma2": Architecture("gemma2", ("gemma2",), GEMMA_GGUF, GEMMA_HF, gemma=True, sliding_window=True,
                           window_pattern=2, default_window=4096, softcaps=(50.0, 30.0), wide_scale_layers=(46,)),
    "gemma3": Architecture("gemma3", ("gemma3_text",), GEMMA_GGUF, GEMMA_HF, gemma=True, sliding_window=True,
                           window_pattern=6, local_rope=True, qk_norm=True, wide_scale_layers=(62,)),
}


def gguf_architecture(name: str | None) -> Architecture | None:
    return next((a for a in ARCHITECTURES.values() if a.gguf_name is not None and a.gguf_name == name), None)


def hf_architecture(model_type: str | None) -> Architecture | None:
    return next((a for a in ARCHITECTURES.values() if model_type in a.hf_types), None)


def supported(kind: str) -> str:
    """The names a GGUF file ("gguf") or a HF folder ("hf") may declare, for error messages."""
    names = [a.gguf_name for a in ARCHITECTURES.values() if a.gguf_name] if kind == "gguf" else \
        [t for a in ARCHITECTURES.values() for t in a.hf_types]
    return ", ".join(names)


def sliding_layers(pattern: int | None, num_layers: int) -> list[bool] | None:
    """Which layers slide when the checkpoint does not list them (None: all): llama.cpp's and transformers'
    rule, the last layer of each period of `pattern` global."""
    if pattern is None:
        return None
    return [i % pattern < pattern - 1 for i in range(num_layers)]


def layer_tensors(table: Tensors, num_layers: int) -> dict[str, tuple[str, ...]]:
    """A tensor table with the layer templates written out for every layer."""
    out: dict[str, tuple[str, ...]] = {}
    for param, sources in table.items():
        if "{i}" not in param:
            out[param] = sources
            continue
        for i in range(num_layers):
            out[param.format(i=i)] = tuple(source.format(i=i) for source in sources)
    return out
