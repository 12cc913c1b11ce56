"""Our GGUF quantized matmul kernels against dequantize-then-matmul references in float64.

Random blocks of every type with a kernel; the weights are decoded by the `gguf` package (the
reference) and by our kernels' decoder; every vector path this CPU can run is forced in turn.
"""

import gguf
import numpy as np
import pytest
import torch

from minillm import kernels
from minillm.kernels import ggml

pytestmark = pytest.mark.skipif(not kernels.ops_available(), reason="the C++ kernels could not be built here")

ISAS = [isa for isa in ("portable", "avx2", "avx512_vnni")
        if kernels.ops_available() and ("portable", "avx2", "avx512_vnni").index(isa)
        <= ("portable", "avx2", "avx512_vnni").index(kernels.best_isa())]
T = ggml.KERNEL_TYPES
# fp16 fields of each block layout (byte offsets), filled with finite scales
SCALE_FIELDS = {T["Q4_0"]: [0], T["Q4_1"]: [0, 2], T["Q8_0"]: [0], T["Q5_0"]: [0], T["Q5_1"]: [0, 2],
                T["Q4_K"]: [0, 2], T["Q5_K"]: [0, 2], T["Q6_K"]: [208], T["IQ4_NL"]: [0], T["IQ4_XS"]: [0],
                T["Q2_K"]: [80, 82], T["Q3_K"]: [108]}


@pytest.fixture(autouse=True)
def restore_isa():
    yield
    kernels.set_isa(kernels.best_isa())


def random_blocks(kind: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    per, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    rng = np.random.default_rng(seed)
    if kind in (T["F16"], T["BF16"]):  # values, as a file's bytes (BF16: float32's top halves)
        values = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        halves = values.astype(np.float16) if kind == T["F16"] else (values.view(np.uint32) >> 16).astype(np.uint16)
        return halves.view(np.uint8)
    raw = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    for offset in SCALE_FIELDS[kind]:
        scales = (rng.standard_normal((rows, cols // per, 1)) * 0.02).astype(np.float16)
        raw[..., offset:offset + 2] = scales.view(np.uint8)
    return raw.reshape(rows, -1)


def linear(parts: list[tuple[np.ndarray, int]], cols: int, **kwargs) -> ggml.GGMLLinear:
    """A layer on the given tensors' blocks (stacked by rows), repacked as the loader does."""
    return ggml.GGMLLinear([(ggml.repack(torch.from_numpy(raw), kind), kind) for raw, kind in parts], cols, **kwargs)


def reference_weight(raw: np.ndarray, kind: int) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(kind)).reshape(raw.shape[0], -1).astype(np.float64)


def unit(*kinds: int) -> int:
    """The activations' quantization unit in front of these weight types: 256 if any has super-blocks."""
    return max(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)][0] for kind in kinds)


def quantize_activations(x: np.ndarray, size: int) -> np.ndarray:
    """The kernel's 8-bit units of `size` (scale max|x| / 127, round half to even), dequantized, float64; size 1:
    x itself (F16 / BF16 weights meet the float32 activations)."""
    if size == 1:
        return x.astype(np.float64)
    blocks = x.reshape(x.shape[0], -1, size).astype(np.float32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    codes = np.rint(blocks * inv)
    return (codes * (amax / np.float32(127))).reshape(x.shape).astype(np.float64)


@pytest.mark.parametrize("name", list(ggml.KERNEL_TYPES))
def test_repacked_weights_equal_gguf_dequantization(name):
    """Every weight decoded from the repacked blocks equals the gguf package's dequantization exactly (so a
    scale off by one code, a nibble or a high bit misplaced, fails), and the blocks keep the file's size."""
    kind = ggml.KERNEL_TYPES[name]
    raw = random_blocks(kind, 21, 512)  # a group of 16 and one of 5
    layer = linear([(raw, kind)], 512)
    assert layer.weights[0].shape == raw.shape
    np.testing.assert_array_equal(layer.dequantized_weight().double().numpy(), reference_weight(raw, kind))
    table = ggml.GGMLEmbedding(torch.from_numpy(raw), kind, 512, interleaved=False)  # the file's rows as stored
    np.testing.assert_array_equal(table(torch.tensor([20, 0, 7])).double().numpy(), reference_weight(raw, kind)[[20, 0, 7]])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(ggml.KERNEL_TYPES))
@pytest.mark.parametrize("batch", [1, 3, 9])  # one token, a ragged tile of rows, several tiles
def test_matmul_matches_float64_reference(name, isa, batch):
    kind = ggml.KERNEL_TYPES[name]
    cols = 512 if gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)][0] == 256 else 96  # odd block counts too
    out_rows = 37
    raw = random_blocks(kind, out_rows, cols, seed=batch)
    weight = reference_weight(raw, kind)
    x = np.random.default_rng(1).standard_normal((batch, cols)).astype(np.float32)
    bias = np.random.default_rng(2).standard_normal(out_rows).astype(np.float32)
    layer = linear([(raw, kind)], cols, bias=torch.from_numpy(bias))
    kernels.set_isa(isa)
    y = layer(torch.from_numpy(x)).double().numpy()
    # exact up to float32 summation: the reference quantizes x as the kernel does
    expected = quantize_activations(x, unit(kind)) @ weight.T + bias
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # and close to the unquantized product: 8-bit activations cost well under 2 % here
    exact = x.astype(np.float64) @ weight.T + bias
    assert np.abs(y - exact).max() < 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("isa", ISAS)
