// Matrix multiplication with GGUF (llama.cpp) quantized weights on CPU: y = x W^T (+ bias).
//
// The weights stay in the file's own block types and bits (ggml_formats.h: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
// Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS), their rows interleaved in groups of 16 at load (`ggml_repack`), so
// that a vector load reads the same unit of 8 or 16 rows, one per lane: the kernels compute 16 rows at once
// and need no horizontal sums. F16 and BF16 tensors keep their rows as stored and meet the activations in
// float32 (ggml_float.h). A linear layer may be made of several tensors of different types (Q/K/V,
// gate/up, as Q4_K_M mixes them): each is a segment of the output columns, on the same activations.
//
// Activations are quantized per token to 8 bits with one scale per 32 values (dx = max|x| / 127, as
// llama.cpp's Q8_0), or per 256 in front of the super-block types (as its Q8_K). A block's dot product with
// one row is then an exact integer -- code offsets (8 for Q4_0, 16 for Q5_0, 4 for Q3_K, 32 for Q6_K, 128
// for stored int8 codes) taken out as offset x sum of the activation codes, and a super-block's integer
// scales and mins multiplied in as integers -- and every path does the same float arithmetic per row, block
// after block (ggml_formats.h, "How a type's dot product is summed"; ggml_dot.h `group_portable`).
// The portable, AVX2 and AVX-512 VNNI paths therefore give the same bits, chosen at run time from the CPU's
// flags (see `isa`; this file is compiled for plain x86-64, each vector path in functions marked with its
// target), and a row's result does not depend on the tile of tokens it was computed in: batched equals
// alone. The AVX-512 VNNI path covers Q4_0, Q4_1 and Q8_0; the other types take their AVX2 path there.
//
// Prefill chunks: rows from `gemm_from` on, when there are at least 64 of them and the CPU has AVX512-BF16,
// may run instead as one bf16 GEMM (PyTorch's, oneDNN) on the weight dequantized for the call (opt-in:
// EngineConfig.fast_prefill). The rows before it (a step's decode tokens) always take the int8 path.
//
// Work is split over groups of rows (at::parallel_for, PyTorch's thread pool and count). A thread takes a
// chunk of groups small enough to stay in L1 and runs a block of tokens against it, four at a time.

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "ggml_dot_avx2.h"
#include "ggml_dot_vnni.h"
#include "ggml_float.h"
#include "ops.h"

namespace {

using namespace ggml;
constexpr int64_t NT = 4;  // tokens per tile

// ---------------------------------------------------------------- dispatch
enum class Isa { Portable = 0, Avx2 = 1, Avx512Vnni = 2 };

Isa best_isa() {
#ifdef MINILLM_SIMDE_AVX512
  return Isa::Avx512Vnni;  // emulated (ggml_dot.h)
#endif
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return Isa::Avx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::Avx2;
  return Isa::Portable;
}

// The path in use: the best one this CPU has, unless MINILLM_ISA (portable | avx2 | avx512_vnni) asks for
// a lower one, or set_isa() pins one (tests force every path the CPU can run).
Isa supported = best_isa();
Isa current = [] {
  const char* env = std::getenv("MINILLM_ISA");
  if (env == nullptr) return supported;
  const std::string s(env);
  Isa want = s == "portable" ? Isa::Portable : s == "avx2" ? Isa::Avx2 : s == "avx512_vnni" ? Isa::Avx512Vnni : supported;
  return std::min(want, supported);
}();

const char* isa_name(Isa isa) {
  return isa == Isa::Avx512Vnni ? "avx512_vnni" : isa == Isa::Avx2 ? "avx2" : "portable";
}

// (a group's tiles, blocks per row, NR tokens, out, the group to prefetch meanwhile or null)
using GroupFn = void (*)(const uint8_t*, int64_t, const XRow*, float (*)[GROUP], const uint8_t*);

template <int64_t FMT, int NR>
GroupFn group_fn_for() {
  constexpr bool vnni = FMT == Q4_0 || FMT == Q4_1 || FMT == Q8_0;  // the types with an AVX-512 path
  if constexpr (vnni)
    if (current == Isa::Avx512Vnni) return &group_vnni<FMT, NR>;
  return current == Isa::Portable ? &group_portable<FMT, NR> : &group_avx2<FMT, NR>;
}

// F16 / BF16 rows: (rows, bytes per row, how many rows, K, the tokens' float32 values, out)
using FloatFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, const float* const*, float (*)[GROUP]);

