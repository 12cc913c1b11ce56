// Matrix multiplication with GGUF (llama.cpp) quantized weights on CPU: y = x W^T (+ bias).
//
// The weights stay in their block layout, one row of blocks per output feature:
//   Q4_0  (18 B / 32 weights): fp16 d, 16 B of nibbles;           w = (q - 8) d
//   Q4_1  (20 B / 32):         fp16 d, fp16 m, 16 B of nibbles;   w = q d + m
//   Q8_0  (34 B / 32):         fp16 d, 32 int8;                   w = q d
//   Q4F   (24 B / 32):         f32 d, f32 m, 16 B of nibbles;     w = q d + m      (Q4_K repacked at load)
//   I8S16 (48 B / 32):         f32 d[2], f32 m[2], 32 int8;       w = q d[h] + m[h] per half h of 16
//                                                                  (Q5_0, Q5_1, Q5_K, Q6_K repacked at load)
// In nibble blocks byte j holds weight j in its low half and weight j + 16 in its high half.
//
// The activations are quantized per row to 8 bits in blocks of 32 (scale dx = max|x| / 127, as llama.cpp's
// Q8_0), so every block's dot product is an integer one: sum_j w_j x_j = dx (d sum_j q_j xq_j) + m dx sum_j xq_j,
// with dx sum_j xq_j kept per half block. The integer dot runs on AVX-512 VNNI (vpdpbusd), on AVX2
// (vpmaddubsw + vpmaddwd) or in plain C++, chosen at run time from the CPU's flags (see `isa`); the file
// itself is compiled for plain x86-64, each vector path in functions marked with its target.
//
// Prefill chunks: rows from `gemm_from` on, when there are at least 64 of them and the CPU has AVX512-BF16,
// run instead as one bf16 GEMM (PyTorch's, oneDNN) on the weight dequantized for the call: at 512 tokens
// 3-4x faster than the int8 dot (measured on Zen 4). The rows before it (a step's decode tokens) always take
// the int8 path, so decode logits do not depend on what else is in the step.
//
// Work is split over output rows (at::parallel_for, PyTorch's thread pool and count). A thread takes a
// chunk of rows small enough to stay in L1 and runs every activation row against it, four at a time,
// so a weight block is decoded once per four tokens during prefill and batched decode.

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
#include <string>

namespace {

enum Format : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4F = 100, I8S16 = 101 };  // GGML's ids where they exist
constexpr int64_t QK = 32;

constexpr int64_t block_size(int64_t fmt) {  // bytes per block of 32 weights; 0 for an unknown format
  return fmt == Q4_0 ? 18 : fmt == Q4_1 ? 20 : fmt == Q8_0 ? 34 : fmt == Q4F ? 24 : fmt == I8S16 ? 48 : 0;
}

int64_t block_bytes(int64_t fmt) {
  TORCH_CHECK(block_size(fmt) > 0, "ggml_linear: unknown weight format ", fmt);
  return block_size(fmt);
}

// Activations of one row: blocks of 32 int8 codes, their scale, and dx * (sum of codes) per half block.
struct XRow {
  const int8_t* q;   // [K]
  const float* d;    // [K / 32]
  const float* s;    // [K / 32 * 2]
  // the same per vector lane of the 512-bit path: d 8 times per block, and s / 4 4 times per half
  // (a lane of vpdpbusd covers 4 weights, so lanes 0-3 are a block's first half, 4-7 its second)
  const float* d8;   // [K / 32 * 8]
  const float* s8;   // [K / 32 * 8]
};

inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
inline uint16_t load_u16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline float load_f32(const uint8_t* p) { float v; std::memcpy(&v, p, 4); return v; }

