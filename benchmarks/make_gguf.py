"""Write GGUF files of real model shapes, for speed and memory measurements (not for text: the weights are
random valid blocks).

Each tensor gets the type llama.cpp's quantizer gives it in the chosen mix (`llama_tensor_get_type_impl` in
its src/llama-quant.cpp): Q4_K_M puts Q6_K on the output (or a tied embedding) and on attn_v / ffn_down of
the layers `use_more_bits` picks, Q4_K elsewhere; where a row is not a multiple of 256 a K-type falls back
as llama.cpp's does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL). Blocks are random bytes
with sane fp16 scales. The tokenizer (needed by llama.cpp) is copied from a vocabulary-only GGUF such as
llama.cpp's ggml-vocab-llama-bpe.gguf / ggml-vocab-qwen2.gguf, padded to the model's vocabulary.

    python benchmarks/make_gguf.py --shape qwen2.5-1.5b --mix Q4_K_M --vocab ggml-vocab-qwen2.gguf out.gguf
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import gguf
import numpy as np

T = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Shape:
    arch: str
    layers: int
    dim: int
    heads: int
    kv_heads: int
    hidden: int
    vocab: int
    tied: bool
    rope_theta: float = 500000.0
    head_dim: int | None = None  # dim / heads where None
    spm: bool = False  # the vocabulary as a SentencePiece one


SHAPES = {
    # with --vocab ggml-vocab-gemma-4.gguf: its 262144 pieces, as Gemma 3's SentencePiece vocabulary (its scores,
    # no merges: as in the real files)
    "gemma-3-270m": Shape("gemma3", 18, 640, 4, 1, 2048, 262144, True, 1e6, head_dim=256, spm=True),
    "gemma-3-1b": Shape("gemma3", 26, 1152, 4, 1, 6912, 262144, True, 1e6, head_dim=256, spm=True),
    "qwen2.5-0.5b": Shape("qwen2", 24, 896, 14, 2, 4864, 151936, True, 1e6),
    "llama-3.2-1b": Shape("llama", 16, 2048, 32, 8, 8192, 128256, True),
    "qwen2.5-1.5b": Shape("qwen2", 28, 1536, 12, 2, 8960, 151936, True, 1e6),
    "qwen2.5-3b": Shape("qwen2", 36, 2048, 16, 2, 11008, 151936, True, 1e6),
    "llama-3.1-8b": Shape("llama", 32, 4096, 32, 8, 14336, 128256, False),
}

# mix -> (base type, type of output / tied embedding, type of attn_v and ffn_down on use_more_bits layers)
MIXES = {
    "Q4_K_M": (T.Q4_K, T.Q6_K, T.Q6_K),
    "Q5_K_M": (T.Q5_K, T.Q6_K, T.Q6_K),
    "Q6_K": (T.Q6_K, T.Q6_K, T.Q6_K),
    "Q8_0": (T.Q8_0, T.Q8_0, T.Q8_0),
    "IQ4_XS": (T.IQ4_XS, T.Q6_K, T.IQ4_XS),
    "Q4_0": (T.Q4_0, T.Q6_K, T.Q4_0),
}
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.IQ4_XS: T.IQ4_NL}
# byte offsets of each type's fp16 scale fields, and a sane value for them
SCALES = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q2_K: [80, 82], T.Q3_K: [108],
          T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.IQ4_NL: [0], T.IQ4_XS: [0]}


def use_more_bits(layer: int, layers: int) -> bool:
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(name: str, mix: str, layer: int, shape: Shape, row: int) -> T:
    base, output, more = MIXES[mix]
    if name == "output" or (name == "token_embd" and shape.tied):
        kind = output if row % 256 == 0 else T.Q8_0
    elif name in ("attn_v", "ffn_down") and use_more_bits(layer, shape.layers):
        kind = more
    else:
        kind = base
    return FALLBACK.get(kind, kind) if row % 256 and kind in FALLBACK else kind


def random_blocks(kind: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    per, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    scale = 0.002 if per == 256 else 0.02 / (127 if kind == T.Q8_0 else 8)
    for offset in SCALES[kind]:
        raw[..., offset:offset + 2] = (rng.random((rows, cols // per, 1)) * scale).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def write(path: str, shape: Shape, mix: str, vocab_file: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, shape.arch)
    head_dim = shape.head_dim or shape.dim // shape.heads
    writer.add_block_count(shape.layers)
    writer.add_context_length(32768)
    writer.add_embedding_length(shape.dim)
    writer.add_feed_forward_length(shape.hidden)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(1e-6)
    if shape.arch == "gemma3":  # its head size is not dim / heads; local layers see a window of 512
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(512)
    _copy_vocabulary(writer, vocab_file, shape.vocab, shape.spm)

    def add(name: str, rows: int, cols: int, layer: int = 0) -> None:
        kind = tensor_type(name.split(".")[-2] if "." in name else name, mix, layer, shape, cols)
        blocks = random_blocks(kind, rows, cols, rng)
        writer.add_tensor(f"{name}.weight", blocks, raw_shape=blocks.shape, raw_dtype=kind)

    add("token_embd", shape.vocab, shape.dim)
    for i in range(shape.layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(shape.dim, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(shape.dim, np.float32))
        for part, rows in (("attn_q", shape.heads * head_dim), ("attn_k", shape.kv_heads * head_dim),
                           ("attn_v", shape.kv_heads * head_dim)):
            add(f"blk.{i}.{part}", rows, shape.dim, i)
            if shape.arch == "qwen2":
                writer.add_tensor(f"blk.{i}.{part}.bias", np.zeros(rows, np.float32))
        add(f"blk.{i}.attn_output", shape.dim, shape.heads * head_dim, i)
        add(f"blk.{i}.ffn_gate", shape.hidden, shape.dim, i)
        add(f"blk.{i}.ffn_up", shape.hidden, shape.dim, i)
        add(f"blk.{i}.ffn_down", shape.dim, shape.hidden, i)
        if shape.arch == "gemma3":
            for norm, size in (("attn_q_norm", head_dim), ("attn_k_norm", head_dim), ("post_attention_norm", shape.dim),
                               ("post_ffw_norm", shape.dim)):
                writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(size, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(shape.dim, np.float32))
    if not shape.tied:
        add("output", shape.vocab, shape.dim)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _copy_vocabulary(writer: gguf.GGUFWriter, vocab_file: str, size: int, spm: bool = False) -> None:
    """The tokenizer.* fields of a vocabulary-only GGUF, its token list padded to `size` (`spm`: as a
    SentencePiece vocabulary, tokenizer model "llama", without merges)."""
    reader = gguf.GGUFReader(vocab_file)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or key == "tokenizer.chat_template" or (spm and key.endswith("merges")):
            continue
        value = "llama" if spm and key == "tokenizer.ggml.model" else field.contents()
        if key == "tokenizer.ggml.tokens":
            value = list(value) + [f"[PAD{i}]" for i in range(len(value), size)]
        elif key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            value = list(value) + [4 if key.endswith("type") else 0.0] * (size - len(value))
        if isinstance(value, list):
            kind = gguf.GGUFValueType.STRING if value and isinstance(value[0], str) else None
            if key.endswith("token_type"):
                kind = gguf.GGUFValueType.INT32
            elif key.endswith("scores"):
                kind = gguf.GGUFValueType.FLOAT32
            writer.add_array(key, value) if kind is None else writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, kind)
        else:
            writer.add_key_value(key, value, field.types[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--shape", choices=SHAPES, required=True)
    parser.add_argument("--mix", choices=MIXES, default="Q4_K_M")
    parser.add_argument("--vocab", required=True, help="a vocabulary-only GGUF whose tokenizer the file gets")
    args = parser.parse_args()
    write(args.out, SHAPES[args.shape], args.mix, args.vocab)


if __name__ == "__main__":
    main()
