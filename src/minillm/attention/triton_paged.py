"""Our Triton kernels for attention over the paged KV cache (the GPU's counterpart of paged_cpu.py).

- `paged_prefill`: FlashAttention-2 forward over a packed batch of variable-length query chunks
  (`query_start`, as FlashAttention's cu_seqlens), causal and aligned bottom-right against each
  sequence's cached length, reading earlier keys from the pages in place (prefix-cache hits, chunked
  prefill), grouped-query heads without repeating K/V; also returns the log-sum-exp.
- `paged_decode`: one query per sequence, its keys split into `num_splits` ranges computed in parallel
  (flash-decoding), each with its own max and sum, then `_reduce` combines them exactly by their LSEs.

float32 accumulation for any input dtype. Written with plain pointer arithmetic so that they run
on CPU tensors under TRITON_INTERPRET=1 (how the tests check them; the interpreter's bf16 `tl.dot`
is unreliable, so tests use float32 there). `triton` is an optional dependency (`.[gpu]`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(q: Tensor, k_pool: Tensor) -> None:
    """The shapes and dtypes the kernels are written for, refused by name otherwise."""
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[-1]} is not supported by the Triton kernels (supported: {HEAD_DIMS})")
    if q.dtype not in DTYPES or k_pool.dtype != q.dtype:
        raise ValueError(f"q {q.dtype} / KV cache {k_pool.dtype}: the Triton kernels take one of {DTYPES} for both")
    if q.shape[1] % k_pool.shape[2]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k_pool.shape[2]} KV heads")


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, table_ptr, seqlens_ptr, starts_ptr, scale,
                    max_pages, page: tl.constexpr, num_heads: tl.constexpr, num_kv_heads: tl.constexpr,
                    dim: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    seq, head, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, end = tl.load(starts_ptr + seq), tl.load(starts_ptr + seq + 1)
    n_q = end - start
    if tile * BLOCK_M >= n_q:
        return
    seqlen = tl.load(seqlens_ptr + seq)
    kv_head = head // (num_heads // num_kv_heads)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence's chunk
    row_ok = rows < n_q
    pos = seqlen - n_q + rows  # each query's position (bottom-right causal)
    d = tl.arange(0, dim)
    q = tl.load(q_ptr + ((start + rows) * num_heads + head)[:, None] * dim + d[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(tl.float32) * scale
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, dim], tl.float32)
    last = tl.minimum(seqlen, seqlen - n_q + (tile + 1) * BLOCK_M)  # keys past the tile's last query: skipped
    for k_start in range(0, last, BLOCK_N):
        keys = k_start + tl.arange(0, BLOCK_N)
        key_ok = keys < seqlen
        slot = tl.load(table_ptr + seq * max_pages + keys // page, mask=key_ok, other=0) * page + keys % page
        kv_off = (slot * num_kv_heads + kv_head)[:, None] * dim + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=key_ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_off, mask=key_ok[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k))
        visible = (keys[None, :] <= pos[:, None]) & key_ok[None, :] & row_ok[:, None]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = tl.exp(s - shift[:, None])
        rescale = tl.exp(m_i - shift)
        l_i = l_i * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p, v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_rows = (start + rows) * num_heads + head
    tl.store(out_ptr + out_rows[:, None] * dim + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + out_rows, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(tl.where(l_i == 0.0, 1.0, l_i))),
             mask=row_ok)


def paged_prefill(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, seqlens: Tensor,
                  query_start: Tensor, max_query_len: int, scale: float | None = None,
                  block_m: int = 16, block_n: int = 16) -> tuple[Tensor, Tensor]:
    """Packed queries q [N, Hq, D] over pools [num_blocks, page, Hkv, D] -> (out [N, Hq, D], lse [N, Hq] float32).
    `max_query_len` (the longest chunk, known on the host) sizes the grid without a device sync."""
    _check(q, k_pool)
    n, num_heads, dim = q.shape
    _, page, num_kv_heads, _ = k_pool.shape
    out = torch.empty_like(q)
    lse = torch.empty(n, num_heads, dtype=torch.float32, device=q.device)
    grid = (block_table.shape[0], num_heads, triton.cdiv(max(max_query_len, 1), block_m))
    _prefill_kernel[grid](q, k_pool, v_pool, out, lse, block_table, seqlens, query_start,
                          dim ** -0.5 if scale is None else scale, block_table.shape[1], page, num_heads,
                          num_kv_heads, dim, block_m, block_n)
    return out, lse


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, part_ptr, part_lse_ptr, table_ptr, seqlens_ptr, scale, max_pages,
                   keys_per_split, num_splits, page: tl.constexpr, num_heads: tl.constexpr,
                   num_kv_heads: tl.constexpr, dim: tl.constexpr, BLOCK_N: tl.constexpr):
    seq, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seqlen = tl.load(seqlens_ptr + seq)
    kv_head = head // (num_heads // num_kv_heads)
    d = tl.arange(0, dim)
    q = tl.load(q_ptr + (seq * num_heads + head) * dim + d).to(tl.float32) * scale
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, seqlen)
    m_i = tl.zeros([], tl.float32) - float("inf")  # typed scalars: loop-carried values keep one type
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([dim], tl.float32)
    for k_start in range(lo, hi, BLOCK_N):
        keys = k_start + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        slot = tl.load(table_ptr + seq * max_pages + keys // page, mask=key_ok, other=0) * page + keys % page
        kv_off = (slot * num_kv_heads + kv_head)[:, None] * dim + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=key_ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_off, mask=key_ok[:, None], other=0.0).to(tl.float32)
        s = tl.where(key_ok, tl.sum(k * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp(s - m_new)
        rescale = tl.exp(m_i - m_new)
        l_i = l_i * rescale + tl.sum(p, 0)
        acc = acc * rescale + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    row = (seq * num_heads + head) * num_splits + split
    tl.store(part_ptr + row * dim + d, acc / tl.where(l_i == 0.0, 1.0, l_i))
    tl.store(part_lse_ptr + row, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(tl.where(l_i == 0.0, 1.0, l_i))))


@triton.jit
def _reduce_kernel(part_ptr, part_lse_ptr, out_ptr, num_splits, dim: tl.constexpr, SPLITS: tl.constexpr):
    row = tl.program_id(0)  # (sequence, head)
    splits = tl.arange(0, SPLITS)
    ok = splits < num_splits
    lse = tl.load(part_lse_ptr + row * num_splits + splits, mask=ok, other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.where(ok & (lse > float("-inf")), tl.exp(lse - tl.where(top == float("-inf"), 0.0, top)), 0.0)
    total = tl.sum(weight, 0)
    d = tl.arange(0, dim)
    parts = tl.load(part_ptr + (row * num_splits + splits)[:, None] * dim + d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + row * dim + d, out.to(out_ptr.dtype.element_ty))


def paged_decode(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, seqlens: Tensor,
                 max_seqlen: int, scale: float | None = None, num_splits: int | None = None,
                 block_n: int = 16) -> Tensor:
    """One query per sequence, q [B, Hq, D] over pools [num_blocks, page, Hkv, D] -> [B, Hq, D].
    Keys are split into `num_splits` ranges (default: about 256 keys each, up to 32) computed in parallel,
    then combined by their log-sum-exps; `max_seqlen` (known on the host) sizes the split."""
    _check(q, k_pool)
    batch, num_heads, dim = q.shape
    _, page, num_kv_heads, _ = k_pool.shape
    splits = num_splits or max(1, min(32, triton.cdiv(max_seqlen, 256)))
    keys_per_split = max(block_n, triton.cdiv(triton.cdiv(max(max_seqlen, 1), splits), block_n) * block_n)
    part = torch.empty(batch, num_heads, splits, dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, num_heads, splits)](q, k_pool, v_pool, part, part_lse, block_table, seqlens,
                                               dim ** -0.5 if scale is None else scale, block_table.shape[1],
                                               keys_per_split, splits, page, num_heads, num_kv_heads, dim, block_n)
    out = torch.empty_like(q)
    _reduce_kernel[(batch * num_heads,)](part, part_lse, out, splits, dim, triton.next_power_of_2(splits))
    return out


__all__ = ["paged_decode", "paged_prefill"]