// One block in plain C++: its 32 codes, and scale d and minimum m per half (weight j = q[j] d[h] + m[h]).
// Shared by the portable dot and by dequantization, so both read every layout the same way.
void decode_block(int64_t fmt, const uint8_t* w, int8_t* q, float* d, float* m) {
  if (fmt == Q8_0 || fmt == I8S16) {
    std::memcpy(q, w + (fmt == Q8_0 ? 2 : 16), QK);
    if (fmt == Q8_0) { d[0] = d[1] = half_to_float(load_u16(w)); m[0] = m[1] = 0.f; }
    else { d[0] = load_f32(w); d[1] = load_f32(w + 4); m[0] = load_f32(w + 8); m[1] = load_f32(w + 12); }
    return;
  }
  const uint8_t* nib = w + (fmt == Q4_0 ? 2 : fmt == Q4_1 ? 4 : 8);
  for (int j = 0; j < 16; ++j) { q[j] = nib[j] & 15; q[j + 16] = nib[j] >> 4; }
  if (fmt == Q4F) { d[0] = load_f32(w); m[0] = load_f32(w + 4); }
  else { d[0] = half_to_float(load_u16(w)); m[0] = fmt == Q4_1 ? half_to_float(load_u16(w + 2)) : -8.f * d[0]; }
  d[1] = d[0]; m[1] = m[0];
}

// ---------------------------------------------------------------- portable path
// The reference for the vector paths: same block arithmetic, integer dots in int32.
template <int NR>
void dot_scalar(int64_t fmt, const uint8_t* w, int64_t nb, const XRow* x, float* out) {
  const int64_t bb = block_bytes(fmt);
  float acc[NR] = {};
  for (int64_t b = 0; b < nb; ++b, w += bb) {
    int8_t q[QK];
    float d[2], m[2];
    decode_block(fmt, w, q, d, m);
    for (int r = 0; r < NR; ++r) {
      const int8_t* xq = x[r].q + b * QK;
      int32_t lo = 0, hi = 0;
      for (int j = 0; j < 16; ++j) lo += int32_t(q[j]) * xq[j];
      for (int j = 16; j < 32; ++j) hi += int32_t(q[j]) * xq[j];
      const float dx = x[r].d[b];
      acc[r] += dx * (d[0] * lo + d[1] * hi) + m[0] * x[r].s[2 * b] + m[1] * x[r].s[2 * b + 1];
    }
  }
  for (int r = 0; r < NR; ++r) out[r] = acc[r];
}

// ---------------------------------------------------------------- AVX2 / AVX-512 VNNI
// One template for both: the only difference is the u8 x s8 -> int32 dot of 32 bytes.
#define VEC_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define VEC_TARGET_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

VEC_TARGET_AVX2 inline __m256i udot_avx2(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
VEC_TARGET_VNNI inline __m256i udot_vnni(__m256i u, __m256i s) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}

