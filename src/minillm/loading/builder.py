"""One builder for every checkpoint: build `MiniLLM` on the meta device, then walk its modules and ask the
checkpoint for each one's parts (the architecture's tensor table, architectures.py). On GGUF blocks
(`on_blocks`), a linear layer or the embedding table whose parts all have a kernel type becomes a
GGMLLinear / GGMLEmbedding computing on them, as gpt-fast swaps in quantized modules; every other
parameter is dequantized (F32 tensors, and types without a kernel: their memory cost is logged).

Tensors are read from the file's memory map one at a time, repacked, and their pages released, so a load
holds the model plus one tensor of the file; an untied embedding table is used as stored, not copied.

A tensor-parallel rank (`shard`, parallel/shard.py) builds the model in its shard's shapes and reads only its
part of each tensor (loading/tensor_part.py); the shard then adds its collectives to the built modules."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..kernels.ggml import KERNEL_TYPES, GGMLEmbedding, GGMLFeedForward, GGMLLinear, repack
from ..model.norm import use_kernel_norms
from ..model.transformer import MiniLLM
from ..runtime import HugePageArena
from .architectures import Tensors, layer_tensors
from .errors import ModelLoadError
from .tensor_part import TensorPart, padded

logger = logging.getLogger("minillm")


REPACK_CHUNK = 16 << 20  # bytes of the file a repack maps in at a time
GROUP_ROWS = 16  # the kernels interleave rows in groups of 16 (kernels/csrc/ggml_formats.h): chunks hold whole groups


class Checkpoint(Protocol):
    name: str
    tensor_table: Tensors

    def tensor(self, name: str, config: ModelConfig, part: TensorPart | None = None) -> Tensor | None: ...
    def blocks(self, name: str, config: ModelConfig,
               part: TensorPart | None = None) -> tuple[np.ndarray, int, str] | None: ...
    def reading(self, name: str, part: TensorPart | None = None) -> AbstractContextManager[None]: ...
    def quantized_bytes(self) -> int: ...


class Sharding(Protocol):
    """One tensor-parallel rank's share of the model (parallel/shard.py)."""

    def local_config(self, config: ModelConfig) -> ModelConfig: ...  # the shapes of the rank's modules
    def part(self, config: ModelConfig, param: str, index: int, count: int) -> TensorPart | None: ...
    def parallelize(self, model: MiniLLM, config: ModelConfig) -> None: ...  # the collectives, once built


def build_model(checkpoint: Checkpoint, config: ModelConfig, device: str | torch.device = "cpu",
                on_blocks: bool = False, progress: Callable[[], None] = lambda: None,
                shard: Sharding | None = None) -> MiniLLM:
    """The model with the checkpoint's weights; `progress` is called once per layer. on_blocks: a GGUF
    file's quantized blocks stay as they are (config must be float32: activations, norms and cache).
    shard: only a tensor-parallel rank's share of it."""
    full, config = config, config if shard is None else shard.local_config(config)
    with torch.device("meta"), _no_init():
        model = MiniLLM(config)
    parts = _Parts(checkpoint, config, on_blocks,
                   None if shard is None else lambda param, i, n: shard.part(full, param, i, n))
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
        model.output = GGMLLinear([(embeddings.weight, embeddings.fmt)], config.dim_model)
    elif tied:
        model.output.weight = embeddings.weight
    for kind, (count, size) in sorted(parts.without_kernel.items()):
        logger.warning("%s: %d %s tensors have no quantized kernel: dequantized to float32, %.1f MB instead of "
                       "%.1f MB", checkpoint.name, count, kind, size[1] / 1e6, size[0] / 1e6)
    if on_blocks:
        use_kernel_norms(model)
    if shard is not None:
        shard.parallelize(model, full)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(f"{checkpoint.name}: no weights for {', '.join(left)}")
    return model.to(device).eval()


@contextmanager
def _no_init() -> Iterator[None]:
    """Parameters built on the meta device get no random initial values: they are replaced from the checkpoint,
    and `normal_` on a meta tensor imports torch._dynamo (2.5 s of a load)."""
    saved = {name: getattr(nn.init, name) for name in _INITS}
    for name in _INITS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, init in saved.items():
            setattr(nn.init, name, init)


_INITS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")


def _fuse_swiglu(block: nn.Module, config: ModelConfig) -> None:
    """A SwiGLU layer whose gate/up matmul is on GGUF blocks applies silu(gate) * up in that kernel."""
    w13 = block.feed_forward.w13
    if isinstance(w13, GGMLLinear) and config.activation == "silu":
        block.feed_forward = GGMLFeedForward(w13, block.feed_forward.w2)


