"""Our C++ paged attention kernel (attention/paged_cpu.py) against standard attention on the same keys
gathered into a contiguous copy: decode rows, and packed steps mixing decode rows with prefill
chunks; the reference backends on the same packed steps; and the choice when it cannot be built."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from minillm import kernels
from minillm.attention import LayerAttention, paged_cpu, select_attention, standard_attention
from minillm.attention.common import gather_pages
from minillm.cache import PagedStep


def kernel(q, k_pool, v_pool, table, seqlens, starts=None):
    """The kernel on packed q [N, H, D]; rows [B, H, 1, D] are taken as B one-token sequences."""
    if not paged_cpu.available():  # loaded here too, so that any test of this file runs alone
        pytest.skip("the paged attention kernel does not build here")
    if starts is None:
        out = kernel(q[:, :, 0], k_pool, v_pool, table, seqlens, torch.arange(q.shape[0] + 1))
        return out.unsqueeze(2)
    return paged_cpu.paged_attention(q, k_pool, v_pool, table, seqlens, starts, q.shape[-1] ** -0.5)


def packed_step(backend, table, seqlens, starts, page):
    counts = (starts[1:] - starts[:-1]).tolist()
    return PagedStep(SimpleNamespace(block_size=page), select_attention(backend, "cpu", torch.float32),
                     torch.zeros(sum(counts), dtype=torch.long), seqlens, table, starts, None, -1, counts, seqlens.tolist(),
                     torch.zeros(sum(counts), dtype=torch.long))


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


LEVELS = list(kernels.PAGED_ATTENTION_LEVELS)


@pytest.mark.slow
@pytest.mark.parametrize("level", LEVELS)
def test_every_build_this_cpu_runs_passes_the_kernel_tests(level):
    """The kernel is built once per x86 level (never for one machine alone); each build this CPU can run,
    pinned with MINILLM_ISA, is the one loaded and passes the rest of this file."""
    best = kernels.paged_attention_level()
    if LEVELS.index(level) < LEVELS.index(best):
        pytest.skip(f"this CPU runs the {best} build at best, not {level}")
    env = {key: value for key, value in os.environ.items() if key != "MINILLM_ISA"}
    if level != best:
        env["MINILLM_ISA"] = level
    code = "from minillm import kernels; from minillm.attention import paged_cpu; " \
           "print(kernels.paged_attention_level(), paged_cpu.available())"
    loaded = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == [level, "True"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "not every_build"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 64), (8, 1, 128), (6, 2, 80), (10, 2, 32),
                                                     (14, 2, 64), (12, 2, 128),  # Qwen2.5 0.5B, 1.5B
                                                     (4, 4, 96), (4, 1, 256)])  # Phi-3, Gemma 3
@pytest.mark.parametrize("page", [16, 7])
def test_paged_kernel_equals_standard_attention_fp32(heads, kv_heads, head_dim, page):
    lengths = [1, page, 3 * page + 2, 400]  # one key, a full page, pages + a partial one, a long row (4 spans)
    q, k_pool, v_pool, table, seqlens = paged_case(4, heads, kv_heads, head_dim, page, lengths, torch.float32)
    ref = standard_attention(q, gather_pages(k_pool, table), gather_pages(v_pool, table), lengths)
    out = kernel(q, k_pool, v_pool, table, seqlens)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5


def test_paged_kernel_bf16():
    q, k_pool, v_pool, table, seqlens = paged_case(3, 9, 3, 64, 16, [5, 40, 300], torch.bfloat16)
    ref = standard_attention(q.float(), gather_pages(k_pool, table).float(), gather_pages(v_pool, table).float(),
                             seqlens.tolist())
    out = kernel(q, k_pool, v_pool, table, seqlens)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 2e-2  # one bf16 rounding of inputs and output


def test_paged_kernel_detects_a_wrong_table():
    q, k_pool, v_pool, table, seqlens = paged_case(2, 4, 2, 64, 16, [40, 40], torch.float32)
    ref = kernel(q, k_pool, v_pool, table, seqlens)
    assert (kernel(q, k_pool, v_pool, table.flip(1), seqlens) - ref).abs().max() > 1e-2


def test_default_backend_is_the_kernel_where_it_loads(monkeypatch):
    assert select_attention(None, "cpu", torch.float32).name == "paged_cpu"
    assert select_attention(None, "cpu", torch.float16).name == "sdpa"
    monkeypatch.setattr(paged_cpu, "_available", False)  # no C++ compiler
    assert select_attention(None, "cpu", torch.float32).name == "sdpa"
    with pytest.raises(ValueError, match="'paged_cpu' attention backend needs our C\\+\\+ kernel"):
        select_attention("paged_cpu", "cpu", torch.float32)
    with pytest.raises(ValueError, match="unknown attention backend 'paged'"):
        select_attention("paged", "cpu", torch.float32)


def packed_case(heads, kv_heads, head_dim, page, lengths, q_lens, dtype):
    """A packed step: sequence b feeds its last q_lens[b] of lengths[b] keys as queries."""
    _, k_pool, v_pool, table, seqlens = paged_case(len(lengths), heads, kv_heads, head_dim, page, lengths, dtype)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    return q, k_pool, v_pool, table, seqlens, starts


def packed_reference(q, k_pool, v_pool, table, seqlens, starts, window=0, scale=None, softcap=0.0):
    """Each sequence alone: its queries as one row, causal and bottom-right aligned, over its keys
    (with a sliding window, each query over its last `window` keys only: a plain loop, not the mask rule)."""
    out = []
    for b in range(len(seqlens)):
        k, v = gather_pages(k_pool, table[b:b + 1]).float(), gather_pages(v_pool, table[b:b + 1]).float()
        n = int(starts[b + 1] - starts[b])
        for j in range(n):
            end = int(seqlens[b]) - n + j + 1
            begin = max(0, end - window) if window else 0
            row = q[starts[b] + j].float().view(1, -1, 1, q.shape[-1])
            out.append(standard_attention(row, k[:, :, begin:end], v[:, :, begin:end], causal=False, softmax_scale=scale,
                                          softcap=softcap)[0, :, 0])
    return torch.stack(out)


MIXED = ([1, 40, 100, 7, 300, 17, 150], [1, 40, 9, 1, 57, 16, 1])  # decode rows (the last one's keys in spans),
#                                                                  whole prompts, chunks after a prefix


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 64), (8, 1, 128), (6, 2, 80), (10, 2, 32),
                                                     (14, 2, 64), (12, 2, 128),  # Qwen2.5 0.5B, 1.5B
                                                     (4, 4, 96), (4, 1, 256)])  # Phi-3, Gemma 3
@pytest.mark.parametrize("page", [16, 7])
def test_packed_step_equals_each_sequence_alone_fp32(heads, kv_heads, head_dim, page):
    case = packed_case(heads, kv_heads, head_dim, page, *MIXED, torch.float32)
    ref = packed_reference(*case)
    q, k_pool, v_pool, table, seqlens, starts = case
    out = kernel(q, k_pool, v_pool, table, seqlens, starts)
    assert out.shape == q.shape
    assert (out - ref).abs().max() <= 1e-5


def test_packed_step_bf16():
    q, k_pool, v_pool, table, seqlens, starts = case = packed_case(9, 3, 64, 16, *MIXED, torch.bfloat16)
    out = kernel(q, k_pool, v_pool, table, seqlens, starts)
    assert out.dtype == torch.bfloat16
    assert (out.float() - packed_reference(*case)).abs().max() <= 2e-2


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (6, 2, 80), (14, 2, 64), (4, 1, 256)])
def test_float16_pools_under_float32_queries(heads, kv_heads, head_dim):
    """The engine's 16-bit KV cache: float16 pools, float32 queries and output, the same as float32 attention on
    the pools' own values (decode rows, one of them in spans, and prompt chunks)."""
    q, k_pool, v_pool, table, seqlens, starts = packed_case(heads, kv_heads, head_dim, 16, *MIXED, torch.float32)
    k16, v16 = k_pool.half(), v_pool.half()
    out = kernel(q, k16, v16, table, seqlens, starts)
    assert out.dtype == torch.float32
    assert (out - packed_reference(q, k16.float(), v16.float(), table, seqlens, starts)).abs().max() <= 1e-5
    with pytest.raises(RuntimeError, match="dtypes differ"):
        kernel(q.bfloat16(), k16, v16, table, seqlens, starts)


