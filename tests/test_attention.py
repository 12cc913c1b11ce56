"""Our FlashAttention-2 against standard attention and PyTorch SDPA."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minillm.attention import flash_attention_with_kv_cache, sdpa_attention, standard_attention

FP32_TOL = 1e-5
BF16_TOL = 2e-2


def qkv(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=g).to(dtype)
    return q, k, v


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("seq_len", [1, 7, 127, 129, 1000])
@pytest.mark.parametrize("tile_size", [16, 64, 256])
def test_prefill_matches_references(seq_len, tile_size):
    if seq_len == 1000 and tile_size == 16:
        tile_size = 32  # same coverage, a quarter of the Python tile loop
    q, k, v = qkv(1, 4, 4, seq_len, seq_len, 64)
    ref = standard_attention(q, k, v)
    out = flash_attention_with_kv_cache(q, k, v, tile_size=tile_size)
    assert max_err(out, ref) <= FP32_TOL
    assert max_err(sdpa_attention(q, k, v), ref) <= FP32_TOL


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gqa_and_head_dims(heads, kv_heads, head_dim):
    q, k, v = qkv(2, heads, kv_heads, 70, 70, head_dim)
    ref = standard_attention(q, k, v)
    assert max_err(flash_attention_with_kv_cache(q, k, v, tile_size=32), ref) <= FP32_TOL
    assert max_err(sdpa_attention(q, k, v), ref) <= FP32_TOL


@pytest.mark.parametrize("q_len,kv_len", [(1, 300), (5, 300), (64, 129), (129, 1000)])
def test_queries_shorter_than_keys(q_len, kv_len):
    """Decode and chunked prefill: bottom-right aligned causal mask."""
    q, k, v = qkv(2, 6, 2, q_len, kv_len, 64)
    ref = standard_attention(q, k, v)
    for tile_size in (16, 128):
        assert max_err(flash_attention_with_kv_cache(q, k, v, tile_size=tile_size), ref) <= FP32_TOL
    assert max_err(sdpa_attention(q, k, v), ref) <= FP32_TOL


def test_bottom_right_alignment_by_hand():
    """The reference itself: the single decode query must see every key (not just key 0)."""
    q, k, v = qkv(1, 1, 1, 1, 5, 8)
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    expected = torch.softmax(scores, dim=-1) @ v
    assert max_err(standard_attention(q, k, v), expected) <= 1e-6
    assert max_err(flash_attention_with_kv_cache(q, k, v, tile_size=2), expected) <= 1e-6


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_per_row_key_lengths(as_tensor, causal):
    lengths = [300, 17, 129, 4]
    q, k, v = qkv(4, 6, 3, 4, 300, 64)
    seqlens = torch.tensor(lengths) if as_tensor else lengths
    ref = standard_attention(q, k, v, seqlens, causal=causal)
    for tile_size in (16, 64, 256):
        out = flash_attention_with_kv_cache(q, k, v, seqlens, causal=causal, tile_size=tile_size)
        assert max_err(out, ref) <= FP32_TOL
    assert max_err(sdpa_attention(q, k, v, seqlens, causal=causal), ref) <= FP32_TOL
    # each row alone, sliced to its own length, gives the same answer
    for row, n in enumerate(lengths):
        alone = standard_attention(q[row:row + 1], k[row:row + 1, :, :n], v[row:row + 1, :, :n], causal=causal)
        assert max_err(ref[row:row + 1], alone) <= FP32_TOL


def test_slots_past_every_row_length_are_never_read():
    """Keys beyond the longest row are skipped, not masked: NaN there cannot reach the output."""
    q, k, v = qkv(2, 4, 2, 3, 256, 64)
    k[:, :, 100:] = float("nan")
    v[:, :, 100:] = float("nan")
    out = flash_attention_with_kv_cache(q, k, v, [100, 60], tile_size=32)
    ref = standard_attention(q[:, :, :, :], k[:, :, :100], v[:, :, :100], [100, 60])
    assert not out.isnan().any()
    assert max_err(out, ref) <= FP32_TOL


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.mm, torch.ops.aten.matmul):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tiles", [1, 3, 4])
def test_causal_tiles_above_diagonal_are_skipped(tiles):
    """n query tiles x n key tiles: only the n(n+1)/2 on or below the diagonal are computed (2 matmuls each)."""
    q, k, v = qkv(1, 2, 2, 16 * tiles, 16 * tiles, 16)
    with CountMatmuls() as counter:
        flash_attention_with_kv_cache(q, k, v, tile_size=16)
    assert counter.count == 2 * tiles * (tiles + 1) // 2
    with CountMatmuls() as counter:
        flash_attention_with_kv_cache(q, k, v, tile_size=16, causal=False)
    assert counter.count == 2 * tiles * tiles


def test_rows_without_visible_keys_are_zero_not_nan():
    # More queries than keys: the first 40 queries of each row see nothing (as a padded row would),
    # and their first key tiles are fully masked.
    q, k, v = qkv(2, 4, 2, 60, 20, 64)
    out, lse = flash_attention_with_kv_cache(q, k, v, tile_size=16, return_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()
    assert out[:, :, :40].abs().max() == 0
    assert torch.isinf(lse[:, :, :40]).all()
    ref = standard_attention(q, k, v)
    assert max_err(out, ref) <= FP32_TOL
    assert max_err(sdpa_attention(q, k, v), ref) <= FP32_TOL
    # A row of length 0 (empty padding) in a batch
    q, k, v = qkv(2, 2, 2, 1, 32, 64)
    out = flash_attention_with_kv_cache(q, k, v, [0, 32], tile_size=16)
    assert not out.isnan().any() and out[0].abs().max() == 0
    assert max_err(out[1], standard_attention(q[1:], k[1:], v[1:])[0]) <= FP32_TOL


def test_rows_next_to_fully_masked_ones():
    """In one tile, rows that see nothing sit beside rows that see a single key."""
    q, k, v = qkv(1, 2, 2, 40, 32, 64)  # queries 0..7 see nothing; query 8 sees only key 0
    out = flash_attention_with_kv_cache(q, k, v, tile_size=4)
    assert not out.isnan().any()
    assert max_err(out, standard_attention(q, k, v)) <= FP32_TOL


def test_log_sum_exp():
    q, k, v = qkv(2, 4, 2, 33, 50, 64)
    _, lse = flash_attention_with_kv_cache(q, k, v, tile_size=16, return_lse=True)
    kk = k.repeat_interleave(2, dim=1)
    scores = (q @ kk.transpose(-1, -2)) / 8.0
    q_pos = torch.arange(33).view(-1, 1) + 50 - 33
    scores = scores.masked_fill(torch.arange(50).view(1, -1) > q_pos, float("-inf"))
    assert max_err(lse, torch.logsumexp(scores, dim=-1)) <= 1e-5


@pytest.mark.parametrize("seq_len,kv_heads", [(129, 2), (1, 1)])
def test_bf16(seq_len, kv_heads):
    q, k, v = qkv(2, 8, kv_heads, seq_len, 300 if seq_len == 1 else seq_len, 64, dtype=torch.bfloat16)
    ref = standard_attention(q.float(), k.float(), v.float())
    out = flash_attention_with_kv_cache(q, k, v, tile_size=64)
    assert out.dtype == torch.bfloat16
    assert max_err(out, ref) <= BF16_TOL
    assert max_err(sdpa_attention(q, k, v), ref) <= BF16_TOL


def test_flash_detects_a_wrong_answer():
    """Guard against a test that cannot fail: a perturbed value changes the output beyond tolerance."""
    q, k, v = qkv(1, 2, 2, 64, 64, 64)
    ref = standard_attention(q, k, v)
    v2 = v.clone()
    v2[:, :, 10] += 1e-3
    assert max_err(flash_attention_with_kv_cache(q, k, v2, tile_size=16), ref) > FP32_TOL


def test_invalid_arguments():
    q, k, v = qkv(1, 3, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        flash_attention_with_kv_cache(q, k, v)
    q, k, v = qkv(1, 4, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="tile_size"):
        flash_attention_with_kv_cache(q, k, v, tile_size=0)
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attention_with_kv_cache(q, k, v, [5])
    with pytest.raises(ValueError, match="4-D"):
        flash_attention_with_kv_cache(q[0], k, v)


def test_bf16_decode_with_row_lengths():
    """One query per row in bf16 (a CPU fast path in the SDPA backend), rows of 300, 17 and 0 keys."""
    q, k, v = qkv(3, 9, 3, 1, 300, 64, dtype=torch.bfloat16)
    lengths = [300, 17, 0]
    ref = standard_attention(q.float(), k.float(), v.float(), lengths)
    for out in (sdpa_attention(q, k, v, lengths), flash_attention_with_kv_cache(q, k, v, lengths, tile_size=64)):
        assert out.dtype == torch.bfloat16 and not out.isnan().any()
        assert max_err(out, ref) <= BF16_TOL
        assert out[2].abs().max() == 0


@pytest.mark.parametrize("tile_size", [4, 16, 64])
@pytest.mark.parametrize("window", [1, 7, 33])
def test_flash_sliding_window_skips_and_masks_tiles_exactly(tile_size, window):
    """Prefill and chunked rows of different lengths: tiles before every row's window are skipped,
    tiles inside it used unmasked, the rest masked: the same as the dense rule."""
    q, k, v = qkv(3, 4, 2, 40, 100, 32)
    lengths = [100, 57, 40]
    ref = standard_attention(q, k, v, lengths, window=window)
    assert max_err(flash_attention_with_kv_cache(q, k, v, lengths, tile_size=tile_size, window=window), ref) <= FP32_TOL
    assert max_err(sdpa_attention(q, k, v, lengths, window=window), ref) <= FP32_TOL
    assert max_err(standard_attention(q, k, v, lengths), ref) > 1e-3