template <int NR>
FloatFn float_fn(int64_t fmt) {
  const bool vector = current != Isa::Portable;  // the AVX2 path also on AVX-512 CPUs
  if (fmt == F16) return vector ? &float_rows_avx2<F16, NR> : &float_rows_portable<F16, NR>;
  return vector ? &float_rows_avx2<BF16, NR> : &float_rows_portable<BF16, NR>;
}

template <int NR>
GroupFn group_fn(int64_t fmt) {
  switch (fmt) {
    case Q4_0: return group_fn_for<Q4_0, NR>();
    case Q4_1: return group_fn_for<Q4_1, NR>();
    case Q5_0: return group_fn_for<Q5_0, NR>();
    case Q5_1: return group_fn_for<Q5_1, NR>();
    case Q8_0: return group_fn_for<Q8_0, NR>();
    case Q2_K: return group_fn_for<Q2_K, NR>();
    case Q3_K: return group_fn_for<Q3_K, NR>();
    case IQ4_NL: return group_fn_for<IQ4_NL, NR>();
    case Q4_K: return group_fn_for<Q4_K, NR>();
    case Q5_K: return group_fn_for<Q5_K, NR>();
    case Q6_K: return group_fn_for<Q6_K, NR>();
    default: return group_fn_for<IQ4_XS, NR>();  // formats were checked by check_weight
  }
}

// ---------------------------------------------------------------- activations
// Activations are quantized in units of 32 values, or of 256 in front of super-block types: codes
// q = round-to-even(x 127 / max|x|) over the unit, its scale dx = max|x| / 127, and the codes' sums per 16
// and per 32. Every path computes the same maxima, products and roundings, so the same codes. A unit holding
// a NaN or an infinity gets scale NaN and zero codes, so its token's outputs are NaN on every path (the
// engine then fails that sequence alone) rather than path-dependent garbage.
constexpr float kNotFinite = std::numeric_limits<float>::quiet_NaN();

inline float inverse_scale(float amax) {
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  return inv <= std::numeric_limits<float>::max() ? inv : 0.f;  // a subnormal max: codes 0, not inf x 0
}

// max|x| over a block of 32, or NaN if it holds a NaN or an infinity
float amax_portable(const float* src) {
  float amax = 0.f;
  for (int j = 0; j < QK; ++j) {
    if (!(std::fabs(src[j]) <= std::numeric_limits<float>::max())) return kNotFinite;
    amax = std::max(amax, std::fabs(src[j]));
  }
  return amax;
}

// codes of a block of 32 at 1 / scale `inv`; the sums of its halves
void codes_portable(const float* src, float inv, int8_t* q, int32_t* sums) {
  sums[0] = sums[1] = 0;
  for (int j = 0; j < QK; ++j) {
    const int v = static_cast<int>(std::nearbyint(src[j] * inv));
    q[j] = static_cast<int8_t>(v);
    sums[j / 16] += v;
  }
}

// (the scalar loop above calls libm's nearbyintf per value, too slow for every token of every layer)
VEC_TARGET_AVX2 inline int32_t hsum(__m256i a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

VEC_TARGET_AVX2 float amax_avx2(const float* src) {
  const __m256 sign = _mm256_set1_ps(-0.f), largest = _mm256_set1_ps(std::numeric_limits<float>::max());
  __m256 m = _mm256_setzero_ps();
  int finite = 0xff;
  for (int i = 0; i < 4; ++i) {
    const __m256 magnitude = _mm256_andnot_ps(sign, _mm256_loadu_ps(src + 8 * i));
    m = _mm256_max_ps(m, magnitude);
    finite &= _mm256_movemask_ps(_mm256_cmp_ps(magnitude, largest, _CMP_LE_OQ));  // false for NaN
  }
  if (finite != 0xff) return kNotFinite;
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

VEC_TARGET_AVX2 void codes_avx2(const float* src, float inv_scalar, int8_t* q, int32_t* sums) {
  const __m256 inv = _mm256_set1_ps(inv_scalar);
  __m256i c[4];
  for (int i = 0; i < 4; ++i) c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + 8 * i), inv));  // round to even
  // int32 -> int8 (in range, so no saturation); the packs interleave 128-bit lanes, the permute restores order
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  sums[0] = hsum(_mm256_add_epi32(c[0], c[1]));
  sums[1] = hsum(_mm256_add_epi32(c[2], c[3]));
}