@pytest.mark.parametrize("backend", ["sdpa", "flash", "standard"])
@pytest.mark.parametrize("page", [16, 7])
def test_packed_step_on_the_reference_backends_goes_through_rows(backend, page):
    q, k_pool, v_pool, table, seqlens, starts = case = packed_case(6, 2, 64, page, *MIXED, torch.float32)
    step = packed_step(backend, table, seqlens, starts, page)
    out = step.attention.attend(q, k_pool, v_pool, step)
    assert out.shape == q.shape
    assert (out - packed_reference(*case)).abs().max() <= 1e-5


@pytest.mark.parametrize("window", [1, 5, 16, 40, 140])
@pytest.mark.parametrize("backend", ["paged_cpu", "flash", "sdpa", "standard"])
def test_sliding_window_on_every_backend(backend, window):
    """Mistral's window: a query sees its last `window` keys; pages of 7, windows shorter and longer
    than a page and than the chunks, decode rows and prompt chunks in one step."""
    q, k_pool, v_pool, table, seqlens, starts = case = packed_case(6, 2, 64, 7, *MIXED, torch.float32)
    step = packed_step(backend, table, seqlens, starts, 7)
    out = step.attention.attend(q, k_pool, v_pool, step, LayerAttention(window=window))
    assert (out - packed_reference(*case, window=window)).abs().max() <= 1e-5
    assert (out - packed_reference(*case)).abs().max() > 1e-3  # the window changes the result


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 1, 256), (8, 8, 64)])
def test_a_query_computes_the_same_bits_in_any_chunk(heads, kv_heads, head_dim):
    """Queries past 128 keys take key spans, in a decode row as in a prompt chunk: the last token of a 300-key
    sequence gives the same bits alone, as the end of a 5-token chunk and of a 40-token one (the kernel scores
    8 / heads-per-KV-head keys at a time, and the last keys of a span one by one)."""
    q, k_pool, v_pool, table, seqlens, _ = packed_case(heads, kv_heads, head_dim, 16, [300], [40], torch.float32)
    outputs = [kernel(q[-n:], k_pool, v_pool, table, seqlens, torch.tensor([0, n]))[-1] for n in (1, 5, 40)]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize("window", [24, 0])
