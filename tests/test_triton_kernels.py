"""Our Triton paged-attention kernels (attention/triton_paged.py) under TRITON_INTERPRET=1 on CPU, against
standard attention over each sequence's keys: packed variable-length prefill chunks after cached
prefixes, empty chunks, lengths not a multiple of the page or tile, GQA, split-K decode with one and
many splits. float32 only: the interpreter's bf16 `tl.dot` is unreliable. Skipped without triton
(an optional dependency: `pip install -e ".[gpu]"`)."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels' @triton.jit run
pytest.importorskip("triton", reason="triton is not installed (the optional [gpu] extra)")

from minillm.attention import standard_attention  # noqa: E402
from minillm.attention.common import gather_pages  # noqa: E402
from minillm.attention.triton_paged import paged_decode, paged_prefill  # noqa: E402

pytestmark = pytest.mark.slow  # the Triton interpreter, in Python


def pools(lengths, page, kv_heads, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    pages = [max(1, -(-n // page)) for n in lengths]
    num_blocks = sum(pages) + 2
    k_pool, v_pool = (torch.randn(num_blocks, page, kv_heads, dim, generator=g) for _ in range(2))
    order = torch.randperm(num_blocks, generator=g).tolist()  # pages scattered over the pool
    tables, at = [], 0
    for n in pages:
        tables.append(order[at:at + n] + [0] * (max(pages) - n))
        at += n
    return k_pool, v_pool, torch.tensor(tables)


def reference(q_rows, k_pool, v_pool, table, lengths, q_lens):
    """Each sequence alone: its chunk's queries over its first `length` keys, causal, bottom-right."""
    out, at = [], 0
    for b, (n, m) in enumerate(zip(lengths, q_lens)):
        k, v = gather_pages(k_pool, table[b:b + 1])[:, :, :n], gather_pages(v_pool, table[b:b + 1])[:, :, :n]
        rows = q_rows[at:at + m].transpose(0, 1).unsqueeze(0)
        out.append(standard_attention(rows, k, v, [n])[0].transpose(0, 1))
        at += m
    return torch.cat(out)