def test_swiglu_and_stacked_mixed_types(isa):
    """w13 = gate (Q4_K, 24 rows) stacked on up (Q6_K): each keeps its type, silu(gate) * up fused."""
    gate, up = random_blocks(T["Q4_K"], 24, 256, seed=3), random_blocks(T["Q6_K"], 24, 256, seed=4)
    layer = linear([(gate, T["Q4_K"]), (up, T["Q6_K"])], 256, swiglu=True)
    assert layer.formats == [T["Q4_K"], T["Q6_K"]]
    x = np.random.default_rng(5).standard_normal((4, 256)).astype(np.float32)
    kernels.set_isa(isa)
    y = layer(torch.from_numpy(x)).double().numpy()
    xq = quantize_activations(x, 256)
    g, u = xq @ reference_weight(gate, T["Q4_K"]).T, xq @ reference_weight(up, T["Q6_K"]).T
    expected = g / (1 + np.exp(-g)) * u
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_swiglu_epilogue_same_bits_on_every_path_and_close_to_float64():
    """Our silu (a polynomial exp) on the layer's own gate/up outputs: within float32 rounding of float64
    silu(gate) * up over gates from -300 to 300 (past the exp's clamps), NaN in, NaN out, and the same bits on
    every path (h = 40: two vectors of 16 and a tail)."""
    raw = random_blocks(T["Q8_0"], 80, 64, seed=8)
    plain = linear([(raw, T["Q8_0"])], 64)
    fused = ggml.GGMLLinear(plain.parts, 64, swiglu=True)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(9)) * torch.tensor([1, 30, 300, 3000, 1])[:, None]
    x[4, 3] = float("nan")
    outputs = {}
    for isa in ISAS:
        kernels.set_isa(isa)
        outputs[isa] = fused(x)
        y = plain(x).double()
        gate, up = y[:, :40], y[:, 40:]
        assert gate[:4].abs().max() > 200 and gate[:4].abs().min() < 1
        expected = gate / (1 + torch.exp(-gate)) * up
        # (below a gate of -88 the exp is clamped: ~1e-35 x up instead of ~0)
        torch.testing.assert_close(outputs[isa][:4].double(), expected[:4], rtol=1e-6, atol=1e-20)
        assert outputs[isa][4].isnan().all()
    for isa in ISAS[1:]:
        assert torch.equal(outputs[isa].view(torch.int32), outputs["portable"].view(torch.int32)), isa  # NaNs too


