"""From named checkpoint tensors to a ready `MiniLLM`: one mapping shared by every format."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..config import ModelConfig
from ..model.transformer import MiniLLM


class ModelLoadError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, or of an unsupported kind."""


def layer_names(i: int) -> dict[str, str]:
    """Canonical per-layer tensor names (q/k/v and w1/w3 separate; they are fused into wqkv and w13 here)."""
    p = f"layers.{i}."
    return {
        "attention_norm": p + "attention_norm.weight",
        "wq": p + "attention.wq.weight",
        "wk": p + "attention.wk.weight",
        "wv": p + "attention.wv.weight",
        "bq": p + "attention.wq.bias",
        "bk": p + "attention.wk.bias",
        "bv": p + "attention.wv.bias",
        "wo": p + "attention.wo.weight",
        "q_norm": p + "attention.q_norm.weight",
        "k_norm": p + "attention.k_norm.weight",
        "ffn_norm": p + "ffn_norm.weight",
        "post_attention_norm": p + "post_attention_norm.weight",
        "post_ffn_norm": p + "post_ffn_norm.weight",
        "w1": p + "feed_forward.w1.weight",
        "w2": p + "feed_forward.w2.weight",
        "w3": p + "feed_forward.w3.weight",
    }


def linear_sources(module: str, tie_embeddings: bool) -> list[str]:
    """Canonical names of the checkpoint tensors a linear layer of the built model is made of
    (wqkv is wq, wk and wv stacked, w13 is w1 and w3; a tied LM head is the embedding table)."""
    if module.endswith(".wqkv"):
        prefix = module.removesuffix("wqkv")
        return [prefix + "wq.weight", prefix + "wk.weight", prefix + "wv.weight"]
    if module.endswith(".w13"):
        prefix = module.removesuffix("w13")
        return [prefix + "w1.weight", prefix + "w3.weight"]
    if module == "output" and tie_embeddings:
        return ["tok_embeddings.weight"]
    return [module + ".weight"]


def checkpoint_names(global_names: dict[str, str], layer_templates: dict[str, str], num_layers: int) -> dict[str, str]:
    """Canonical name -> the checkpoint's own name, from its global names and per-layer templates ({i})."""
    names = dict(global_names)
    for i in range(num_layers):
        names.update({layer_names(i)[key]: template.format(i=i) for key, template in layer_templates.items()})
    return names


def build_model(
    config: ModelConfig,
    fetch: Callable[[str], Tensor | None],
    device: str | torch.device = "cpu",
    progress: Callable[[], None] = lambda: None,
) -> MiniLLM:
    """Assemble MiniLLM's state dict from `fetch(canonical_name)` and load it without a random init.

    `fetch` returns a tensor (any float dtype, on the CPU) or None when the checkpoint lacks it;
    `progress` is called once per layer.
    """
    dtype = config.torch_dtype

    def need(name: str) -> Tensor:
        tensor = fetch(name)
        if tensor is None:
            raise ModelLoadError(f"the checkpoint has no tensor for {name!r}")
        return tensor.to(dtype)

    state: dict[str, Tensor] = {"tok_embeddings.weight": need("tok_embeddings.weight"), "norm.weight": need("norm.weight")}
    state["output.weight"] = state["tok_embeddings.weight"] if config.tie_embeddings else need("output.weight")
    for i in range(config.num_layers):
        n = layer_names(i)
        p = f"layers.{i}."
        state[p + "attention_norm.weight"] = need(n["attention_norm"])
        state[p + "attention.wqkv.weight"] = torch.cat([need(n["wq"]), need(n["wk"]), need(n["wv"])])
        if config.qkv_bias:
            state[p + "attention.wqkv.bias"] = torch.cat([need(n["bq"]), need(n["bk"]), need(n["bv"])])
        state[p + "attention.wo.weight"] = need(n["wo"])
        if config.qk_norm:
            state[p + "attention.q_norm.weight"], state[p + "attention.k_norm.weight"] = need(n["q_norm"]), need(n["k_norm"])
        state[p + "ffn_norm.weight"] = need(n["ffn_norm"])
        if config.sandwich_norms:
            state[p + "post_attention_norm.weight"] = need(n["post_attention_norm"])
            state[p + "post_ffn_norm.weight"] = need(n["post_ffn_norm"])
        state[p + "feed_forward.w13.weight"] = torch.cat([need(n["w1"]), need(n["w3"])])
        state[p + "feed_forward.w2.weight"] = need(n["w2"])
        progress()

    with torch.device("meta"):
        model = MiniLLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ModelLoadError(f"tensor {name} has shape {list(state[name].shape)}, the config implies {list(shape)}")
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(device).eval()