VEC_TARGET_VNNI float amax_vnni(const float* src) {
  const __m512 abs_a = _mm512_abs_ps(_mm512_loadu_ps(src)), abs_b = _mm512_abs_ps(_mm512_loadu_ps(src + 16));
  const __m512 largest = _mm512_set1_ps(std::numeric_limits<float>::max());
  if ((_mm512_cmp_ps_mask(abs_a, largest, _CMP_LE_OQ) & _mm512_cmp_ps_mask(abs_b, largest, _CMP_LE_OQ)) != 0xffff)
    return kNotFinite;
  return _mm512_reduce_max_ps(_mm512_max_ps(abs_a, abs_b));
}

VEC_TARGET_VNNI void codes_vnni(const float* src, float inv_scalar, int8_t* q, int32_t* sums) {
  const __m512 inv = _mm512_set1_ps(inv_scalar);
  const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src), inv));
  const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + 16), inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qb));
  sums[0] = _mm512_reduce_add_epi32(qa);
  sums[1] = _mm512_reduce_add_epi32(qb);
}

// The quantized activations of `rows` tokens of K values (the arrays of XRow, token after token).
struct XBlocks {
  int8_t* q;
  float *d, *sb;
  int16_t *qs, *qb;
};

void quantize_rows(const float* x, int64_t rows, int64_t k, int64_t unit, const XBlocks& out) {
  const int64_t per = unit / QK;  // blocks of 32 per unit
  float (*amax_of)(const float*) = current == Isa::Avx512Vnni ? &amax_vnni : current == Isa::Avx2 ? &amax_avx2 : &amax_portable;
  void (*codes)(const float*, float, int8_t*, int32_t*) =
      current == Isa::Avx512Vnni ? &codes_vnni : current == Isa::Avx2 ? &codes_avx2 : &codes_portable;
  at::parallel_for(0, rows * k / unit, std::max<int64_t>(1, 256 / per), [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {  // rows are contiguous, so unit u of the flat array
      float amax = 0.f;
      for (int64_t i = u * per; i < (u + 1) * per && !std::isnan(amax); ++i) {
        const float a = amax_of(x + i * QK);
        amax = std::isnan(a) ? a : std::max(amax, a);
      }
      const bool finite = !std::isnan(amax);
      const float inv = inverse_scale(finite ? amax : 0.f), dx = amax / 127.f;
      for (int64_t i = u * per; i < (u + 1) * per; ++i) {
        int32_t sums[2] = {0, 0};
        if (finite) codes(x + i * QK, inv, out.q + i * QK, sums);
        else std::memset(out.q + i * QK, 0, QK);
        out.d[i] = dx;
        out.qs[2 * i] = static_cast<int16_t>(sums[0]);
        out.qs[2 * i + 1] = static_cast<int16_t>(sums[1]);
        out.qb[i] = static_cast<int16_t>(sums[0] + sums[1]);
        out.sb[i] = dx * static_cast<float>(sums[0] + sums[1]);
      }
    }
  });
}

// ---------------------------------------------------------------- SwiGLU: silu(gate) * up
// silu(g) = g / (1 + exp(-g)); exp by range reduction (x = n ln2 + r, |r| <= ln2 / 2, ln2 in Cephes' two
// parts) and a degree-7 Taylor polynomial (relative error < 1e-8 before rounding). Every path does the
// same roundings in the same order (round to even, exact scaling by 2^n, each product-then-sum written as
// an fma, so that the compiler's contraction cannot make the paths differ): all give the same bits. Done in
// the matmul's output loop rather than as at::silu + mul_, whose dispatch and TensorIterator set-up run cold
// after each layer's weights stream through.
constexpr float kExpLo = -87.f, kExpHi = 88.f;  // 2^n stays a normal float; beyond, silu is ~g or ~0 anyway
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[8] = {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};

float silu_mul(float g, float u) {
  float x = -g;
  if (std::isnan(x)) return g * u;  // g's own NaN, as the vector paths' arithmetic passes it on
  x = std::min(std::max(x, kExpLo), kExpHi);
  const float n = std::nearbyint(x * kLog2e);
  const float r = std::fma(n, -kLn2Lo, std::fma(n, -kLn2Hi, x));
  float p = kExpPoly[0];
  for (int i = 1; i < 8; ++i) p = std::fma(p, r, kExpPoly[i]);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return g / std::fma(p, scale, 1.f) * u;
}

