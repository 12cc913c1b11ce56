"""One builder for every checkpoint: build `MiniLLM` on the meta device, then walk its modules and ask the
checkpoint for each one's parts (the architecture's tensor table, architectures.py). On GGUF blocks
(`on_blocks`), a linear layer or the embedding table whose parts all have a kernel type becomes a
GGMLLinear / GGMLEmbedding computing on them, as gpt-fast swaps in quantized modules; every other
parameter is dequantized (float tensors, types without a kernel: logged once per type)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..kernels.ggml import KERNEL_TYPES, GGMLEmbedding, GGMLFeedForward, GGMLLinear, kernel_weights
from ..model.norm import use_kernel_norms
from ..model.transformer import MiniLLM
from .architectures import Tensors, layer_tensors
from .errors import ModelLoadError

logger = logging.getLogger("minillm")


class Checkpoint(Protocol):
    name: str
    tensor_table: Tensors

    def tensor(self, name: str, config: ModelConfig) -> Tensor | None: ...
    def blocks(self, name: str, config: ModelConfig) -> tuple[np.ndarray, int, str] | None: ...


def build_model(checkpoint: Checkpoint, config: ModelConfig, device: str | torch.device = "cpu",
                on_blocks: bool = False, progress: Callable[[], None] = lambda: None) -> MiniLLM:
    """The model with the checkpoint's weights; `progress` is called once per layer. on_blocks: a GGUF
    file's quantized blocks stay as they are (config must be float32: activations, norms and cache)."""
    with torch.device("meta"):
        model = MiniLLM(config)
    parts = _Parts(checkpoint, config, on_blocks)
    tied = config.tie_embeddings
    groups = ["tok_embeddings", *(f"layers.{i}" for i in range(config.num_layers)), "norm", *([] if tied else ["output"])]
    for group in groups:
        for name, module in list(model.get_submodule(group).named_modules(prefix=group)):
            parts.load(model, name, module)
        if group.startswith("layers."):
            _fuse_swiglu(model.get_submodule(group), config)
            progress()
    embeddings = model.tok_embeddings
    if tied and isinstance(embeddings, GGMLEmbedding):  # the LM head reads the same blocks
        model.output = GGMLLinear(embeddings.weight, embeddings.fmt, config.dim_model)
    elif tied:
        model.output.weight = embeddings.weight
    for kind in sorted(parts.without_kernel):
        logger.warning("%s: %s tensors have no quantized kernel; they are dequantized to float32", checkpoint.name, kind)
    if on_blocks:
        use_kernel_norms(model)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f"{checkpoint.name}: no weights for {', '.join(left)}")
    return model.to(device).eval()


def _fuse_swiglu(block: nn.Module, config: ModelConfig) -> None:
    """A SwiGLU layer whose gate/up matmul is on GGUF blocks applies silu(gate) * up in that kernel."""
    w13 = block.feed_forward.w13
    if isinstance(w13, GGMLLinear) and config.activation == "silu":
        block.feed_forward = GGMLFeedForward(w13, block.feed_forward.w2)


class _Parts:
    """Each parameter's tensors in the checkpoint, stacked by rows."""

    def __init__(self, checkpoint: Checkpoint, config: ModelConfig, on_blocks: bool) -> None:
        self.checkpoint, self.config, self.on_blocks = checkpoint, config, on_blocks
        self.sources = layer_tensors(checkpoint.tensor_table, config.num_layers)
        self.without_kernel: set[str] = set()

    def load(self, model: MiniLLM, name: str, module: nn.Module) -> None:
        kernel = self.kernel_module(name, module) if self.on_blocks else None
        if kernel is not None:
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, kernel)
            return
        for param_name, param in list(module.named_parameters(recurse=False)):
            setattr(module, param_name, nn.Parameter(self.dense(f"{name}.{param_name}", param), requires_grad=False))

    def names(self, param: str) -> tuple[str, ...]:
        names = self.sources.get(param)
        if names is None:
            raise ModelLoadError(f"{self.checkpoint.name}: this architecture has no tensor for {param!r}")
        return names

    def dense(self, param: str, like: Tensor) -> Tensor:
        names = self.names(param)
        tensors = [self.checkpoint.tensor(n, self.config) for n in names]
        missing = [n for n, t in zip(names, tensors) if t is None]
        if missing:
            raise ModelLoadError(f"{self.checkpoint.name}: the checkpoint has no tensor {missing[0]!r} (for {param})")
        tensor = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        if tuple(tensor.shape) != tuple(like.shape):
            raise ModelLoadError(f"{self.checkpoint.name}: tensor {param} has shape {list(tensor.shape)}, the config "
                                 f"implies {list(like.shape)}")
        return tensor.to(like.dtype)

    def kernel_module(self, name: str, module: nn.Module) -> nn.Module | None:
        """A GGML module on the blocks of `module`'s weight, or None where a part is not quantized with a kernel."""
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return None
        blocks = [self.checkpoint.blocks(n, self.config) for n in self.names(name + ".weight")]
        if any(b is None for b in blocks):  # absent (an error, raised by dense) or a float tensor
            return None
        without = {type_name for _, kind, type_name in blocks if kind not in KERNEL_TYPES.values()}
        if without:
            self.without_kernel |= without
            return None
        rows, fmt = kernel_weights([(raw, kind) for raw, kind, _ in blocks])
        if isinstance(module, nn.Embedding):
            return GGMLEmbedding(torch.from_numpy(rows), fmt, module.embedding_dim)
        if rows.shape[0] != module.out_features:
            raise ModelLoadError(f"{self.checkpoint.name}: {name} has {rows.shape[0]} output rows, the config implies "
                                 f"{module.out_features}")
        bias = None if module.bias is None else self.dense(name + ".bias", module.bias).float()
        return GGMLLinear(torch.from_numpy(rows), fmt, module.in_features, bias)