// The format is a template parameter, so each layout's block decode compiles to straight-line code, and
// blocks alternate between two accumulator sets: one chain of dependent FMAs per row would wait on the
// FMA latency every block (measured on Zen 4, one token: Q4_1 matmuls 1.4-1.8x faster than one chain with
// a run-time format switch; 16 tokens 1.2x).
#define DEFINE_VEC_PATH(NAME, TARGET, UDOT)                                                                  \
  TARGET inline float hsum_##NAME(__m256 v) {                                                                \
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));                           \
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                                                  \
    s = _mm_add_ss(s, _mm_movehdup_ps(s));                                                                   \
    return _mm_cvtss_f32(s);                                                                                 \
  }                                                                                                          \
  template <int64_t FMT, int NR>                                                                             \
  TARGET inline __attribute__((always_inline)) void block_##NAME(const uint8_t* w, int64_t b, const XRow* x, \
                                                                  __m256* acc, float* macc) {                \
    constexpr bool is_signed = FMT == Q8_0 || FMT == I8S16;                                                  \
    __m256i codes;                                                                                           \
    __m256 dv;                                                                                               \
    float m0 = 0.f, m1 = 0.f;                                                                                \
    if constexpr (FMT == Q8_0) {                                                                             \
      codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));                                   \
      dv = _mm256_set1_ps(_cvtsh_ss(load_u16(w)));                                                           \
    } else if constexpr (FMT == I8S16) {                                                                     \
      codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16));                                  \
      dv = _mm256_set_m128(_mm_set1_ps(load_f32(w + 4)), _mm_set1_ps(load_f32(w)));                         \
      m0 = load_f32(w + 8); m1 = load_f32(w + 12);                                                           \
    } else {                                                                                                 \
      constexpr int64_t off = FMT == Q4_0 ? 2 : FMT == Q4_1 ? 4 : 8;                                         \
      const __m128i n = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + off));                          \
      codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(n, 4), n), _mm256_set1_epi8(15));             \
      float d0;                                                                                              \
      if constexpr (FMT == Q4F) { d0 = load_f32(w); m0 = load_f32(w + 4); }                                  \
      else if constexpr (FMT == Q4_1) { d0 = _cvtsh_ss(load_u16(w)); m0 = _cvtsh_ss(load_u16(w + 2)); }      \
      else { d0 = _cvtsh_ss(load_u16(w)); m0 = -8.f * d0; }                                                  \
      dv = _mm256_set1_ps(d0); m1 = m0;                                                                      \
    }                                                                                                        \
    /* signed codes: |w| (unsigned) times x with w's sign, as llama.cpp does */                             \
    const __m256i u = is_signed ? _mm256_sign_epi8(codes, codes) : codes;                                    \
    for (int r = 0; r < NR; ++r) {                                                                           \
      __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r].q + b * QK));                   \
      if constexpr (is_signed) xq = _mm256_sign_epi8(xq, codes);                                             \
      const __m256 dot = _mm256_cvtepi32_ps(UDOT(u, xq));                                                    \
      acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dv, _mm256_set1_ps(x[r].d[b])), acc[r]);                 \
      if constexpr (FMT != Q8_0) macc[r] += m0 * x[r].s[2 * b] + m1 * x[r].s[2 * b + 1];                     \
    }                                                                                                        \
  }                                                                                                          \
  template <int64_t FMT, int NR>                                                                             \
  TARGET void dot_##NAME(const uint8_t* w, int64_t nb, const XRow* x, float* out) {                          \
    constexpr int64_t bb = block_size(FMT);                                                                  \
    __m256 acc0[NR], acc1[NR];                                                                               \
    float macc0[NR], macc1[NR];                                                                              \
    for (int r = 0; r < NR; ++r) {                                                                           \
      acc0[r] = acc1[r] = _mm256_setzero_ps();                                                               \
      macc0[r] = macc1[r] = 0.f;                                                                             \
    }                                                                                                        \
    int64_t b = 0;                                                                                           \
    for (; b + 1 < nb; b += 2) {                                                                             \
      block_##NAME<FMT, NR>(w + b * bb, b, x, acc0, macc0);                                                  \
      block_##NAME<FMT, NR>(w + (b + 1) * bb, b + 1, x, acc1, macc1);                                        \
    }                                                                                                        \
    if (b < nb) block_##NAME<FMT, NR>(w + b * bb, b, x, acc0, macc0);                                        \
    for (int r = 0; r < NR; ++r)                                                                             \
      out[r] = hsum_##NAME(_mm256_add_ps(acc0[r], acc1[r])) + (macc0[r] + macc1[r]);                         \
  }

DEFINE_VEC_PATH(avx2, VEC_TARGET_AVX2, udot_avx2)
DEFINE_VEC_PATH(vnni, VEC_TARGET_VNNI, udot_vnni)

// AVX-512 VNNI on 512-bit registers: two blocks per instruction. A block pair's codes, scales and minima
// are decoded once into vectors (lanes as in XRow::d8 / s8) and reused for every activation row; per
// row and pair: one load of 64 codes, vpdpbusd, a convert, and two FMAs (scaled dot, minimum term).

