"""GGUF quantized weights computed on their own blocks, by our C++ kernels (csrc/ggml_matmul.cpp).

Q4_0, Q4_1 and Q8_0 keep the file's blocks. Q4_K is repacked at load into blocks of 32 with a float32
scale and minimum (Q4F: each sub-block's 6-bit scale times the super-block scale, exactly); Q5_0, Q5_1,
Q5_K and Q6_K into int8 codes with a float32 scale and minimum per 16 weights (I8S16). Both repacks keep
every weight's value exactly; they cost memory (6 and 12 bits per weight), not accuracy. Then the blocks of
every 16 rows are interleaved (`interleave`), so that the kernels compute 16 rows per vector instruction.
Other types have no kernel: the caller keeps a dequantized float layer.
"""

from __future__ import annotations

import logging

import gguf
import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger("minillm")

Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 12, 13, 14  # GGML type ids
Q4F, I8S16 = 100, 101  # our repacked layouts
KERNEL_TYPES = {"Q4_0": Q4_0, "Q4_1": Q4_1, "Q8_0": Q8_0, "Q4_K": Q4_K, "Q5_0": Q5_0, "Q5_1": Q5_1,
                "Q5_K": Q5_K, "Q6_K": Q6_K}
NATIVE = (Q4_0, Q4_1, Q8_0)  # computed on the file's own bytes
BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34, Q4F: 24, I8S16: 48}
HEADER_BYTES = {Q4_0: 2, Q4_1: 4, Q8_0: 2, Q4F: 8, I8S16: 16}  # scale fields of a block: fp16, or f32 in ours
GROUP = 16  # rows interleaved together: one per lane of a 512-bit vector of int32


