import mmap

import pytest
import torch

from minillm import CacheOverflowError, Configs, KVCache
from minillm.cache.paged_cache import PagedKVCache, bytes_per_block


def test_shapes_and_nbytes():
    cfg = Configs.tiny()
    cache = KVCache(cfg, batch_size=3, max_seq_len=40)
    assert cache.k[0].shape == (3, cfg.num_kv_heads, 40, cfg.head_dim)
    assert cache.nbytes == 2 * cfg.num_layers * 3 * cfg.num_kv_heads * 40 * cfg.head_dim * 4
    assert KVCache(cfg, 3, max_seq_len=40, dtype="bfloat16").nbytes == cache.nbytes // 2
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache(cfg, 1, max_seq_len=cfg.max_seq_len + 1)


@pytest.mark.parametrize("dtype,element", [("float32", 4), ("float16", 2), ("bfloat16", 2)])
def test_paged_block_bytes_are_what_the_pools_take(dtype, element):
    """The engine divides kv_cache_memory by bytes_per_block: it must be what a block of the real pools
    holds (tiny: K and V x 2 layers x 16 tokens x 2 KV heads (of 4 query heads) x 16 dims)."""
    cfg = Configs.tiny()
    assert bytes_per_block(cfg, 16, dtype) == 2 * 2 * 16 * 2 * 16 * element
    cache = PagedKVCache(cfg, num_blocks=5, block_size=16, dtype=dtype)
    assert cache.k[0].dtype == cache.v[-1].dtype == getattr(torch, dtype)
    assert len(cache.k) == len(cache.v) == cfg.num_layers
    assert sum(t.numel() * t.element_size() for t in (*cache.k, *cache.v)) == 5 * bytes_per_block(cfg, 16, dtype)
    assert cache.nbytes == 5 * bytes_per_block(cfg, 16, dtype)


def _page_advice(address: int) -> set[str]:
    """The huge-page advice flags ('hg', 'nh') of the mapping that holds `address` in this process."""
    mapping = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                mapping = low <= address < high
            elif mapping and head == "VmFlags:":
                return set(line.split()[1:]) & {"hg", "nh"}
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not hasattr(mmap, "MADV_NOHUGEPAGE"), reason="no transparent huge page advice here")
def test_cpu_pools_start_on_small_pages_and_go_on_on_huge_ones():
    """A short context touches each pool's first blocks: on 2 MB pages that is 2 MB per pool (K and V of every
    layer) for one token, so each pool's first 2 MB are on 4 KB pages, and what follows on huge pages."""
    cfg = Configs.tiny()
    cache = PagedKVCache(cfg, num_blocks=2048, block_size=16, dtype="float32")  # 4 MB pools
    if "hg" not in _page_advice(cache.k[0].data_ptr() + (3 << 20)):
        pytest.skip("this kernel takes no huge page advice")
    for pool in (*cache.k, *cache.v):
        start = pool.data_ptr()
        assert _page_advice(start) == _page_advice(start + (2 << 20) - 4096) == {"nh"}
        assert _page_advice(start + (3 << 20)) == {"hg"}


def test_reset_one_row_leaves_the_other_intact(tiny_model):
    cfg = tiny_model.config
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    cache = KVCache(cfg, 2, max_seq_len=64)
    with torch.no_grad():
        tiny_model(ids, kv_cache=cache)
    row1_k = [k[1, :, :12].clone() for k in cache.k]
    cache.reset(batch_indices=[0])
    assert cache.get_seq_len(0) == 0 and cache.get_seq_len(1) == 12
    assert all(torch.equal(k[1, :, :12], saved) for k, saved in zip(cache.k, row1_k))
    # Row 0 takes a new 5-token prompt while row 1 sits idle (0 new tokens); row 1 is unchanged.
    new = torch.randint(0, cfg.vocab_size, (2, 5))
    with torch.no_grad():
        logits = tiny_model(new, kv_cache=cache, input_lengths=[5, 0])
        alone = tiny_model(new[:1])
    assert cache.seq_lens == [5, 12]
    assert torch.allclose(logits[0], alone[0], atol=1e-4)
    assert all(torch.equal(k[1, :, :12], saved) for k, saved in zip(cache.k, row1_k))
    cache.reset()
    assert cache.seq_lens == [0, 0]


def test_overflow_names_row_length_and_capacity(tiny_model):
    cfg = tiny_model.config
    cache = KVCache(cfg, 2, max_seq_len=10)
    with torch.no_grad():
        tiny_model(torch.zeros(2, 8, dtype=torch.long), kv_cache=cache, input_lengths=[8, 3])
        with pytest.raises(CacheOverflowError, match=r"row 0 holds 8 tokens and cannot take 3 more \(capacity 10\)"):
            tiny_model(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)
    assert cache.seq_lens == [8, 3]  # nothing was written or counted
    with pytest.raises(IndexError):
        cache.get_seq_len(2)


@pytest.mark.parametrize("backend", ["flash", "standard", "sdpa"])
def test_incremental_decoding_equals_full_forward(tiny_model, backend):
    cfg = tiny_model.config
    torch.manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        full = tiny_model(ids, attention_backend=backend)
        cache = KVCache(cfg, 2)
        chunks = [tiny_model(ids[:, :17], kv_cache=cache, attention_backend=backend, flash_block_size=8)]
        chunks.append(tiny_model(ids[:, 17:30], kv_cache=cache, attention_backend=backend, flash_block_size=8))
        for t in range(30, 40):
            chunks.append(tiny_model(ids[:, t:t + 1], kv_cache=cache, attention_backend=backend, flash_block_size=8))
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() <= 1e-4
    assert cache.seq_lens == [40, 40]


def test_rows_of_different_lengths_get_their_own_positions(tiny_model):
    """Left-padded rows in one cache match each row run alone."""
    cfg = tiny_model.config
    torch.manual_seed(3)
    a, b = torch.randint(0, cfg.vocab_size, (1, 9)), torch.randint(0, cfg.vocab_size, (1, 4))
    padded = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], dim=1)])
    cache = KVCache(cfg, 2)
    with torch.no_grad():
        batched = tiny_model(padded, kv_cache=cache, input_lengths=[9, 4])
        step = tiny_model(torch.tensor([[7], [11]]), kv_cache=cache)
        alone_a = tiny_model(torch.cat([a, torch.tensor([[7]])], dim=1))
        alone_b = tiny_model(torch.cat([b, torch.tensor([[11]])], dim=1))
    assert cache.seq_lens == [10, 5]
    assert (batched[0] - alone_a[0, :9]).abs().max() <= 1e-4
    assert (batched[1, 5:] - alone_b[0, :4]).abs().max() <= 1e-4
    assert (step[0, 0] - alone_a[0, -1]).abs().max() <= 1e-4
    assert (step[1, 0] - alone_b[0, -1]).abs().max() <= 1e-4
    assert not batched.isnan().any()