void swiglu_row_portable(const float* gate, const float* up, float* out, int64_t h) {
  for (int64_t i = 0; i < h; ++i) out[i] = silu_mul(gate[i], up[i]);
}

VEC_TARGET_AVX2 void swiglu_row_avx2(const float* gate, const float* up, float* out, int64_t h) {
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    // max/min return their second operand for a NaN, so a NaN goes on (and comes out NaN)
    const __m256 x = _mm256_min_ps(_mm256_set1_ps(kExpHi),
                                   _mm256_max_ps(_mm256_set1_ps(kExpLo), _mm256_xor_ps(g, _mm256_set1_ps(-0.f))));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Lo), _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Hi), x));
    __m256 p = _mm256_set1_ps(kExpPoly[0]);
    for (int k = 1; k < 8; ++k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[k]));
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    const __m256 silu = _mm256_div_ps(g, _mm256_fmadd_ps(p, scale, _mm256_set1_ps(1.f)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
  }
  for (; i < h; ++i) out[i] = silu_mul(gate[i], up[i]);
}

VEC_TARGET_VNNI void swiglu_row_vnni(const float* gate, const float* up, float* out, int64_t h) {
  int64_t i = 0;
  for (; i + 16 <= h; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 minus_g = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32(INT32_MIN)));
    const __m512 x = _mm512_min_ps(_mm512_set1_ps(kExpHi), _mm512_max_ps(_mm512_set1_ps(kExpLo), minus_g));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Lo), _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Hi), x));
    __m512 p = _mm512_set1_ps(kExpPoly[0]);
    for (int k = 1; k < 8; ++k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[k]));
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
    const __m512 silu = _mm512_div_ps(g, _mm512_fmadd_ps(p, scale, _mm512_set1_ps(1.f)));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(silu, _mm512_loadu_ps(up + i)));
  }
  for (; i < h; ++i) out[i] = silu_mul(gate[i], up[i]);
}

// y [rows, 2h] (gate, then up) -> z [rows, h]
void swiglu_rows(const float* y, float* z, int64_t rows, int64_t h) {
  auto row = current == Isa::Avx512Vnni ? &swiglu_row_vnni : current == Isa::Avx2 ? &swiglu_row_avx2 : &swiglu_row_portable;
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / h), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row(y + r * 2 * h, y + r * 2 * h + h, z + r * h, h);
  });
}

void check_weight(const at::Tensor& weight, int64_t fmt, int64_t in_features) {
  TORCH_CHECK(weight.dtype() == at::kByte && weight.dim() == 2 && weight.is_contiguous() && weight.device().is_cpu(),
              "ggml_linear: weight must be a contiguous uint8 CPU tensor [out, bytes per row]");
  check_format(fmt);
  const Layout l = layout(fmt);
  TORCH_CHECK(in_features > 0 && in_features % l.weights == 0, "ggml_linear: in_features ", in_features,
              " is not a positive multiple of ", l.weights, " (GGML type ", fmt, ")");
  TORCH_CHECK(weight.size(1) == in_features / l.weights * l.bytes, "ggml_linear: a row of ", in_features,
              " weights of GGML type ", fmt, " has ", in_features / l.weights * l.bytes, " bytes, the tensor has ",
              weight.size(1));
}

// Row o of a weight: its group's first byte, the group's width and the row's lane (a table as stored in the
// file, not interleaved, is a group of one row per row).
struct RowRef {
  const uint8_t* group;
  int64_t width, lane;
};

RowRef row_ref(const at::Tensor& weight, int64_t fmt, int64_t o, bool interleaved) {
  interleaved = interleaved && !is_float(fmt);
  const int64_t first = interleaved ? o / GROUP * GROUP : o;
  return {weight.data_ptr<uint8_t>() + first * weight.size(1), std::min(interleaved ? GROUP : 1, weight.size(0) - first),
          o - first};
}