def _f16(raw: np.ndarray) -> np.ndarray:
    """fp16 values stored in the last axis (2 bytes) -> float32."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs packed in 12 bytes of a Q4_K / Q5_K super-block."""
    s = s.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4], mn[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def decode_codes(raw: np.ndarray, kind: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of blocks [rows, bytes] -> codes int8 [rows, K], scale and minimum [rows, K / 16] (float32)
    such that weight = code * scale + minimum for each run of 16 weights."""
    per, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]  # weights, bytes per block
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, size)
    if kind in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0):
        d = _f16(b[..., 0:2])
        if kind == Q8_0:
            q, m = b[..., 2:].view(np.int8), np.zeros_like(d)
        else:
            start = {Q4_0: 2, Q4_1: 4, Q5_0: 6, Q5_1: 8}[kind]
            nib = b[..., start:start + 16]
            q = np.concatenate([nib & 0xF, nib >> 4], axis=-1).astype(np.int32)
            if kind in (Q5_0, Q5_1):
                qh = np.ascontiguousarray(b[..., start - 4:start]).view(np.uint32)
                q |= ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4
            m = -8 * d if kind == Q4_0 else -16 * d if kind == Q5_0 else _f16(b[..., 2:4])
        halves = lambda a: np.repeat(a, 2, axis=-1)  # noqa: E731  (one value per block -> per 16)
        return q.astype(np.int8).reshape(rows, -1), halves(d).reshape(rows, -1), halves(m).reshape(rows, -1)
    if kind in (Q4_K, Q5_K):
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = _k_scales(b[..., 4:16])
        qs = b[..., 16:144] if kind == Q4_K else b[..., 48:176]
        chunks = qs.reshape(rows, -1, 4, 32)  # 4 chunks of 64 weights: low nibbles, then high
        q = np.stack([chunks & 0xF, chunks >> 4], axis=3).astype(np.int32)  # [rows, sb, 4, 2, 32]
        if kind == Q5_K:
            qh = b[..., 16:48][:, :, None, None, :]  # bit (2c + h) of byte l: weight l of sub-block 2c + h
            shift = (2 * np.arange(4)[:, None] + np.arange(2)[None, :])[None, None, :, :, None]
            q |= ((qh >> shift) & 1).astype(np.int32) << 4
        scale, low = d[..., None] * sc, -dmin[..., None] * mn  # [rows, sb, 8] per 32 weights
        return (q.astype(np.int8).reshape(rows, -1), np.repeat(scale, 2, -1).reshape(rows, -1),
                np.repeat(low, 2, -1).reshape(rows, -1))
    if kind == Q6_K:
        ql, qh, sc, d = b[..., 0:128], b[..., 128:192], b[..., 192:208].view(np.int8), _f16(b[..., 208:210])
        ql, qh = ql.reshape(rows, -1, 2, 64), qh.reshape(rows, -1, 2, 1, 32)
        low = np.stack([ql[..., :32] & 0xF, ql[..., 32:] & 0xF, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=3)
        high = (qh >> (2 * np.arange(4)[:, None])) & 3  # [rows, sb, 2, 4, 32]
        q = (low.astype(np.int32) | (high.astype(np.int32) << 4)) - 32
        return q.astype(np.int8).reshape(rows, -1), (d[..., None] * sc).reshape(rows, -1), np.zeros((rows, sc.shape[1] * 16), np.float32)
    raise ValueError(f"no kernel for GGML type {kind}")


def encode(codes: np.ndarray, scale: np.ndarray, low: np.ndarray, fmt: int) -> np.ndarray:
    """codes/scale/low (as from decode_codes) -> rows of Q4F or I8S16 blocks [rows, bytes]."""
    rows = codes.shape[0]
    q = codes.reshape(rows, -1, 32)
    if fmt == Q4F:  # codes 0..15 and one scale/min per 32 weights
        head = np.stack([scale[:, ::2], low[:, ::2]], axis=-1).astype(np.float32).view(np.uint8)
        u = q.astype(np.uint8)
        nib = u[..., :16] | (u[..., 16:] << 4)
        return np.concatenate([head, nib], axis=-1).reshape(rows, -1)
    head = np.concatenate([scale.reshape(rows, -1, 2), low.reshape(rows, -1, 2)], axis=-1).astype(np.float32)
    return np.concatenate([head.view(np.uint8), q.view(np.uint8)], axis=-1).reshape(rows, -1)


def interleave(rows: np.ndarray, fmt: int) -> np.ndarray:
    """Rows of blocks [rows, bytes] -> the kernels' layout, same shape: groups of 16 rows (the last one: the
    rows left), block by block; a block's tile holds each scale field for the group's rows in turn, then the
    codes as vectors of 4 consecutive weights of every row (int8 codes plus 128). See csrc/ggml_matmul.cpp."""
    n, row_bytes = rows.shape
    size, head = BLOCK_BYTES[fmt], HEADER_BYTES[fmt]
    field = np.uint32 if fmt in (Q4F, I8S16) else np.uint16  # moved as whole values, not byte by byte
    nb = row_bytes // size
    out = np.empty_like(rows)
    full = n - n % GROUP
    for start, stop, width in ((0, full, GROUP), (full, n, n - full)):
        if stop == start:
            continue
        blocks = rows[start:stop].reshape(-1, width, nb, size)  # [groups, rows, blocks, bytes]
        tiles = out[start:stop].reshape(-1, nb, width * size)  # [groups, blocks, tile bytes]
        # (aligned copies first: numpy moves misaligned 2- and 4-byte values one byte at a time)
        scales = np.ascontiguousarray(blocks[..., :head]).view(field).transpose(0, 2, 3, 1)  # [groups, blocks, fields, rows]
        tiles[..., :width * head].view(field).reshape(scales.shape)[...] = scales
        codes = np.ascontiguousarray(blocks[..., head:]).view(np.uint32).transpose(0, 2, 3, 1)  # [.., vectors, rows] x 4 B
        if fmt in (Q8_0, I8S16):
            codes = codes ^ np.uint32(0x80808080)
        tiles[..., width * head:].view(np.uint32).reshape(codes.shape)[...] = codes
    return out


def kernel_weights(parts: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, int]:
    """Blocks of one or more stacked tensors ([rows, bytes], GGML type) -> (the kernel's rows, its format).
    Tensors of one native type keep their blocks; otherwise each is repacked. Then `interleave`d."""
    kinds = {kind for _, kind in parts}
    if len(kinds) == 1 and next(iter(kinds)) in NATIVE:
        fmt, rows = next(iter(kinds)), np.concatenate([raw for raw, _ in parts])
    else:
        fmt = Q4F if kinds == {Q4_K} else I8S16
        rows = np.concatenate([encode(*decode_codes(raw, kind), fmt) for raw, kind in parts])
    return interleave(rows, fmt), fmt


class GGMLLinear(nn.Module):
    """y = x W^T (+ b) on quantized rows [out, bytes] as `kernel_weights` returns them; float32 in and out.

    With `swiglu`, the rows are gate then up (as FeedForward.w13) and the layer returns
    silu(gate) * up, fused in the kernel (see GGMLFeedForward)."""

    def __init__(self, weight: Tensor, fmt: int, in_features: int, bias: Tensor | None = None,
                 swiglu: bool = False) -> None:
        super().__init__()
        if in_features % 32 or weight.shape[1] != in_features // 32 * BLOCK_BYTES[fmt]:
            raise ValueError(f"{weight.shape[1]} bytes per row do not hold {in_features} weights in format {fmt}")
        self.register_buffer("weight", weight, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.fmt, self.in_features, self.out_features = fmt, in_features, weight.shape[0]
        self.applies_swiglu = swiglu

    def forward(self, x: Tensor) -> Tensor:
        # every row on the exact int8 kernel (-1: no GEMM rows); fast_prefill's GEMM runs in the fused decoder
        return torch.ops.minillm.ggml_linear(x.float(), self.weight, self.fmt, self.in_features, self.bias,
                                             self.applies_swiglu, -1)

    def dequantized_weight(self) -> Tensor:
        """The float32 [out, in] weight the kernel computes with."""
        ids = torch.arange(self.out_features)
        return torch.ops.minillm.ggml_dequantize_rows(self.weight, self.fmt, self.in_features, ids)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, swiglu={self.applies_swiglu}"


class GGMLFeedForward(nn.Module):
    """FeedForward (SwiGLU) whose gate/up layer applies silu(gate) * up in its kernel: swapped in for the
    model's FeedForward when that layer is on GGUF blocks (w2 may be too, or a dequantized nn.Linear)."""

    def __init__(self, w13: GGMLLinear, w2: nn.Module) -> None:
        super().__init__()
        self.w13 = GGMLLinear(w13.weight, w13.fmt, w13.in_features, w13.bias, swiglu=True)  # the same blocks
        self.w2 = w2

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.w13(x))


class GGMLEmbedding(nn.Module):
    """Token embeddings looked up in a quantized table (rows as `kernel_weights` returns them): only the rows
    asked for are dequantized."""

    def __init__(self, weight: Tensor, fmt: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.fmt, self.embedding_dim, self.num_embeddings = fmt, dim, weight.shape[0]

    def forward(self, ids: Tensor) -> Tensor:
        rows = torch.ops.minillm.ggml_dequantize_rows(self.weight, self.fmt, self.embedding_dim, ids.reshape(-1))
        return rows.view(*ids.shape, self.embedding_dim)


__all__ = ["GGMLEmbedding", "GGMLFeedForward", "GGMLLinear", "KERNEL_TYPES", "decode_codes", "encode", "interleave", "kernel_weights"]
