"""Our C++ paged attention kernel (attention/paged_cpu.py) against standard attention on the same keys
gathered into a contiguous copy: decode rows, and packed steps mixing decode rows with prefill
chunks; and the fallback when it cannot be built."""

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


def packed_case(heads, kv_heads, head_dim, page, lengths, q_lens, dtype):
    """A packed step: sequence b feeds its last q_lens[b] of lengths[b] keys as queries."""
    _, k_pool, v_pool, table, seqlens = paged_case(len(lengths), heads, kv_heads, head_dim, page, lengths, dtype)
    q = torch.randn(1, heads, sum(q_lens), head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    return q, k_pool, v_pool, table, seqlens, starts


def packed_reference(q, k_pool, v_pool, table, seqlens, starts):
    """Each sequence alone: its queries as one row, causal and bottom-right aligned, over its keys."""
    out = []
    for b in range(len(seqlens)):
        rows = q[:, :, starts[b]:starts[b + 1]].float()
        k, v = gather_pages(k_pool, table[b:b + 1]).float(), gather_pages(v_pool, table[b:b + 1]).float()
        out.append(standard_attention(rows, k, v, seqlens[b:b + 1].tolist(), causal=True))
    return torch.cat(out, dim=2)


MIXED = ([1, 40, 100, 7, 300, 17], [1, 40, 9, 1, 57, 16])  # decode rows, whole prompts, chunks after a prefix


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 64), (8, 1, 128), (6, 2, 80), (10, 2, 32)])
@pytest.mark.parametrize("page", [16, 7])
def test_packed_step_equals_each_sequence_alone_fp32(heads, kv_heads, head_dim, page):
    case = packed_case(heads, kv_heads, head_dim, page, *MIXED, torch.float32)
    ref = packed_reference(*case)
    q, k_pool, v_pool, table, seqlens, starts = case
    out = attention(q, k_pool, v_pool, seqlens, backend="paged", block_table=table, query_start=starts)
    assert out.shape == q.shape
    assert (out - ref).abs().max() <= 1e-5


def test_packed_step_bf16():
    q, k_pool, v_pool, table, seqlens, starts = case = packed_case(9, 3, 64, 16, *MIXED, torch.bfloat16)
    out = attention(q, k_pool, v_pool, seqlens, backend="paged", block_table=table, query_start=starts)
    assert out.dtype == torch.bfloat16
    assert (out.float() - packed_reference(*case)).abs().max() <= 2e-2


@pytest.mark.parametrize("backend", ["sdpa", "flash", "standard"])
def test_packed_step_on_other_backends_goes_through_rows(backend, monkeypatch):
    q, k_pool, v_pool, table, seqlens, starts = case = packed_case(6, 2, 64, 16, *MIXED, torch.float32)
    monkeypatch.setattr(paged_cpu, "_available", False)  # "paged" without the kernel too
    for name in (backend, "paged"):
        out = attention(q, k_pool, v_pool, seqlens, backend=name, block_table=table, query_start=starts)
        assert (out - packed_reference(*case)).abs().max() <= 1e-5


def test_kernel_rejects_bad_inputs():
    q, k_pool, v_pool, table, seqlens, starts = packed_case(4, 2, 64, 16, [10, 20], [1, 5], torch.float32)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        paged_cpu.paged_attention(q[0].transpose(0, 1).bfloat16(), k_pool, v_pool, table, seqlens, starts, 0.125)
    with pytest.raises(RuntimeError, match="query_start does not end"):
        paged_cpu.paged_attention(q[0].transpose(0, 1), k_pool, v_pool, table, seqlens, starts - 1, 0.125)
    with pytest.raises(RuntimeError, match="outside the pool"):
        paged_cpu.paged_attention(q[0].transpose(0, 1), k_pool, v_pool, table + 1000, seqlens, starts, 0.125)