@pytest.mark.parametrize("isa", ISAS)
def test_residual_is_added_in_the_output_loop(isa):
    """ggml_linear(x, residual=r) is r + ggml_linear(x), bit for bit (the decoder layer's skip connections)."""
    layer = linear([(random_blocks(T["Q4_1"], 37, 96, seed=6), T["Q4_1"])], 96)
    weights, fmts, bias = layer.weights, layer.formats, torch.randn(37)
    x, r = torch.randn(6, 96), torch.randn(6, 37)
    kernels.set_isa(isa)
    op = torch.ops.minillm.ggml_linear
    assert torch.equal(op(x, weights, fmts, 96, bias, False, -1, r), r + op(x, weights, fmts, 96, bias, False, -1))
    with pytest.raises(RuntimeError, match="residual"):
        op(x, weights, fmts, 96, None, False, -1, r[:, :5])


def test_embedding_rows_dequantized():
    raw = random_blocks(T["Q8_0"], 50, 64)  # three groups of 16 rows and a last one of 2
    table = ggml.GGMLEmbedding(ggml.repack(torch.from_numpy(raw), T["Q8_0"]), T["Q8_0"], 64, interleaved=True)
    ids = torch.tensor([[3, 49, 0]])
    np.testing.assert_array_equal(table(ids)[0].double().numpy(), reference_weight(raw, T["Q8_0"])[[3, 49, 0]])
    with pytest.raises(RuntimeError, match="outside"):
        table(torch.tensor([50]))


def test_bad_shapes_and_paths_are_refused():
    raw = random_blocks(T["Q4_0"], 4, 64)
    with pytest.raises(RuntimeError, match="bytes"):
        linear([(raw, T["Q4_0"])], 96)(torch.zeros(1, 96))
    with pytest.raises(RuntimeError, match="multiple of 256"):
        linear([(random_blocks(T["Q4_K"], 4, 256), T["Q4_K"])], 128)(torch.zeros(1, 128))
    with pytest.raises(RuntimeError, match="no kernel for GGML type 16"):  # IQ2_XXS
        ggml.repack(torch.from_numpy(raw), 16)
    layer = linear([(raw, T["Q4_0"])], 64)
    with pytest.raises(RuntimeError, match="features"):
        layer(torch.zeros(1, 32))
    with pytest.raises(RuntimeError, match="unknown ISA"):
        kernels.set_isa("sse9")


def test_env_pins_a_lower_path(tmp_path):
    import subprocess
    import sys

    code = "from minillm import kernels; print(kernels.isa())"
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "MINILLM_ISA": "portable"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "portable"


def test_kernel_rms_norm_matches_pytorch():
    from minillm.model.norm import RMSNorm, use_kernel_norms

    model = torch.nn.Sequential(RMSNorm(96, eps=1e-5))
    model[0].weight.data = torch.randn(96)
    x = torch.randn(3, 5, 96) * 4
    reference = model(x)
    use_kernel_norms(model)
    assert type(model[0]).__name__ == "KernelRMSNorm" and model[0].eps == 1e-5
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(model(x), torch.ops.minillm.rms_norm(x, model[0].weight, 1e-5))  # the kernel's own bits


def test_fused_rope_and_cache_write_match_pytorch():
    """q rotated and returned token-major; k rotated and v copied into their pool slots; nothing else touched."""
    from minillm.model.rope import RotaryEmbedding, apply_rotary

    hq, hkv, d, n = 6, 2, 32, 5
    rope = RotaryEmbedding(d, 64, 10000.0)
    positions = torch.tensor([3, 4, 10, 0, 63])
    cos, sin = rope.tables(positions)
    qkv = torch.randn(n, (hq + 2 * hkv) * d)
    k_pool, v_pool = torch.zeros(4, 16, hkv, d), torch.zeros(4, 16, hkv, d)
    slots = torch.tensor([3, 4, 37, 16, 63])
    q = torch.ops.minillm.rope_cache_write(qkv, cos, sin, k_pool, v_pool, slots, hq, hkv)
    q_ref, k_ref, v_ref = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    torch.testing.assert_close(q, apply_rotary(q_ref.view(n, hq, d), cos, sin))
    expected_k, expected_v = torch.zeros(64, hkv, d), torch.zeros(64, hkv, d)
    expected_k[slots] = apply_rotary(k_ref.view(n, hkv, d), cos, sin)
    expected_v[slots] = v_ref.view(n, hkv, d)
    torch.testing.assert_close(k_pool.view(64, hkv, d), expected_k)
    torch.testing.assert_close(v_pool.view(64, hkv, d), expected_v)
    with pytest.raises(RuntimeError, match="outside the pool"):
        torch.ops.minillm.rope_cache_write(qkv, cos, sin, k_pool, v_pool, slots + 64, hq, hkv)


