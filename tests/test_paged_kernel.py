"""Our C++ paged decode attention kernel (attention/paged_cpu.py) against standard attention on the
same keys gathered into a contiguous copy, and the fallback when it cannot be built."""

import pytest
import torch

from minillm.attention import attention, paged_cpu, standard_attention
from minillm.attention.common import gather_pages


def paged_case(batch, heads, kv_heads, head_dim, page, lengths, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pages = [max(1, (n + page - 1) // page) for n in lengths]
    num_blocks = sum(pages) + 3
    k_pool = torch.randn(num_blocks, page, kv_heads, head_dim, generator=g).to(dtype)
    v_pool = torch.randn(num_blocks, page, kv_heads, head_dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()  # pages scattered over the pool
    tables, start = [], 0
    for n in pages:
        tables.append(order[start:start + n] + [0] * (max(pages) - n))
        start += n
    q = torch.randn(batch, heads, 1, head_dim, generator=g).to(dtype)
    return q, k_pool, v_pool, torch.tensor(tables), torch.tensor(lengths)


def test_kernel_builds_here():
    # CI machines have a C++ compiler; without one the engine would silently lose the kernel
    assert paged_cpu.available()


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 64), (8, 1, 128), (6, 2, 80), (10, 2, 32)])
@pytest.mark.parametrize("page", [16, 7])
def test_paged_kernel_equals_standard_attention_fp32(heads, kv_heads, head_dim, page):
    lengths = [1, page, 3 * page + 2, 100]  # one key, a full page, pages + a partial one, a long row
    q, k_pool, v_pool, table, seqlens = paged_case(4, heads, kv_heads, head_dim, page, lengths, torch.float32)
    ref = standard_attention(q, gather_pages(k_pool, table), gather_pages(v_pool, table), lengths)
    out = attention(q, k_pool, v_pool, seqlens, backend="paged", block_table=table)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5


def test_paged_kernel_bf16():
    q, k_pool, v_pool, table, seqlens = paged_case(3, 9, 3, 64, 16, [5, 40, 300], torch.bfloat16)
    ref = standard_attention(q.float(), gather_pages(k_pool, table).float(), gather_pages(v_pool, table).float(),
                             seqlens.tolist())
    out = attention(q, k_pool, v_pool, seqlens, backend="paged", block_table=table)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 2e-2  # one bf16 rounding of inputs and output


def test_paged_kernel_detects_a_wrong_table():
    q, k_pool, v_pool, table, seqlens = paged_case(2, 4, 2, 64, 16, [40, 40], torch.float32)
    ref = attention(q, k_pool, v_pool, seqlens, backend="paged", block_table=table)
    swapped = table.flip(1)
    assert (attention(q, k_pool, v_pool, seqlens, backend="paged", block_table=swapped) - ref).abs().max() > 1e-2


def test_fallback_without_the_kernel_gives_the_same_result(monkeypatch):
    q, k_pool, v_pool, table, seqlens = paged_case(3, 9, 3, 64, 16, [5, 40, 77], torch.float32)
    with_kernel = attention(q, k_pool, v_pool, seqlens, backend="paged", block_table=table)
    monkeypatch.setattr(paged_cpu, "_available", False)
    without = attention(q, k_pool, v_pool, seqlens, backend="paged", block_table=table)
    assert (with_kernel - without).abs().max() <= 1e-5


def test_kernel_rejects_mismatched_dtypes():
    q, k_pool, v_pool, table, seqlens = paged_case(1, 4, 2, 64, 16, [10], torch.float32)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        paged_cpu.paged_decode(q[:, :, 0].bfloat16(), k_pool, v_pool, table, seqlens, 0.125)