@pytest.mark.parametrize("backend", ["paged_cpu", "flash", "sdpa", "standard"])
def test_softcap_and_scale_on_every_backend(backend, window):
    """Gemma 2: its own softmax scale and scores soft-capped (cap * tanh(score / cap)) before the softmax."""
    q, k_pool, v_pool, table, seqlens, starts = case = packed_case(8, 2, 64, 16, *MIXED, torch.float32)
    q = q * 4  # scores large enough for the cap to bite
    case = (q, *case[1:])
    step = packed_step(backend, table, seqlens, starts, 16)
    layer = LayerAttention(window=window, scale=0.2, softcap=1.5)  # (no window: the 150-key decode row in spans)
    out = step.attention.attend(q, k_pool, v_pool, step, layer)
    expected = packed_reference(*case, window=window, scale=0.2, softcap=1.5)
    assert (out - expected).abs().max() <= 1e-5
    assert (out - packed_reference(*case, window=window, scale=0.2)).abs().max() > 1e-3


def test_kernel_rejects_bad_inputs():
    q, k_pool, v_pool, table, seqlens, starts = packed_case(4, 2, 64, 16, [10, 20], [1, 5], torch.float32)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        paged_cpu.paged_attention(q.bfloat16(), k_pool, v_pool, table, seqlens, starts, 0.125)
    with pytest.raises(RuntimeError, match="query_start does not end"):
        paged_cpu.paged_attention(q, k_pool, v_pool, table, seqlens, starts - 1, 0.125)
    with pytest.raises(RuntimeError, match="outside the pool"):
        paged_cpu.paged_attention(q, k_pool, v_pool, table + 1000, seqlens, starts, 0.125)