// One row dequantized to float32 values (written through `put(j, value)`); `stored`: the file's own bytes.
template <typename Put>
void dequantize_row(int64_t fmt, const RowRef& row, int64_t nb, bool stored, Put put) {
  const Layout l = layout(fmt);
  if (is_float(fmt)) {
    for (int64_t j = 0; j < nb * l.weights; ++j) put(j, float_value(fmt, row.group, j));
    return;
  }
  uint8_t block[256];
  int32_t q[256];
  float d[16], m[16];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* tile = row.group + b * row.width * l.bytes;
    if (!stored) gather_block(fmt, tile, row.width, row.lane, block);
    decode_block(fmt, stored ? tile : block, q, d, m);
    for (int j = 0; j < l.weights; ++j) put(b * l.weights + j, d[j / 16] * q[j] + m[j / 16]);
  }
}

// The last group when it has fewer than 16 rows, widened to 16 (zero codes and scales in the rows it lacks),
// so that every path runs whole groups.
std::vector<uint8_t> widen_group(int64_t fmt, const uint8_t* group, int64_t width, int64_t row_bytes) {
  const Layout l = layout(fmt);
  std::vector<uint8_t> rows(GROUP * row_bytes, 0), out(GROUP * row_bytes);
  for (int64_t lane = 0; lane < width; ++lane)
    for (int64_t b = 0; b < row_bytes / l.bytes; ++b)
      gather_block(fmt, group + b * width * l.bytes, width, lane, rows.data() + lane * row_bytes + b * l.bytes);
  interleave_groups(fmt, rows.data(), out.data(), GROUP, row_bytes, 0, 1);
  return out;
}

constexpr int64_t GEMM_MIN_ROWS = 64;  // below it the per-call dequantization costs more than it saves

bool bf16_gemm_supported() {
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
}

// The whole weight as bf16 [N, K], for one GEMM call.
at::Tensor dequantize_bf16(const at::Tensor& weight, int64_t fmt, int64_t in_features) {
  const int64_t n = weight.size(0), nb = in_features / layout(fmt).weights;
  at::Tensor out = at::empty({n, in_features}, weight.options().dtype(at::kBFloat16));
  c10::BFloat16* dst = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      c10::BFloat16* row = dst + o * in_features;
      dequantize_row(fmt, row_ref(weight, fmt, o, true), nb, false, [&](int64_t j, float v) { row[j] = c10::BFloat16(v); });
    }
  });
  return out;
}

// A group's outputs for one token: out = skip + (res + bias), each term where given (a missing bias adds 0.f:
// -0 comes out +0, on every path alike). One loop per case, so that each vectorizes.
void store_outputs(const float* res, int64_t width, const float* bias, const float* skip, float* out) {
  if (bias && skip) for (int64_t l = 0; l < width; ++l) out[l] = skip[l] + (res[l] + bias[l]);
  else if (bias) for (int64_t l = 0; l < width; ++l) out[l] = res[l] + bias[l];
  else if (skip) for (int64_t l = 0; l < width; ++l) out[l] = skip[l] + (res[l] + 0.f);
  else for (int64_t l = 0; l < width; ++l) out[l] = res[l] + 0.f;
}

// One tensor of a linear layer: its rows are output columns [first, first + rows) of the layer.
struct Segment {
  const uint8_t* w;
  int64_t fmt, rows, row_bytes, nb, first, groups;
  std::vector<uint8_t> widened;  // the last group, widened to 16 rows (empty if it is whole)
  GroupFn kernels[NT];
  FloatFn floats[NT];  // F16 / BF16 (then `kernels` is unused)
};

// x [..., K] float32 -> [..., N]; with swiglu, N = 2H outputs become silu(y[:H]) * y[H:] ([..., H]).
// gemm_from: rows from here on may run as a bf16 GEMM (see the top of this file); -1: none.
// residual [..., N]: returned as residual + x W^T (+ bias), the decoder layer's skip connections fused.
// norm: x is first RMS-normalized with these K weights and eps (see ggml_linear_normed).
struct Norm {
  const at::Tensor& weight;  // [K] float32, contiguous
  float eps;
};

