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

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor


HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_supported(head_dim: int, dtype: torch.dtype) -> None:
    """The head dims and dtypes the kernels are written for; others refused by name (at engine start)."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} is not supported by the Triton kernels (supported: {HEAD_DIMS}); "
                         "use attention_backend='sdpa'")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} is not supported by the Triton kernels (supported: {DTYPES})")


def _check(q: Tensor, k_pool: Tensor) -> None:
    check_supported(q.shape[-1], q.dtype)
    if k_pool.dtype != q.dtype:
        raise ValueError(f"q {q.dtype} / KV cache {k_pool.dtype}: the Triton kernels take one of {DTYPES} for both")
    if q.shape[1] % k_pool.shape[2]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k_pool.shape[2]} KV heads")


LOG2E = 1.4426950408889634  # scores are scaled by scale * log2(e) so the kernels use exp2


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 stays IEEE (a GPU would otherwise round it to TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _attend_keys(q, m_i, l_i, acc, k_ptr, v_ptr, table_ptr, seq, kv_head, pos, seqlen, qk_scale, max_pages,
                 k_start, page: tl.constexpr, num_kv_heads: tl.constexpr, dim: tl.constexpr,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One tile of keys into the online softmax; MASKED: apply the causal and length masks (only the
    tiles on a query tile's diagonal need them)."""
    keys = k_start + tl.arange(0, BLOCK_N)
    key_ok = keys < seqlen
    d = tl.arange(0, dim)
    slot = tl.load(table_ptr + seq * max_pages + keys // page, mask=key_ok, other=0) * page + keys % page
    kv_off = (slot * num_kv_heads + kv_head)[:, None] * dim + d[None, :]
    k = tl.load(k_ptr + kv_off, mask=key_ok[:, None], other=0.0)
    v = tl.load(v_ptr + kv_off, mask=key_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        s = tl.where((keys[None, :] <= pos[:, None]) & key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    p = tl.exp2(s - shift[:, None])
    rescale = tl.exp2(m_i - shift)
    l_i = l_i * rescale + tl.sum(p, 1)
    acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["max_pages"])
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, table_ptr, seqlens_ptr, starts_ptr, qk_scale,
                    max_pages, page: tl.constexpr, num_heads: tl.constexpr, num_kv_heads: tl.constexpr,
                    dim: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
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
    # q, k, v stay in their dtype for the tensor cores; scores and the accumulator are float32
    q = tl.load(q_ptr + ((start + rows) * num_heads + head)[:, None] * dim + d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, dim], tl.float32)
    first_pos = seqlen - n_q + tile * BLOCK_M
    visible_to_all = (first_pos + 1) // BLOCK_N * BLOCK_N  # key tiles every query of this tile sees whole
    for k_start in range(0, visible_to_all, BLOCK_N):
        m_i, l_i, acc = _attend_keys(q, m_i, l_i, acc, k_ptr, v_ptr, table_ptr, seq, kv_head, pos, seqlen, qk_scale,
                                     max_pages, k_start, page, num_kv_heads, dim, BLOCK_N, False, PRECISION)
    last = tl.minimum(seqlen, first_pos + BLOCK_M)  # keys past the tile's last query: skipped
    for k_start in range(visible_to_all, last, BLOCK_N):
        m_i, l_i, acc = _attend_keys(q, m_i, l_i, acc, k_ptr, v_ptr, table_ptr, seq, kv_head, pos, seqlen, qk_scale,
                                     max_pages, k_start, page, num_kv_heads, dim, BLOCK_N, True, PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_rows = (start + rows) * num_heads + head
    tl.store(out_ptr + out_rows[:, None] * dim + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i))) / 1.4426950408889634  # back to natural log
    tl.store(lse_ptr + out_rows, tl.where(l_i == 0.0, float("-inf"), lse), mask=row_ok)


def prefill_tiles(dim: int, device: torch.device, max_query_len: int = 0) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head dim and the step's longest chunk: large tiles
    on a GPU, small ones for the CPU interpreter (where tile size only costs time)."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    # the fastest of those tried on an H200 (benchmarks/results/gpu_h200/run2_kernels.md)
    if dim <= 64:
        return 64, 64, 4, 3
    if dim <= 128:
        return (128, 32, 4, 3) if max_query_len <= 1024 else (128, 128, 8, 3)
    return 64, 32, 8, 2