// A block pair's scales and minima as lane vectors (block b: lanes 0-7, block b + 1: 8-15; lanes 0-3 / 4-7
// are a block's first / second half): the pair's header values gathered into one register and spread with
// vpermps. Building the vectors lane by lane from scalars cost more than the dot itself at one token
// (measured on Zen 4: one-token Q4_1 matmuls 10-30 % faster this way; the same values, bit for bit).
template <int64_t FMT>
VEC_TARGET_VNNI inline void pair_scales(const uint8_t* w0, const uint8_t* w1, __m512& dv, __m512& mv) {
  const __m512i d_lanes = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i m_lanes = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
  if constexpr (FMT == Q8_0 || FMT == Q4_0) {  // fp16 d only: [d0, d1] -> lanes
    const __m128 dd = _mm_cvtph_ps(_mm_insert_epi16(_mm_cvtsi32_si128(load_u16(w0)), load_u16(w1), 2));
    dv = _mm512_permutexvar_ps(d_lanes, _mm512_castps128_ps512(dd));
    mv = FMT == Q4_0 ? _mm512_mul_ps(dv, _mm512_set1_ps(-8.f)) : _mm512_setzero_ps();  // w = (q - 8) d
  } else if constexpr (FMT == Q4_1 || FMT == Q4F) {  // [d0, m0, d1, m1], fp16 or f32
    __m128 dm;
    if constexpr (FMT == Q4_1) {
      uint32_t first, second;
      std::memcpy(&first, w0, 4);
      std::memcpy(&second, w1, 4);
      dm = _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128(static_cast<int>(first)), static_cast<int>(second), 1));
    } else {
      dm = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(reinterpret_cast<const double*>(w0)),
                                      reinterpret_cast<const double*>(w1)));
    }
    dv = _mm512_permutexvar_ps(d_lanes, _mm512_castps128_ps512(dm));
    mv = _mm512_permutexvar_ps(m_lanes, _mm512_castps128_ps512(dm));
  } else {  // I8S16: f32 d[2], m[2] per block -> [d0a d0b m0a m0b d1a d1b m1a m1b]
    const __m512 both = _mm512_insertf32x4(_mm512_castps128_ps512(_mm_loadu_ps(reinterpret_cast<const float*>(w0))),
                                           _mm_loadu_ps(reinterpret_cast<const float*>(w1)), 1);
    dv = _mm512_permutexvar_ps(_mm512_set_epi32(5, 5, 5, 5, 4, 4, 4, 4, 1, 1, 1, 1, 0, 0, 0, 0), both);
    mv = _mm512_permutexvar_ps(_mm512_set_epi32(7, 7, 7, 7, 6, 6, 6, 6, 3, 3, 3, 3, 2, 2, 2, 2), both);
  }
}

template <int64_t FMT, int NR>
VEC_TARGET_VNNI void dot_vnni512(const uint8_t* w, int64_t nb, const XRow* x, float* out) {
  constexpr int64_t bb = block_size(FMT);
  constexpr bool is_signed = FMT == Q8_0 || FMT == I8S16;
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 1 < nb; b += 2) {
    const uint8_t* w0 = w + b * bb;
    const uint8_t* w1 = w0 + bb;
    __m512i codes;
    if constexpr (is_signed) {
      constexpr int64_t off = FMT == Q8_0 ? 2 : 16;
      codes = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + off))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + off)), 1);
    } else {
      constexpr int64_t off = FMT == Q4_0 ? 2 : FMT == Q4_1 ? 4 : 8;
      const __m256i n = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w1 + off)),
                                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(w0 + off)));
      const __m256i mask = _mm256_set1_epi8(15);
      // [low nibbles of b, of b + 1, high of b, of b + 1] -> [low b, high b, low b + 1, high b + 1]
      const __m512i parts = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(n, mask)),
                                               _mm256_and_si256(_mm256_srli_epi16(n, 4), mask), 1);
      codes = _mm512_shuffle_i64x2(parts, parts, _MM_SHUFFLE(3, 1, 2, 0));
    }
    __m512 dv, mv;
    pair_scales<FMT>(w0, w1, dv, mv);
    const __m512i u = is_signed ? _mm512_abs_epi8(codes) : codes;
    const __mmask64 negative = is_signed ? _mm512_movepi8_mask(codes) : 0;
    for (int r = 0; r < NR; ++r) {
      __m512i xq = _mm512_loadu_si512(x[r].q + b * QK);
      if constexpr (is_signed) xq = _mm512_mask_sub_epi8(xq, negative, _mm512_setzero_si512(), xq);
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xq));
      acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(dv, _mm512_loadu_ps(x[r].d8 + b * 8)), acc[r]);
      if constexpr (FMT != Q8_0) acc[r] = _mm512_fmadd_ps(mv, _mm512_loadu_ps(x[r].s8 + b * 8), acc[r]);
    }
  }
  float tail[NR] = {};
  if (b < nb) {  // an odd block count: the last block on 256-bit registers
    __m256 acc8[NR];
    float macc[NR] = {};
    for (int r = 0; r < NR; ++r) acc8[r] = _mm256_setzero_ps();
    block_vnni<FMT, NR>(w + b * bb, b, x, acc8, macc);
    for (int r = 0; r < NR; ++r) tail[r] = hsum_vnni(acc8[r]) + macc[r];
  }
  for (int r = 0; r < NR; ++r) out[r] = _mm512_reduce_add_ps(acc[r]) + tail[r];
}