at::Tensor linear(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef fmts, int64_t in_features,
                  const std::optional<at::Tensor>& bias, bool swiglu, int64_t gemm_from,
                  const std::optional<at::Tensor>& residual, const Norm* norm) {
  TORCH_CHECK(!weights.empty() && weights.size() == fmts.size(), "ggml_linear: one format per weight tensor");
  int64_t n = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    check_weight(weights[i], fmts[i], in_features);
    n += weights[i].size(0);
  }
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(), "ggml_linear: x must be float32 on CPU");
  TORCH_CHECK(x_in.size(-1) == in_features, "ggml_linear: x has ", x_in.size(-1), " features, the weight ", in_features);
  const at::Tensor x = x_in.contiguous();
  int64_t rows = x.numel() / in_features;
  const int64_t nb = in_features / QK;
  TORCH_CHECK(!swiglu || n % 2 == 0, "ggml_linear: swiglu needs an even number of outputs");
  const float* b = nullptr;
  at::Tensor bias_c;
  if (bias.has_value()) {
    bias_c = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_c.numel() == n, "ggml_linear: bias has ", bias_c.numel(), " values for ", n, " outputs");
    b = bias_c.data_ptr<float>();
  }
  const float* skip = nullptr;
  at::Tensor residual_c;
  if (residual.has_value()) {
    TORCH_CHECK(!swiglu, "ggml_linear: a residual with swiglu is not supported");
    residual_c = residual->contiguous();
    TORCH_CHECK(residual_c.scalar_type() == at::kFloat && residual_c.numel() == rows * n, "ggml_linear: the residual "
                "must be float32 with ", rows * n, " values, it has ", residual_c.numel());
    skip = residual_c.data_ptr<float>();
  }
  const bool gemm = gemm_from >= 0 && gemm_from < rows && rows - gemm_from >= GEMM_MIN_ROWS &&
                    current == Isa::Avx512Vnni && bf16_gemm_supported();
  if (gemm && norm) {  // the GEMM reads x itself: normalize it as a tensor first
    return linear(minillm::rms_norm(x, norm->weight, norm->eps), weights, fmts, in_features, bias, swiglu, gemm_from,
                  residual, nullptr);
  }
  const int64_t all_rows = rows;
  if (gemm) rows = gemm_from;  // the int8 path below takes only the rows before it
  const float* src = x.data_ptr<float>();
  if (norm) {  // RMSNorm into a buffer kept per thread, straight into the quantizer
    thread_local std::vector<float> normed;
    normed.resize(std::max<size_t>(normed.size(), rows * in_features));
    minillm::rms_norm_rows(src, norm->weight.data_ptr<float>(), rows, in_features, norm->eps, normed.data());
    src = normed.data();
  }
  // the quantized activations in a buffer kept per calling thread: no tensor allocations per call; per 256
  // in front of super-block types (a layer mixing them with blocks of 32 gives those the same scale 8 times)
  bool any_super = false, any_quantized = false;
  for (size_t i = 0; i < weights.size(); ++i) any_super |= superblock(fmts[i]), any_quantized |= !is_float(fmts[i]);
  thread_local std::vector<uint8_t> scratch;  // (operator new's alignment suits the float and int16 parts)
  scratch.resize(std::max<size_t>(scratch.size(), rows * (in_features + nb * 14)));
  XBlocks xb;
  xb.d = reinterpret_cast<float*>(scratch.data());
  xb.sb = xb.d + rows * nb;
  xb.qs = reinterpret_cast<int16_t*>(xb.sb + rows * nb);
  xb.qb = xb.qs + rows * nb * 2;
  xb.q = reinterpret_cast<int8_t*>(xb.qb + rows * nb);
  if (any_quantized) quantize_rows(src, rows, in_features, any_super ? QK_SUPER : QK, xb);

  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty(shape, x.options());
  float* out = y.data_ptr<float>();
  std::vector<Segment> segments(weights.size());
  int64_t groups = 0, first = 0, widest = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    Segment& s = segments[i];
    const int64_t fmt = fmts[i], rows_i = weights[i].size(0), row_bytes = weights[i].size(1), tail = rows_i % GROUP;
    s.w = weights[i].data_ptr<uint8_t>();
    s.fmt = fmt, s.rows = rows_i, s.row_bytes = row_bytes, s.nb = in_features / layout(fmt).weights;
    s.first = first, s.groups = (rows_i + GROUP - 1) / GROUP;
    if (is_float(fmt)) {
      s.floats[0] = float_fn<1>(fmt), s.floats[1] = float_fn<2>(fmt);
      s.floats[2] = float_fn<3>(fmt), s.floats[3] = float_fn<4>(fmt);
    } else {
      if (tail) s.widened = widen_group(fmt, s.w + (rows_i - tail) * row_bytes, tail, row_bytes);
      s.kernels[0] = group_fn<1>(fmt), s.kernels[1] = group_fn<2>(fmt);
      s.kernels[2] = group_fn<3>(fmt), s.kernels[3] = group_fn<4>(fmt);
    }
    first += rows_i, groups += s.groups, widest = std::max(widest, row_bytes);
  }
  // ~16 KB of weights per chunk: they stay in L1 while a block of tokens passes over them, ~128 KB of
  // quantized activations per block: they stay in L2 while the thread's groups pass (a prefill's 512 tokens
  // would stream theirs from L3 for each chunk: -5 % on Zen 2; the weights read again per block cost less)
  const int64_t chunk = std::max<int64_t>(1, 16384 / (GROUP * widest));
  const int64_t block = std::max<int64_t>(NT, 131072 / in_features / NT * NT);
  at::parallel_for(0, groups, chunk, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = 0; t0 < rows; t0 += block) {
      for (int64_t c0 = begin; c0 < end; c0 += chunk) {
        const int64_t c1 = std::min(end, c0 + chunk);
        for (int64_t r0 = t0; r0 < std::min(rows, t0 + block); r0 += NT) {
          const int nr = static_cast<int>(std::min<int64_t>(NT, rows - r0));
          XRow xr[NT];
          const float* xf[NT];
          for (int i = 0; i < nr; ++i) {
            const int64_t t = r0 + i;
            xr[i] = {xb.q + t * in_features, xb.d + t * nb, xb.qs + t * nb * 2, xb.qb + t * nb, xb.sb + t * nb};
            xf[i] = src + t * in_features;
          }
          size_t si = 0;
          int64_t before = 0;  // groups of the segments before segment si
          for (int64_t g = c0; g < c1; ++g) {
            while (g - before >= segments[si].groups) before += segments[si++].groups;
            const Segment& s = segments[si];
            const int64_t lg = g - before, o = lg * GROUP, width = std::min(GROUP, s.rows - o);
            float res[NT][GROUP];
            // the next group's weights, fetched during the first pass over this one (later passes find them cached)
            const uint8_t* ahead = r0 > t0 || g + 1 >= end ? nullptr
                                   : lg + 1 < s.groups ? s.w + (o + GROUP) * s.row_bytes : segments[si + 1].w;
            if (is_float(s.fmt)) s.floats[nr - 1](s.w + o * s.row_bytes, s.row_bytes, width, in_features, xf, res);
            else s.kernels[nr - 1](width < GROUP ? s.widened.data() : s.w + o * s.row_bytes, s.nb, xr, res, ahead);
            for (int i = 0; i < nr; ++i) {
              const int64_t at = (r0 + i) * n + s.first + o;
              store_outputs(res[i], width, b ? b + s.first + o : nullptr, skip ? skip + at : nullptr, out + at);
            }
          }
        }
      }
    }
  });
  if (gemm) {
    const int64_t count = all_rows - rows;
    const at::Tensor xs16 = x.view({all_rows, in_features}).narrow(0, rows, count).to(at::kBFloat16);
    at::Tensor target = y.view({all_rows, n}).narrow(0, rows, count);
    for (size_t i = 0; i < weights.size(); ++i)
      target.narrow(1, segments[i].first, segments[i].rows)
          .copy_(at::mm(xs16, dequantize_bf16(weights[i], fmts[i], in_features).t()));
    if (b) target.add_(bias_c);
    if (skip) target.add_(residual_c.view({all_rows, n}).narrow(0, rows, count));
    rows = all_rows;
  }
  if (!swiglu) return y;
  shape.back() = n / 2;
  at::Tensor z = at::empty(shape, x.options());
  swiglu_rows(out, z.data_ptr<float>(), rows, n / 2);
  return z;
}