def test_rope_and_cache_write_into_float16_pools():
    """The 16-bit cache: the same rotation, k and v rounded to float16 in their slots, q still float32."""
    hq, hkv, d = 6, 2, 32
    qkv, cos, sin = torch.randn(3, (hq + 2 * hkv) * d), torch.randn(3, d // 2), torch.randn(3, d // 2)
    slots = torch.tensor([5, 0, 17])
    pools32 = torch.zeros(2, 16, hkv, d), torch.zeros(2, 16, hkv, d)
    pools16 = torch.zeros(2, 16, hkv, d, dtype=torch.float16), torch.zeros(2, 16, hkv, d, dtype=torch.float16)
    q32 = torch.ops.minillm.rope_cache_write(qkv, cos, sin, *pools32, slots, hq, hkv)
    q16 = torch.ops.minillm.rope_cache_write(qkv, cos, sin, *pools16, slots, hq, hkv)
    assert q16.dtype == torch.float32 and torch.equal(q16, q32)
    for p16, p32 in zip(pools16, pools32):
        assert torch.equal(p16, p32.half())
    with pytest.raises(RuntimeError, match="float16 pools"):
        torch.ops.minillm.rope_cache_write(qkv, cos, sin, pools32[0], pools16[1], slots, hq, hkv)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["Q4_1", "Q8_0", "Q4_K", "Q6_K", "F16", "BF16"])
def test_a_row_computes_the_same_bits_in_any_batch(name, isa):
    """Tokens are tiled 4 at a time; a token's output must not depend on its neighbours (batched == alone)."""
    kind = ggml.KERNEL_TYPES[name]
    layer = linear([(random_blocks(kind, 24, 768), kind)], 768)  # 3 super-blocks of 256 = 24 blocks of 32
    x = torch.randn(7, 768, generator=torch.Generator().manual_seed(0))
    kernels.set_isa(isa)
    full = layer(x)
    for start, end in [(0, 1), (3, 4), (2, 5), (1, 7)]:
        assert torch.equal(layer(x[start:end]), full[start:end])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", [name for name, kind in ggml.KERNEL_TYPES.items() if kind in SCALE_FIELDS])