// ---------------------------------------------------------------- dispatch
enum class Isa { Portable = 0, Avx2 = 1, Avx512Vnni = 2 };

Isa best_isa() {
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

// Every row takes the same arithmetic whatever tile it falls in (NR), so a sequence's logits do not depend on
// which other sequences share its step: batched equals alone, bit for bit.
template <int64_t FMT, int NR>
void dot_fmt(const uint8_t* w, int64_t nb, const XRow* x, float* out) {
  switch (current) {
    case Isa::Avx512Vnni: return dot_vnni512<FMT, NR>(w, nb, x, out);
    case Isa::Avx2: return dot_avx2<FMT, NR>(w, nb, x, out);
    default: return dot_scalar<NR>(FMT, w, nb, x, out);
  }
}

template <int NR>
void dot(int64_t fmt, const uint8_t* w, int64_t nb, const XRow* x, float* out) {
  switch (fmt) {
    case Q4_0: return dot_fmt<Q4_0, NR>(w, nb, x, out);
    case Q4_1: return dot_fmt<Q4_1, NR>(w, nb, x, out);
    case Q8_0: return dot_fmt<Q8_0, NR>(w, nb, x, out);
    case Q4F: return dot_fmt<Q4F, NR>(w, nb, x, out);
    default: return dot_fmt<I8S16, NR>(w, nb, x, out);  // formats were checked by check_weight
  }
}

// ---------------------------------------------------------------- activations
void quantize_rows(const float* x, int64_t rows, int64_t k, int8_t* q, float* d, float* s, float* d8, float* s8) {
  const int64_t nb = k / QK;
  at::parallel_for(0, rows * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* src = x + i * QK;  // rows are contiguous, so block i of the flat array
      float amax = 0.f;
      for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(src[j]));
      const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t lo = 0, hi = 0;
      for (int j = 0; j < QK; ++j) {
        const int v = static_cast<int>(std::nearbyint(src[j] * inv));
        q[i * QK + j] = static_cast<int8_t>(v);
        (j < 16 ? lo : hi) += v;
      }
      d[i] = scale;
      s[2 * i] = scale * lo;
      s[2 * i + 1] = scale * hi;
      for (int j = 0; j < 8; ++j) {
        d8[i * 8 + j] = scale;
        s8[i * 8 + j] = s[2 * i + j / 4] * 0.25f;
      }
    }
  });
}