// Rows `ids` of a quantized table dequantized to float32 (token embeddings that the file stores quantized);
// `interleaved`: as ggml_repack laid it out, else the file's own rows.
at::Tensor ggml_dequantize_rows(const at::Tensor& weight, int64_t fmt, int64_t in_features, const at::Tensor& ids_in,
                                bool interleaved) {
  check_weight(weight, fmt, in_features);
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t count = ids.numel(), nb = in_features / layout(fmt).weights, rows = weight.size(0);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < rows, "ggml_dequantize_rows: row ", id[i], " outside [0, ", rows, ")");
  at::Tensor y = at::empty({count, in_features}, weight.options().dtype(at::kFloat));
  float* out = y.data_ptr<float>();
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* dst = out + i * in_features;
      dequantize_row(fmt, row_ref(weight, fmt, id[i], interleaved), nb, !interleaved, [&](int64_t j, float v) { dst[j] = v; });
    }
  });
  return y;
}

// A tensor's rows of file blocks [rows, bytes per row] -> the kernels' interleaved layout, into `out` (the same
// shape): once per tensor at load, over PyTorch's threads.
void ggml_repack(const at::Tensor& raw_in, int64_t fmt, at::Tensor& out) {
  check_format(fmt);
  TORCH_CHECK(raw_in.dtype() == at::kByte && raw_in.dim() == 2 && raw_in.size(1) % layout(fmt).bytes == 0,
              "ggml_repack: expected uint8 rows of whole blocks of GGML type ", fmt);
  TORCH_CHECK(out.dtype() == at::kByte && out.sizes() == raw_in.sizes() && out.is_contiguous() &&
                  out.data_ptr() != raw_in.data_ptr(), "ggml_repack: out must be another contiguous uint8 tensor of "
              "the same shape");
  const at::Tensor raw = raw_in.contiguous();
  const int64_t rows = raw.size(0), row_bytes = raw.size(1), groups = (rows + GROUP - 1) / GROUP;
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    interleave_groups(fmt, src, dst, rows, row_bytes, begin, end);
  });
}