@pytest.mark.parametrize("heads,kv_heads,dim,page", [(4, 2, 32, 16), (2, 2, 16, 7), (6, 1, 64, 16)])
def test_prefill_over_cached_prefixes(heads, kv_heads, dim, page):
    lengths, q_lens = [40, 19, 7, 33], [40, 5, 0, 17]  # a whole prompt, a chunk after a prefix, nothing, a chunk
    k_pool, v_pool, table = pools(lengths, page, kv_heads, dim)
    q = torch.randn(sum(q_lens), heads, dim, generator=torch.Generator().manual_seed(1))
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    out, lse = paged_prefill(q, k_pool, v_pool, table, torch.tensor(lengths), starts, max(q_lens))
    assert (out - reference(q, k_pool, v_pool, table, lengths, q_lens)).abs().max() <= 1e-5
    first = q[0:1].transpose(0, 1).unsqueeze(0)  # query 0 of sequence 0 sees key 0 only: its LSE is one score
    k0 = gather_pages(k_pool, table[:1])[:, :, :1]
    expected_lse = (first @ k0.repeat_interleave(heads // kv_heads, 1).transpose(-1, -2))[0, :, 0, 0] * dim ** -0.5
    assert (lse[0] - expected_lse).abs().max() <= 1e-5


@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("heads,kv_heads,dim,page", [(4, 2, 32, 16), (3, 3, 16, 5)])
def test_split_k_decode(heads, kv_heads, dim, page, splits):
    lengths = [1, 37, 100, 64]
    k_pool, v_pool, table = pools(lengths, page, kv_heads, dim)
    q = torch.randn(len(lengths), heads, dim, generator=torch.Generator().manual_seed(2))
    out = paged_decode(q, k_pool, v_pool, table, torch.tensor(lengths), max(lengths), num_splits=splits,
                       min_keys_per_split=8)
    assert (out - reference(q, k_pool, v_pool, table, lengths, [1] * len(lengths))).abs().max() <= 1e-5


def test_unsupported_shapes_are_refused_by_name():
    k_pool, v_pool, table = pools([8], 4, 1, 24)
    q = torch.randn(1, 2, 24)
    with pytest.raises(ValueError, match="head dim 24 is not supported"):
        paged_decode(q, k_pool, v_pool, table, torch.tensor([8]), 8)
    k_pool, v_pool, table = pools([8], 4, 1, 32)
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported by the Triton kernels"):
        paged_decode(torch.randn(1, 2, 32, dtype=torch.float64), k_pool, v_pool, table, torch.tensor([8]), 8)


def test_the_triton_backend_runs_the_model(tiny_model):
    """The engine's packed steps through the kernels (prefill chunks, then split-K decode steps): the
    same logits as standard attention, and the same greedy tokens batched and alone."""
    from minillm import TextGenerator

    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tiny_model(ids, attention_backend="standard")
        assert (tiny_model(ids, attention_backend="triton") - ref).abs().max() <= 1e-4
    prompts = [ids[0, :20].tolist(), ids[1, :5].tolist()]
    standard = TextGenerator(tiny_model, attention_backend="standard").generate(prompts, max_new_tokens=8, temperature=0)
    triton_out = TextGenerator(tiny_model, attention_backend="triton").generate(prompts, max_new_tokens=8, temperature=0)
    assert [g.token_ids for g in triton_out] == [g.token_ids for g in standard]


def test_static_decode_inputs_give_the_planned_steps_logits(tiny_model):
    """What a CUDA graph replays (engine/cuda_graphs.py): a decode step loaded into fixed buffers, padded
    to a larger batch, gives the logits of the same step planned as usual; padding rows write only to
    the scratch block."""
    from minillm.attention import select_attention
    from minillm.cache.paged_cache import PagedKVCache
    from minillm.engine.cuda_graphs import StaticDecodeInputs

    attention = select_attention("triton", "cpu", torch.float32)
    cache = PagedKVCache(tiny_model.config, 9, 4, device="cpu")  # 8 blocks for sequences, block 8: scratch
    tables, lengths = [[3, 0, 5], [7, 1]], [10, 6]
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for table, n in zip(tables, lengths):  # prefill each prompt
            tiny_model(torch.randint(0, 512, (n,), generator=g), cache.plan([table], [0], [n], attention))
        before = [pool.clone() for pool in cache.k]
        ids = [11, 12]
        expected = tiny_model(torch.tensor(ids), cache.plan(tables, lengths, [1, 1], attention), last_token_only=True)
        for pool, old in zip(cache.k, before):
            pool.copy_(old)
        inputs = StaticDecodeInputs(cache, max_batch=8, max_seq_len=64, scratch_block=8)
        inputs.load(ids, lengths, tables, batch=4)
        static_ids, step = inputs.step(4, attention)
        logits = tiny_model(static_ids, step, last_token_only=True)
    assert (logits[:2] - expected).abs().max() <= 1e-5
    written = [(pool != old).any(dim=(1, 2, 3)).nonzero().flatten().tolist() for pool, old in zip(cache.k, before)]
    assert written == [[1, 5, 8]] * len(cache.k)  # the two sequences' current blocks, and the scratch block


@pytest.mark.parametrize("norms", [False, True])
def test_rope_cache_write_matches_the_pytorch_path(norms):
    """The fused Triton RoPE + cache write (triton_rope.py) against model/rope.py's rotation, RMSNorm
    (Qwen3's q/k norms) and the paged write, GQA heads, tokens scattered over the pool."""
    from minillm.attention.triton_rope import rope_cache_write
    from minillm.model.norm import RMSNorm
    from minillm.model.rope import RotaryEmbedding, apply_rotary

    g = torch.Generator().manual_seed(5)
    n, hq, hkv, dim = 5, 4, 2, 32
    qkv = torch.randn(n, (hq + 2 * hkv) * dim, generator=g)
    cos, sin = RotaryEmbedding(dim, 64, 10000.0).tables(torch.tensor([0, 3, 9, 1, 40]))
    slots = torch.tensor([7, 0, 12, 3, 30])
    pools = [torch.zeros(8, 4, hkv, dim) for _ in range(4)]
    q_norm, k_norm = RMSNorm(dim, 1e-6), RMSNorm(dim, 1e-6)
    with torch.no_grad():
        q_norm.weight.normal_(1.0, 0.3, generator=g), k_norm.weight.normal_(1.0, 0.3, generator=g)
    weights = (q_norm.weight.detach(), k_norm.weight.detach(), 1e-6) if norms else ()
    q = rope_cache_write(qkv, cos, sin, pools[0], pools[1], slots, hq, hkv, *weights)
    ref_q, ref_k, v = qkv.split([hq * dim, hkv * dim, hkv * dim], dim=-1)
    ref_q, ref_k = ref_q.reshape(n, hq, dim), ref_k.reshape(n, hkv, dim)
    with torch.no_grad():
        if norms:
            ref_q, ref_k = q_norm(ref_q), k_norm(ref_k)
    ref_q, ref_k = apply_rotary(ref_q, cos, sin), apply_rotary(ref_k, cos, sin)
    pools[2].view(-1, hkv, dim)[slots] = ref_k
    pools[3].view(-1, hkv, dim)[slots] = v.reshape(n, hkv, dim)
    assert (q - ref_q).abs().max() <= 1e-5
    assert (pools[0] - pools[2]).abs().max() <= 1e-5 and torch.equal(pools[1], pools[3])