void check_weight(const at::Tensor& weight, int64_t fmt, int64_t in_features) {
  TORCH_CHECK(weight.dtype() == at::kByte && weight.dim() == 2 && weight.is_contiguous() && weight.device().is_cpu(),
              "ggml_linear: weight must be a contiguous uint8 CPU tensor [out, bytes per row]");
  TORCH_CHECK(in_features > 0 && in_features % QK == 0, "ggml_linear: in_features ", in_features,
              " is not a positive multiple of 32");
  TORCH_CHECK(weight.size(1) == in_features / QK * block_bytes(fmt), "ggml_linear: a row of ", in_features,
              " weights in format ", fmt, " has ", in_features / QK * block_bytes(fmt), " bytes, the tensor has ",
              weight.size(1));
}

constexpr int64_t GEMM_MIN_ROWS = 64;  // below it the dequantization does not pay (measured: 64 rows ~1.7x)

bool bf16_gemm_supported() {
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
}

// The whole weight as bf16 [N, K], for one GEMM call.
at::Tensor dequantize_bf16(const at::Tensor& weight, int64_t fmt, int64_t in_features) {
  const int64_t n = weight.size(0), nb = in_features / QK, bb = block_bytes(fmt);
  at::Tensor out = at::empty({n, in_features}, weight.options().dtype(at::kBFloat16));
  c10::BFloat16* dst = out.data_ptr<c10::BFloat16>();
  const uint8_t* wbase = weight.data_ptr<uint8_t>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* w = wbase + o * weight.size(1);
      for (int64_t b = 0; b < nb; ++b, w += bb) {
        int8_t q[QK];
        float d[2], m[2];
        decode_block(fmt, w, q, d, m);
        c10::BFloat16* row = dst + o * in_features + b * QK;
        for (int j = 0; j < QK; ++j) row[j] = c10::BFloat16(d[j / 16] * q[j] + m[j / 16]);
      }
    }
  });
  return out;
}

// x [..., K] float32 -> [..., N]; with swiglu, N = 2H outputs become silu(y[:H]) * y[H:] ([..., H]).
// gemm_from: rows from here on may run as a bf16 GEMM (see the top of this file); -1: none.
at::Tensor ggml_linear(const at::Tensor& x_in, const at::Tensor& weight, int64_t fmt, int64_t in_features,
                       const std::optional<at::Tensor>& bias, bool swiglu, int64_t gemm_from) {
  check_weight(weight, fmt, in_features);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(), "ggml_linear: x must be float32 on CPU");
  TORCH_CHECK(x_in.size(-1) == in_features, "ggml_linear: x has ", x_in.size(-1), " features, the weight ", in_features);
  const at::Tensor x = x_in.contiguous();
  int64_t rows = x.numel() / in_features;
  const int64_t n = weight.size(0), nb = in_features / QK, row_bytes = weight.size(1);
  TORCH_CHECK(!swiglu || n % 2 == 0, "ggml_linear: swiglu needs an even number of outputs");
  const float* b = nullptr;
  at::Tensor bias_c;
  if (bias.has_value()) {
    bias_c = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_c.numel() == n, "ggml_linear: bias has ", bias_c.numel(), " values for ", n, " outputs");
    b = bias_c.data_ptr<float>();
  }
  const bool gemm = gemm_from >= 0 && gemm_from < rows && rows - gemm_from >= GEMM_MIN_ROWS &&
                    current == Isa::Avx512Vnni && bf16_gemm_supported();
  const int64_t all_rows = rows;
  if (gemm) rows = gemm_from;  // the int8 path below takes only the rows before it
  at::Tensor qbuf = at::empty({rows * in_features}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({rows * nb * 19}, x.options());
  int8_t* xq = qbuf.data_ptr<int8_t>();
  float* xd = scales.data_ptr<float>();
  float* xs = xd + rows * nb;
  float* xd8 = xs + rows * nb * 2;
  float* xs8 = xd8 + rows * nb * 8;
  quantize_rows(x.data_ptr<float>(), rows, in_features, xq, xd, xs, xd8, xs8);

  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty(shape, x.options());
  float* out = y.data_ptr<float>();
  const uint8_t* wbase = weight.data_ptr<uint8_t>();
  // ~16 KB of weight rows per chunk: they stay in L1/L2 while every activation row passes over them
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(64, 16384 / row_bytes));
  at::parallel_for(0, n, chunk, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = begin; c0 < end; c0 += chunk) {
      const int64_t c1 = std::min(end, c0 + chunk);
      for (int64_t r0 = 0; r0 < rows; r0 += 4) {
        const int nr = static_cast<int>(std::min<int64_t>(4, rows - r0));
        XRow xr[4];
        for (int i = 0; i < nr; ++i)
          xr[i] = {xq + (r0 + i) * in_features, xd + (r0 + i) * nb, xs + (r0 + i) * nb * 2,
                   xd8 + (r0 + i) * nb * 8, xs8 + (r0 + i) * nb * 8};
        for (int64_t o = c0; o < c1; ++o) {
          float res[4];
          const uint8_t* w = wbase + o * row_bytes;
          switch (nr) {
            case 4: dot<4>(fmt, w, nb, xr, res); break;
            case 3: dot<3>(fmt, w, nb, xr, res); break;
            case 2: dot<2>(fmt, w, nb, xr, res); break;
            default: dot<1>(fmt, w, nb, xr, res);
          }
          for (int i = 0; i < nr; ++i) out[(r0 + i) * n + o] = res[i] + (b ? b[o] : 0.f);
        }
      }
    }
  });
  if (gemm) {
    const int64_t count = all_rows - rows;
    at::Tensor tail = at::mm(x.view({all_rows, in_features}).narrow(0, rows, count).to(at::kBFloat16),
                             dequantize_bf16(weight, fmt, in_features).t());
    at::Tensor target = y.view({all_rows, n}).narrow(0, rows, count);
    target.copy_(tail);
    if (b) target.add_(bias_c);
    rows = all_rows;
  }
  if (!swiglu) return y;
  const int64_t h = n / 2;
  shape.back() = h;
  at::Tensor act = at::empty(shape, x.options());
  float* a = act.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t j = 0; j < h; ++j) {
        const float g = out[r * n + j];
        a[r * h + j] = g / (1.f + std::exp(-g)) * out[r * n + h + j];
      }
  });
  return act;
}

