"""One tensor-parallel rank's share of a model: Megatron-LM's split, as vLLM and SGLang apply it.

- column-parallel (each rank computes some of the output features; nothing to add up): q, k and v by heads
  (a rank's KV heads with the query heads that share them), gate and up by the MLP's hidden features;
- row-parallel (each rank multiplies its own input features; the partial sums are all-reduced): o by heads,
  down by hidden features;
- vocabulary-parallel: the embedding's and the LM head's rows (a vocabulary that does not divide is padded
  with zero rows); norms are replicated.

The hidden features are split in whole blocks of 256 where they come in multiples of 256 (a K-quant's
super-block), else of 32 (a legacy GGUF block), as evenly as the blocks allow (Qwen2.5-1.5B's 8,960 = 35 x 256:
18 and 17 blocks). A rank's columns of a row-parallel GGUF tensor are then whole blocks of every row, and the
activations' 8-bit blocks (32 values; 256, Q8_K's, in front of the K-quants) line up with them, so each
partial sum is made of the same block dot products as on one rank; only the order of the final sum changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import ModelConfig
from ..loading.tensor_part import TensorPart
from ..model.transformer import MiniLLM
from .layers import AllReduced, GatheredLogits, VocabParallelEmbedding


def check_tensor_parallel(config: ModelConfig, size: int, name: str) -> None:
    """A ValueError naming the setting when `size` ranks cannot share the model `name`."""
    heads, kv_heads = config.num_heads, config.num_kv_heads
    if heads % size or kv_heads % size:
        sizes = [d for d in range(1, kv_heads + 1) if heads % d == 0 and kv_heads % d == 0]
        raise ValueError(f"tensor_parallel_size={size} does not divide {name}'s {heads} query heads and {kv_heads} KV "
                         f"heads (each rank computes whole heads); sizes that divide both: "
                         f"{', '.join(map(str, sizes))}")
    unit = _unit(config.hidden_dim)
    if config.hidden_dim // unit < size:
        raise ValueError(f"tensor_parallel_size={size}: {name}'s MLP has {config.hidden_dim} hidden features, "
                         f"{config.hidden_dim // unit} blocks of {unit}: fewer than the ranks")


@dataclass(frozen=True)
class TensorShard:
    """Rank `rank` of `size`: what the model builder (loading/builder.py `Sharding`) asks of it."""

    rank: int
    size: int

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The shapes of this rank's modules: its heads, its hidden features, its (padded) vocabulary rows."""
        start, stop = self._hidden(config)
        return replace(config, num_heads=config.num_heads // self.size, num_kv_heads=config.num_kv_heads // self.size,
                       hidden_dim=stop - start, vocab_size=self._vocab_rows(config))

    def part(self, config: ModelConfig, param: str, index: int, count: int) -> TensorPart | None:
        """This rank's part of source tensor `index` of the `count` stacked into the model's `param`; None: all
        of it (a replicated norm)."""
        name = param.split(".", 2)[2] if param.startswith("layers.") else param
        q, kv = (self._even(config.num_heads * config.head_dim), self._even(config.num_kv_heads * config.head_dim))
        if name in ("tok_embeddings.weight", "output.weight"):
            rows = self._vocab_rows(config)
            start = min(self.rank * rows, config.vocab_size)
            return TensorPart(rows=((start, min(start + rows, config.vocab_size)),), pad_to=rows)
        if name in ("attention.wqkv.weight", "attention.wqkv.bias"):
            return _stacked_rows([(config.num_heads * config.head_dim, q)] +
                                 [(config.num_kv_heads * config.head_dim, kv)] * 2, index, count, param)
        if name == "feed_forward.w13.weight":
            return _stacked_rows([(config.hidden_dim, self._hidden(config))] * 2, index, count, param)
        if name == "attention.wo.weight":
            return TensorPart(cols=q)
        if name == "feed_forward.w2.weight":
            return TensorPart(cols=self._hidden(config))
        return None

    def parallelize(self, model: MiniLLM, config: ModelConfig) -> None:
        """Wrap the built shard's modules in the collectives: the embedding's and each layer's two all-reduces,
        the LM head's gather. The model's config then names the whole vocabulary again."""
        rows = self._vocab_rows(config)
        start = min(self.rank * rows, config.vocab_size)
        model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, start, min(rows, config.vocab_size - start))
        model.output = GatheredLogits(model.output, config.vocab_size)
        for block in model.layers:
            block.attention.wo = AllReduced(block.attention.wo)
            block.feed_forward.w2 = AllReduced(block.feed_forward.w2)
        model.config = replace(model.config, vocab_size=config.vocab_size)

    def _even(self, n: int) -> tuple[int, int]:
        share = n // self.size
        return self.rank * share, (self.rank + 1) * share

    def _hidden(self, config: ModelConfig) -> tuple[int, int]:
        """This rank's hidden features: whole blocks, the first ranks taking one more where they do not divide."""
        unit = _unit(config.hidden_dim)
        base, extra = divmod(config.hidden_dim // unit, self.size)
        first = self.rank * base + min(self.rank, extra)
        return first * unit, (first + base + (self.rank < extra)) * unit

    def _vocab_rows(self, config: ModelConfig) -> int:
        return -(-config.vocab_size // self.size)


def _unit(features: int) -> int:
    return 256 if features % 256 == 0 else 32 if features % 32 == 0 else 1


def _stacked_rows(segments: list[tuple[int, tuple[int, int]]], index: int, count: int, param: str) -> TensorPart:
    """The rows kept of a parameter stacked from segments (q, k, v or gate, up: each its size and this rank's
    [start, stop) of it), stored as one tensor per segment or as one tensor of them all (Phi-3's)."""
    if count == len(segments):
        return TensorPart(rows=(segments[index][1],))
    if count == 1:
        offsets = [sum(size for size, _ in segments[:i]) for i in range(len(segments))]
        return TensorPart(rows=tuple((offset + start, offset + stop) for offset, (_, (start, stop)) in zip(offsets, segments)))
    raise ValueError(f"{param}: {count} stored tensors for {len(segments)} parts; cannot shard it")