std::string ggml_isa() { return isa_name(current); }
std::string ggml_best_isa() { return isa_name(supported); }

// Pin a path for this process (tests); asking for one the CPU lacks is an error, not a SIGILL.
void ggml_set_isa(const std::string& name) {
  Isa want = name == "portable" ? Isa::Portable : name == "avx2" ? Isa::Avx2 : name == "avx512_vnni" ? Isa::Avx512Vnni : Isa(-1);
  TORCH_CHECK(want != Isa(-1), "unknown ISA path '", name, "' (portable, avx2, avx512_vnni)");
  TORCH_CHECK(want <= supported, "this CPU cannot run the ", name, " path (best: ", isa_name(supported), ")");
  current = want;
}

}  // namespace

namespace minillm {

at::Tensor ggml_linear(const at::Tensor& x, at::TensorList weights, at::IntArrayRef fmts, int64_t in_features,
                       const std::optional<at::Tensor>& bias, bool swiglu, int64_t gemm_from,
                       const std::optional<at::Tensor>& residual) {
  return linear(x, weights, fmts, in_features, bias, swiglu, gemm_from, residual, nullptr);
}

at::Tensor ggml_linear_normed(const at::Tensor& x, const at::Tensor& norm_weight, double eps, at::TensorList weights,
                              at::IntArrayRef fmts, const std::optional<at::Tensor>& bias, bool swiglu,
                              int64_t gemm_from) {
  TORCH_CHECK(norm_weight.scalar_type() == at::kFloat && norm_weight.is_contiguous() &&
                  norm_weight.numel() == x.size(-1), "ggml_linear_normed: the norm needs ", x.size(-1),
              " contiguous float32 weights");
  const Norm norm{norm_weight, static_cast<float>(eps)};
  return linear(x, weights, fmts, x.size(-1), bias, swiglu, gemm_from, std::nullopt, &norm);
}

}  // namespace minillm

TORCH_LIBRARY_FRAGMENT(minillm, m) {
  m.def("ggml_linear(Tensor x, Tensor[] weights, int[] fmts, int in_features, Tensor? bias, bool swiglu, "
        "int gemm_from=-1, Tensor? residual=None) -> Tensor");
  m.def("ggml_dequantize_rows(Tensor weight, int fmt, int in_features, Tensor ids, bool interleaved=True) -> Tensor");
  m.def("ggml_repack(Tensor raw, int fmt, Tensor(a!) out) -> ()");
  m.def("ggml_isa() -> str", &ggml_isa);
  m.def("ggml_best_isa() -> str", &ggml_best_isa);
  m.def("ggml_set_isa(str name) -> ()", &ggml_set_isa);
}

TORCH_LIBRARY_IMPL(minillm, CPU, m) {
  m.impl("ggml_linear", &minillm::ggml_linear);
  m.impl("ggml_dequantize_rows", &ggml_dequantize_rows);
  m.impl("ggml_repack", &ggml_repack);
}