def test_largest_codes_against_largest_activations(name, isa):
    """Every code bit set, against activations all at +-127: the kernels' int16 partial sums reach their
    bounds here (a sum over one vector too many overflows), at 1, 2 and 4 tokens (each tile width)."""
    kind = ggml.KERNEL_TYPES[name]
    per, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    cols = 512 if per == 256 else 96
    raw = np.full((21, cols // per, size), 255, np.uint8)
    for offset in SCALE_FIELDS[kind]:
        raw[..., offset:offset + 2] = np.full((1,), 0.01, np.float16).view(np.uint8)
    raw = raw.reshape(21, -1)
    layer = linear([(raw, kind)], cols)
    kernels.set_isa(isa)
    for batch in (1, 2, 4):
        x = np.ones((batch, cols), np.float32) * np.array([1, -1, 1, 1], np.float32)[:batch, None]
        expected = quantize_activations(x, unit(kind)) @ reference_weight(raw, kind).T
        y = layer(torch.from_numpy(x)).double().numpy()
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("isa", ISAS)
def test_tokens_beyond_one_block_of_activations(isa):
    """A long prefill meets the weights once per block of tokens (~128 KB of quantized activations: 32 tokens
    at 4,096 features): every row of every block, the last one partial, as computed 4 at a time."""
    kind = ggml.KERNEL_TYPES["Q4_K"]
    layer = linear([(random_blocks(kind, 20, 4096), kind)], 4096)
    x = torch.randn(70, 4096, generator=torch.Generator().manual_seed(5))
    kernels.set_isa(isa)
    assert torch.equal(layer(x), torch.cat([layer(x[i:i + 4]) for i in range(0, 70, 4)]))


@pytest.mark.skipif(len(ISAS) < 2, reason="this CPU runs only the portable path")
@pytest.mark.parametrize("name", list(ggml.KERNEL_TYPES))
def test_every_path_computes_the_same_bits(name):
    """Portable, AVX2 and AVX-512 VNNI do the same integer dots and the same float operations per row, in
    the same order, on activations quantized alike: their outputs are equal, bit for bit (37 rows: two groups
    of 16 and one of 5)."""
    kind = ggml.KERNEL_TYPES[name]
    cols = 512 if gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)][0] == 256 else 96
    layer = linear([(random_blocks(kind, 37, cols, seed=11), kind)], cols)
    x = torch.randn(6, cols, generator=torch.Generator().manual_seed(2))
    x[0, :32] = 0  # a block of zeros: scale 0
    x[1, :32] = torch.tensor([127.0] + [k + 0.5 for k in range(-16, 15)])  # codes exactly halfway: round to even
    x[2, 32:64] = 1e-39  # a subnormal maximum: 127 / max overflows, so codes 0
    if cols == 512:  # the same within units of 256, in front of super-block types
        x[3, 256:] = 0
        x[4, :256] = 1e-39
        x[5, 256:] = torch.tensor([127.0, -127.0] + [k + 0.5 for k in range(-127, 127)])
    outputs = {}
    for isa in ISAS:
        kernels.set_isa(isa)
        outputs[isa] = layer(x)
    for isa in ISAS[1:]:
        assert torch.equal(outputs[isa], outputs["portable"]), isa


@pytest.mark.parametrize("isa", ISAS)
def test_blocks_of_32_beside_super_blocks_share_their_activations(isa):
    """A layer mixing Q8_0 and Q4_K rows (as some files mix them in one projection) quantizes its input once,
    per 256: the Q8_0 rows then see the same codes as the Q4_K rows, and both match that reference."""
    legacy, kquant = random_blocks(T["Q8_0"], 20, 512, seed=6), random_blocks(T["Q4_K"], 20, 512, seed=7)
    layer = linear([(legacy, T["Q8_0"]), (kquant, T["Q4_K"])], 512)
    x = np.random.default_rng(8).standard_normal((3, 512)).astype(np.float32)
    x[:, :32] *= 50  # one loud block: per 256 it coarsens its neighbours' codes, per 32 it would not
    kernels.set_isa(isa)
    y = layer(torch.from_numpy(x)).double().numpy()
    weight = np.concatenate([reference_weight(legacy, T["Q8_0"]), reference_weight(kquant, T["Q4_K"])])
    expected = quantize_activations(x, 256) @ weight.T
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    per32 = quantize_activations(x, 32) @ weight.T
    assert np.abs(y - per32).max() > 1e-3 * np.abs(per32).max()


@pytest.mark.parametrize("isa", ISAS)
def test_f16_rows_beside_quantized_rows_take_the_activations_unquantized(isa):
    """A layer stacking F16 rows on Q4_K rows: the Q4_K rows see the activations quantized per 256, the F16 rows
    the float32 values themselves."""
    half, kquant = random_blocks(T["F16"], 20, 512, seed=6), random_blocks(T["Q4_K"], 20, 512, seed=7)
    layer = linear([(half, T["F16"]), (kquant, T["Q4_K"])], 512)
    x = np.random.default_rng(8).standard_normal((3, 512)).astype(np.float32)
    kernels.set_isa(isa)
    y = layer(torch.from_numpy(x)).double().numpy()
    expected = np.concatenate([x.astype(np.float64) @ reference_weight(half, T["F16"]).T,
                               quantize_activations(x, 256) @ reference_weight(kquant, T["Q4_K"]).T], axis=1)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q2_K"])