def paged_prefill(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, seqlens: Tensor,
                  query_start: Tensor, max_query_len: int, scale: float | None = None,
                  tiles: tuple[int, int, int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Packed queries q [N, Hq, D] over pools [num_blocks, page, Hkv, D] -> (out [N, Hq, D], lse [N, Hq] float32).
    `max_query_len` (the longest chunk, known on the host) sizes the grid without a device sync;
    `tiles`: (BLOCK_M, BLOCK_N, num_warps, num_stages), default `prefill_tiles`."""
    _check(q, k_pool)
    n, num_heads, dim = q.shape
    _, page, num_kv_heads, _ = k_pool.shape
    block_m, block_n, warps, stages = tiles or prefill_tiles(dim, q.device, max_query_len)
    out = torch.empty_like(q)
    lse = torch.empty(n, num_heads, dtype=torch.float32, device=q.device)
    grid = (block_table.shape[0], num_heads, triton.cdiv(max(max_query_len, 1), block_m))
    _prefill_kernel[grid](q, k_pool, v_pool, out, lse, block_table, seqlens, query_start,
                          (dim ** -0.5 if scale is None else scale) * LOG2E, block_table.shape[1], page, num_heads,
                          num_kv_heads, dim, block_m, block_n, _precision(q.dtype), num_warps=warps, num_stages=stages)
    return out, lse


@triton.jit(do_not_specialize=["max_pages", "num_splits"])
def _decode_kernel(q_ptr, k_ptr, v_ptr, part_ptr, part_lse_ptr, table_ptr, seqlens_ptr, qk_scale, max_pages,
                   num_splits, page: tl.constexpr, num_heads: tl.constexpr, num_kv_heads: tl.constexpr,
                   dim: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, MIN_KEYS: tl.constexpr,
                   PRECISION: tl.constexpr):
    # one program per (sequence, KV head, split): the KV head's query heads together (GQA), so each key
    # is read once per group, not once per query head
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    group: tl.constexpr = num_heads // num_kv_heads
    seqlen = tl.load(seqlens_ptr + seq)
    # this sequence's own split count (by its length, not the batch's), so its result is the same
    # whichever batch, or CUDA graph, it runs in
    splits = tl.maximum(tl.minimum(num_splits, tl.cdiv(seqlen, MIN_KEYS)), 1)
    per_split = tl.cdiv(tl.cdiv(seqlen, splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seqlen)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < group
    heads = kv_head * group + g
    d = tl.arange(0, dim)
    q = tl.load(q_ptr + (seq * num_heads + heads)[:, None] * dim + d[None, :], mask=g_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, dim], tl.float32)
    for k_start in range(lo, hi, BLOCK_N):
        keys = k_start + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        slot = tl.load(table_ptr + seq * max_pages + keys // page, mask=key_ok, other=0) * page + keys % page
        kv_off = (slot * num_kv_heads + kv_head)[:, None] * dim + d[None, :]
        k = tl.load(k_ptr + kv_off, mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=key_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - shift[:, None])
        rescale = tl.exp2(m_i - shift)
        l_i = l_i * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    rows = (seq * num_heads + heads) * num_splits + split
    tl.store(part_ptr + rows[:, None] * dim + d[None, :], acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None],
             mask=g_ok[:, None])
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))  # base 2, as m_i
    tl.store(part_lse_ptr + rows, lse, mask=g_ok)


@triton.jit
def _reduce_kernel(part_ptr, part_lse_ptr, out_ptr, num_splits, dim: tl.constexpr, SPLITS: tl.constexpr):
    row = tl.program_id(0)  # (sequence, head)
    splits = tl.arange(0, SPLITS)
    ok = splits < num_splits
    lse = tl.load(part_lse_ptr + row * num_splits + splits, mask=ok, other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.where(ok & (lse > float("-inf")), tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top)), 0.0)
    total = tl.sum(weight, 0)
    d = tl.arange(0, dim)
    parts = tl.load(part_ptr + (row * num_splits + splits)[:, None] * dim + d[None, :],
                    mask=ok[:, None] & (weight[:, None] > 0.0), other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + row * dim + d, out.to(out_ptr.dtype.element_ty))


MIN_KEYS_PER_SPLIT = 128


@functools.cache
def _multiprocessors(index: int | None) -> int:  # asked once, not per layer per step
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode_splits(batch: int, num_kv_heads: int, max_seqlen: int, device: torch.device) -> int:
    """How many ranges to split the keys into: enough programs to fill the GPU (four per multiprocessor)
    when batch x KV heads alone do not, never ranges under MIN_KEYS_PER_SPLIT keys, at most 64."""
    units = _multiprocessors(device.index) * 4 if device.type == "cuda" else 8
    return max(1, min(64, triton.cdiv(max(max_seqlen, 1), MIN_KEYS_PER_SPLIT), triton.cdiv(units, batch * num_kv_heads)))


def paged_decode(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_table: Tensor, seqlens: Tensor,
                 max_seqlen: int, scale: float | None = None, num_splits: int | None = None,
                 block_n: int | None = None, min_keys_per_split: int = MIN_KEYS_PER_SPLIT) -> Tensor:
    """One query per sequence, q [B, Hq, D] over pools [num_blocks, page, Hkv, D] -> [B, Hq, D].
    Each sequence's keys are split into up to `num_splits` ranges (default `decode_splits`; a sequence
    uses fewer when it is short: ranges of at least `min_keys_per_split`) computed in parallel, then combined by their log-sum-exps.
    `max_seqlen` (known on the host; a CUDA graph passes its largest) sizes the grid."""
    _check(q, k_pool)
    batch, num_heads, dim = q.shape
    _, page, num_kv_heads, _ = k_pool.shape
    splits = num_splits or decode_splits(batch, num_kv_heads, max_seqlen, q.device)
    block_n = block_n or (64 if q.device.type == "cuda" else 16)
    group = num_heads // num_kv_heads
    block_g = max(16, triton.next_power_of_2(group)) if q.device.type == "cuda" else triton.next_power_of_2(group)
    part = torch.empty(batch, num_heads, splits, dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, num_kv_heads, splits)](q, k_pool, v_pool, part, part_lse, block_table, seqlens,
                                                  (dim ** -0.5 if scale is None else scale) * LOG2E,
                                                  block_table.shape[1], splits, page, num_heads, num_kv_heads, dim,
                                                  block_g, block_n, min_keys_per_split, _precision(q.dtype),
                                                  num_warps=4, num_stages=2)
    out = torch.empty_like(q)
    _reduce_kernel[(batch * num_heads,)](part, part_lse, out, splits, dim, triton.next_power_of_2(splits))
    return out


__all__ = ["paged_decode", "paged_prefill"]