// Rows `ids` of a quantized table dequantized to float32 (token embeddings that the file stores quantized).
at::Tensor ggml_dequantize_rows(const at::Tensor& weight, int64_t fmt, int64_t in_features, const at::Tensor& ids_in) {
  check_weight(weight, fmt, in_features);
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t count = ids.numel(), nb = in_features / QK, rows = weight.size(0), bb = block_bytes(fmt);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < rows, "ggml_dequantize_rows: row ", id[i], " outside [0, ", rows, ")");
  at::Tensor y = at::empty({count, in_features}, weight.options().dtype(at::kFloat));
  float* out = y.data_ptr<float>();
  const uint8_t* wbase = weight.data_ptr<uint8_t>();
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* w = wbase + id[i] * weight.size(1);
      for (int64_t b = 0; b < nb; ++b, w += bb) {
        int8_t q[QK];
        float d[2], m[2];
        decode_block(fmt, w, q, d, m);
        float* dst = out + i * in_features + b * QK;
        for (int j = 0; j < QK; ++j) dst[j] = d[j / 16] * q[j] + m[j / 16];
      }
    }
  });
  return y;
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

TORCH_LIBRARY_FRAGMENT(minillm, m) {
  m.def("ggml_linear(Tensor x, Tensor weight, int fmt, int in_features, Tensor? bias, bool swiglu, int gemm_from=-1) -> Tensor");
  m.def("ggml_dequantize_rows(Tensor weight, int fmt, int in_features, Tensor ids) -> Tensor");
  m.def("ggml_isa() -> str", &ggml_isa);
  m.def("ggml_best_isa() -> str", &ggml_best_isa);
  m.def("ggml_set_isa(str name) -> ()", &ggml_set_isa);
}

TORCH_LIBRARY_IMPL(minillm, CPU, m) {
  m.impl("ggml_linear", &ggml_linear);
  m.impl("ggml_dequantize_rows", &ggml_dequantize_rows);
}