def test_non_finite_activations_in_a_super_block_give_nan_rows(name):
    kind = ggml.KERNEL_TYPES[name]
    layer = linear([(random_blocks(kind, 20, 512, seed=3), kind)], 512)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(4))
    x[1, 300] = float("inf")
    for isa in ISAS:
        kernels.set_isa(isa)
        y = layer(x)
        assert y[1].isnan().all() and not y[[0, 2]].isnan().any(), isa
        assert torch.equal(y[[0, 2]], layer(x[[0, 2]])), isa


def test_non_finite_activations_give_nan_rows_on_every_path():
    """A token with a NaN or an infinity gets NaN outputs on every path (the engine then fails that sequence
    alone), and the other tokens of the call are untouched."""
    layer = linear([(random_blocks(T["Q4_1"], 20, 96, seed=3), T["Q4_1"])], 96)
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(4))
    x[1, 40] = float("nan")
    x[2, 70] = float("-inf")
    for isa in ISAS:
        kernels.set_isa(isa)
        y = layer(x)
        assert y[1:3].isnan().all(), isa
        assert torch.equal(y[[0, 3]], layer(x[[0, 3]])), isa


def test_interleaved_layout():
    """Row r, weights 4c..4c+3 of a block sit at lane r of code vector c, after the group's scale fields."""
    raw = random_blocks(T["Q8_0"], 18, 32)  # one block a row: a group of 16 and one of 2
    tiles = ggml.repack(torch.from_numpy(raw), T["Q8_0"]).numpy()
    group = tiles[:16].reshape(-1)
    np.testing.assert_array_equal(group[:32].reshape(16, 2), raw[:16, :2])  # the 16 fp16 scales first
    codes = (group[32:] ^ 0x80).reshape(8, 16, 4)  # then [vector][row][4 weights], stored plus 128
    np.testing.assert_array_equal(codes.transpose(1, 0, 2).reshape(16, 32), raw[:16, 2:])
    last = tiles[16:].reshape(-1)
    np.testing.assert_array_equal(last[:4].reshape(2, 2), raw[16:, :2])
    np.testing.assert_array_equal((last[4:] ^ 0x80).reshape(8, 2, 4).transpose(1, 0, 2).reshape(2, 32), raw[16:, 2:])


needs_bf16_gemm = pytest.mark.skipif(
    kernels.best_isa() != "avx512_vnni" or "avx512_bf16" not in open("/proc/cpuinfo").read(),
    reason="the bf16 GEMM prefill path needs AVX512-VNNI and AVX512-BF16")


@needs_bf16_gemm
@pytest.mark.parametrize("name", ["Q4_1", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("swiglu", [False, True])
def test_prefill_rows_as_bf16_gemm(name, swiglu):
    """Rows from `gemm_from` on (64 or more) run as a bf16 GEMM: close to the float64 product; the
    rows before it are exactly the int8 kernel's, and fewer than 64 rows never leave it."""
    kind = ggml.KERNEL_TYPES[name]
    cols = 512 if gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)][0] == 256 else 96
    raw = random_blocks(kind, 38, cols, seed=7)
    layer = linear([(raw, kind)], cols, bias=torch.randn(38), swiglu=swiglu)
    x = torch.randn(70, cols)
    exact = layer(x)

    def run(gemm_from: int):
        return torch.ops.minillm.ggml_linear(x, layer.weights, layer.formats, cols, layer.bias, swiglu, gemm_from)

    assert torch.equal(run(-1), exact)
    mixed = run(5)
    assert torch.equal(run(7), exact)  # 63 prompt rows: below the threshold, all int8
    assert torch.equal(mixed[:5], exact[:5])
    w = torch.from_numpy(reference_weight(raw, kind))
    y = x.double() @ w.T + layer.bias.double()
    if swiglu:
        g, u = y.chunk(2, dim=-1)
        y = g / (1 + torch.exp(-g)) * u
    assert (mixed[5:] - y[5:]).abs().max() < 0.02 * y.abs().max()
    assert not torch.equal(mixed[5:], exact[5:])  # the GEMM did run