class _Parts:
    """Each parameter's tensors in the checkpoint, stacked by rows."""

    def __init__(self, checkpoint: Checkpoint, config: ModelConfig, on_blocks: bool,
                 share: Callable[[str, int, int], TensorPart | None] | None = None) -> None:
        self.checkpoint, self.config, self.on_blocks = checkpoint, config, on_blocks
        self.share = share  # (param, source index, sources) -> a tensor-parallel rank's part of that source
        self.sources = layer_tensors(checkpoint.tensor_table, config.num_layers)
        self.without_kernel: dict[str, tuple[int, tuple[int, int]]] = {}  # type -> count, (file, float32) bytes
        # repacked blocks go straight into huge pages (fewer TLB misses as each decode step streams them); sized
        # for every quantized tensor of the file, since pages never written cost nothing
        self.arena = HugePageArena(checkpoint.quantized_bytes() + 64 * len(self.sources)) if on_blocks else None

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

    def part(self, param: str, index: int, count: int) -> TensorPart | None:
        return None if self.share is None else self.share(param, index, count)

    def dense(self, param: str, like: Tensor) -> Tensor:
        names = self.names(param)
        tensors = [self.read(n, param, self.part(param, i, len(names))) for i, n in enumerate(names)]
        tensor = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        if tuple(tensor.shape) != tuple(like.shape):
            raise ModelLoadError(f"{self.checkpoint.name}: tensor {param} has shape {list(tensor.shape)}, the config "
                                 f"implies {list(like.shape)}")
        return tensor.to(like.dtype)

    def read(self, name: str, param: str, part: TensorPart | None) -> Tensor:
        tensor = self.checkpoint.tensor(name, self.config, part)
        if tensor is None:
            raise ModelLoadError(f"{self.checkpoint.name}: the checkpoint has no tensor {name!r} (for {param})")
        return padded(tensor, part)

    def kernel_module(self, name: str, module: nn.Module) -> nn.Module | None:
        """A GGML module on the blocks of `module`'s weight, or None where a part is not quantized with a kernel."""
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return None
        names = self.names(name + ".weight")
        shares = [self.part(name + ".weight", i, len(names)) for i in range(len(names))]
        blocks = [self.checkpoint.blocks(n, self.config, part) for n, part in zip(names, shares)]
        if any(b is None for b in blocks):  # absent (an error, raised by dense) or an F32 tensor
            return None
        # (a kernel takes rows in blocks of 32 values: F16 / BF16 rows of another length have none)
        without = [(raw, type_name) for raw, kind, type_name in blocks
                   if kind not in KERNEL_TYPES.values() or module.weight.shape[1] % 32]
        for raw, type_name in without:
            count, (stored, dense) = self.without_kernel.get(type_name, (0, (0, 0)))
            self.without_kernel[type_name] = count + 1, (stored + raw.nbytes, dense + raw.shape[0] * module.weight.shape[1] * 4)
        if without:
            return None
        blocks = [(padded(raw, part), kind, type_name) for (raw, kind, type_name), part in zip(blocks, shares)]
        if isinstance(module, nn.Embedding):
            (raw, kind, _), = blocks
            if not self.config.tie_embeddings:  # looked up row by row: used as stored, in the memory map
                return GGMLEmbedding(_view(raw), kind, module.embedding_dim, interleaved=False)
            table = self.repack(names[0], raw, kind, shares[0])
            return GGMLEmbedding(table, kind, module.embedding_dim, interleaved=True)
        parts = [(self.repack(n, raw, kind, part), kind) for n, (raw, kind, _), part in zip(names, blocks, shares)]
        if sum(weight.shape[0] for weight, _ in parts) != module.out_features:
            raise ModelLoadError(f"{self.checkpoint.name}: {name} has {sum(w.shape[0] for w, _ in parts)} output rows, "
                                 f"the config implies {module.out_features}")
        bias = None if module.bias is None else self.dense(name + ".bias", module.bias).float()
        return GGMLLinear(parts, module.in_features, bias)

    def repack(self, name: str, raw: np.ndarray, kind: int, part: TensorPart | None = None) -> Tensor:
        """One tensor's blocks (or a rank's part of them) from the file into the arena, interleaved (`reading`:
        their pages of the file mapped in, then released). A whole tensor goes in chunks of whole row groups,
        so that a load holds ~REPACK_CHUNK bytes of the file at a time, not a whole LM head (0.18 GB in
        Gemma-3-270M, 0.43 GB in Llama-3.1-8B); a rank's part goes at once."""
        table = self.arena.take(raw.nbytes).view(raw.shape)
        if part is not None:
            with self.checkpoint.reading(name, part):
                return repack(_view(raw), kind, table)
        step = max(1, REPACK_CHUNK // max(raw.shape[1], 1) // GROUP_ROWS) * GROUP_ROWS
        for start in range(0, raw.shape[0], step):
            stop = min(start + step, raw.shape[0])
            with self.checkpoint.reading(name, TensorPart(rows=((start, stop),))):
                repack(_view(raw[start:stop]), kind, table[start:stop])
        return table


def _view(raw: np.ndarray) -> Tensor:
    """A tensor over the file's bytes (a read-only memory map, never written: no copy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the array is not writable
        return torch.from_numpy(raw)
