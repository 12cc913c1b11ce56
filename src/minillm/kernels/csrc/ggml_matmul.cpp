// Matrix multiplication with GGUF (llama.cpp) quantized weights on CPU: y = x W^T (+ bias).
//
// Block types, 32 weights each (a GGUF file's own, or what kernels/ggml.py repacks K-quants to, exactly):
//   Q4_0  (18 B / 32 weights): fp16 d, 16 B of nibbles;          w = (q - 8) d
//   Q4_1  (20 B):              fp16 d, fp16 m, 16 B of nibbles;  w = q d + m
//   Q8_0  (34 B):              fp16 d, 32 int8;                  w = q d
//   Q4F   (24 B):              f32 d, f32 m, 16 B of nibbles;    w = q d + m               (from Q4_K)
//   I8S16 (48 B):              f32 d[2], f32 m[2], 32 int8;      w = q d[h] + m[h] per half h of 16
//                                                                 (from Q5_0, Q5_1, Q5_K, Q6_K)
//
// Interleaved layout (repacked once at load by kernels/ggml.py `interleave`): output rows in groups of 16
// (the last group: the rows left over), each group stored block by block. Block b's tile holds, for the
// group's W rows, each scale field in turn (W d's, then W m's, ...), then the codes as vectors of four
// consecutive weights of every row: vector c = [row 0: weights 4c..4c+3][row 1: 4c..4c+3]... So one 512-bit
// vpdpbusd multiplies four weights of 16 rows by four broadcast activation codes, one row per lane: a
// block's dot products for 16 rows are 8 instructions and need no horizontal sum (llama.cpp repacks Q4_0
// for its AVX-512 GEMM the same way). Nibble codes: byte i of row r in vector p (0-3) holds weight 4p + i in
// its low half and 16 + 4p + i in its high half (the file's own pairing: byte j holds weights j and j + 16).
// Int8 codes are stored plus 128 (q ^ 0x80: unsigned, as vpdpbusd wants its first operand). A group of W rows
// takes W x (bytes per row), so a tensor keeps the file's shape [rows, bytes per row].
//
// Activations are quantized per token to 8 bits in blocks of 32 (dx = max|x| / 127, as llama.cpp's Q8_0).
// A block's dot product with one row is then an exact integer per half of 16 (the code offset -- 8 for Q4_0,
// 128 for stored int8 codes -- taken out as offset x sum of the activation codes), and every path does the
// same float arithmetic per row, block after block:
//     acc = fma(float(isum), d dx, acc)        macc = fma(m, dx sum(xq), macc)        y = acc + macc
// (per half for I8S16). The portable, AVX2 and AVX-512 VNNI paths therefore give the same bits, chosen at run
// time from the CPU's flags (see `isa`; this file is compiled for plain x86-64, each vector path in functions
// marked with its target), and a row's result does not depend on the tile of tokens it was computed in:
// batched equals alone.
//
// Prefill chunks: rows from `gemm_from` on, when there are at least 64 of them and the CPU has AVX512-BF16,
// may run instead as one bf16 GEMM (PyTorch's, oneDNN) on the weight dequantized for the call (opt-in:
// EngineConfig.fast_prefill). The rows before it (a step's decode tokens) always take the int8 path.
//
// Work is split over groups of rows (at::parallel_for, PyTorch's thread pool and count). A thread takes a
// chunk of groups small enough to stay in L1 and runs every token against it, four at a time.

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

#include "ops.h"

namespace {

enum Format : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4F = 100, I8S16 = 101 };  // GGML's ids where they exist
constexpr int64_t QK = 32, GROUP = 16, NT = 4;  // weights per block, rows per group, tokens per tile

constexpr int64_t block_size(int64_t fmt) {  // bytes per block of 32 weights; 0 for an unknown format
  return fmt == Q4_0 ? 18 : fmt == Q4_1 ? 20 : fmt == Q8_0 ? 34 : fmt == Q4F ? 24 : fmt == I8S16 ? 48 : 0;
}
constexpr int64_t header_size(int64_t fmt) {  // bytes of scale fields per row and block
  return fmt == Q4_0 || fmt == Q8_0 ? 2 : fmt == Q4_1 ? 4 : fmt == Q4F ? 8 : 16;
}
constexpr bool has_nibbles(int64_t fmt) { return fmt == Q4_0 || fmt == Q4_1 || fmt == Q4F; }
constexpr bool f32_scales(int64_t fmt) { return fmt == Q4F || fmt == I8S16; }  // our repacks; the file's are fp16
constexpr bool has_min(int64_t fmt) { return fmt == Q4_1 || fmt == Q4F; }  // one m per block (I8S16: per half)

int64_t block_bytes(int64_t fmt) {
  TORCH_CHECK(block_size(fmt) > 0, "ggml_linear: unknown weight format ", fmt);
  return block_size(fmt);
}

// Activations of one token: blocks of 32 int8 codes, their scale dx, the codes' sum per half block, and
// dx x that sum per half and per block.
struct XRow {
  const int8_t* q;    // [K]
  const float* d;     // [K / 32]
  const int32_t* qs;  // [K / 32 * 2]
  const float* s;     // [K / 32 * 2]
  const float* sb;    // [K / 32]
};

inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
inline int32_t load_i32(const void* p) { int32_t v; std::memcpy(&v, p, 4); return v; }

// Block b of one row in plain C++: its 32 codes with the offset taken out (Q4_0: q - 8; int8: signed), and
// its scale d and minimum m per half (weight j = q[j] d[h] + m[h]). `tile` is block b's tile of a group of
// `width` rows, `lane` the row within it. Shared by the portable dot and by dequantization.
void decode_block(int64_t fmt, const uint8_t* tile, int64_t width, int64_t lane, int32_t* q, float* d, float* m) {
  const uint8_t* codes = tile + width * header_size(fmt);
  auto field = [&](int f) -> float {  // scale field f of this row: fp16, or f32 for the repacked types
    if (f32_scales(fmt)) { float v; std::memcpy(&v, tile + (f * width + lane) * 4, 4); return v; }
    uint16_t h; std::memcpy(&h, tile + (f * width + lane) * 2, 2); return half_to_float(h);
  };
  if (has_nibbles(fmt)) {
    const int offset = fmt == Q4_0 ? 8 : 0;
    for (int p = 0; p < 4; ++p)
      for (int i = 0; i < 4; ++i) {
        const uint8_t byte = codes[(p * width + lane) * 4 + i];
        q[4 * p + i] = (byte & 15) - offset;
        q[16 + 4 * p + i] = (byte >> 4) - offset;
      }
  } else {
    for (int c = 0; c < 8; ++c)
      for (int i = 0; i < 4; ++i) q[4 * c + i] = static_cast<int8_t>(codes[(c * width + lane) * 4 + i] ^ 0x80);
  }
  if (fmt == I8S16) {
    d[0] = field(0); d[1] = field(1); m[0] = field(2); m[1] = field(3);
  } else {
    d[0] = d[1] = field(0);
    m[0] = m[1] = has_min(fmt) ? field(1) : 0.f;
  }
}

// ---------------------------------------------------------------- portable path
// The reference for the vector paths, bit for bit (std::fma: one rounding, as the vector FMAs).
template <int64_t FMT, int NR>
void group_portable(const uint8_t* g, int64_t nb, const XRow* x, float (*out)[GROUP]) {
  constexpr int64_t tile = GROUP * block_size(FMT);
  for (int lane = 0; lane < GROUP; ++lane) {
    float acc[NR] = {}, macc[NR] = {};
    for (int64_t b = 0; b < nb; ++b) {
      int32_t q[QK];
      float d[2], m[2];
      decode_block(FMT, g + b * tile, GROUP, lane, q, d, m);
      for (int r = 0; r < NR; ++r) {
        const int8_t* xq = x[r].q + b * QK;
        int32_t lo = 0, hi = 0;
        for (int j = 0; j < 16; ++j) lo += q[j] * xq[j];
        for (int j = 16; j < 32; ++j) hi += q[j] * xq[j];
        const float dx = x[r].d[b];
        if constexpr (FMT == I8S16) {
          acc[r] = std::fma(static_cast<float>(lo), d[0] * dx, acc[r]);
          acc[r] = std::fma(static_cast<float>(hi), d[1] * dx, acc[r]);
          macc[r] = std::fma(m[0], x[r].s[2 * b], macc[r]);
          macc[r] = std::fma(m[1], x[r].s[2 * b + 1], macc[r]);
        } else {
          acc[r] = std::fma(static_cast<float>(lo + hi), d[0] * dx, acc[r]);
          if constexpr (has_min(FMT)) macc[r] = std::fma(m[0], x[r].sb[b], macc[r]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) out[r][lane] = acc[r] + macc[r];
  }
}

// ---------------------------------------------------------------- AVX-512 VNNI: a group per register
#define VEC_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define VEC_TARGET_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

// Scale field f of a tile for 16 rows, as floats (fp16 in the file's types, f32 in the repacked ones).
template <int64_t FMT>
VEC_TARGET_VNNI inline __m512 field16(const uint8_t* tile, int f) {
  if constexpr (f32_scales(FMT)) return _mm512_loadu_ps(tile + f * 64);
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + f * 32)));
}

template <int64_t FMT, int NR>
VEC_TARGET_VNNI void group_vnni(const uint8_t* g, int64_t nb, const XRow* x, float (*out)[GROUP]) {
  constexpr int64_t tile_bytes = GROUP * block_size(FMT), codes_at = GROUP * header_size(FMT);
  constexpr int32_t offset = FMT == Q4_0 ? 8 : has_nibbles(FMT) ? 0 : 128;
  __m512 acc[NR], macc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = macc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* tile = g + b * tile_bytes;
    const uint8_t* codes = tile + codes_at;
    // two chains of integer sums per token, weights 0-15 and 16-31: half the dependent vpdpbusd latency
    __m512i lo[NR], hi[NR];
    for (int r = 0; r < NR; ++r) {
      lo[r] = _mm512_set1_epi32(-offset * x[r].qs[2 * b]);
      hi[r] = _mm512_set1_epi32(-offset * x[r].qs[2 * b + 1]);
    }
    if constexpr (has_nibbles(FMT)) {
      const __m512i mask = _mm512_set1_epi8(15);
      for (int p = 0; p < 4; ++p) {
        const __m512i v = _mm512_loadu_si512(codes + 64 * p);
        const __m512i low = _mm512_and_si512(v, mask), high = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
        for (int r = 0; r < NR; ++r) {
          const int8_t* xq = x[r].q + b * QK;
          lo[r] = _mm512_dpbusd_epi32(lo[r], low, _mm512_set1_epi32(load_i32(xq + 4 * p)));
          hi[r] = _mm512_dpbusd_epi32(hi[r], high, _mm512_set1_epi32(load_i32(xq + 16 + 4 * p)));
        }
      }
    } else {
      for (int c = 0; c < 8; ++c) {
        const __m512i v = _mm512_loadu_si512(codes + 64 * c);
        for (int r = 0; r < NR; ++r) {
          __m512i& sum = c < 4 ? lo[r] : hi[r];
          sum = _mm512_dpbusd_epi32(sum, v, _mm512_set1_epi32(load_i32(x[r].q + b * QK + 4 * c)));
        }
      }
    }
    if constexpr (FMT == I8S16) {
      const __m512 d0 = field16<FMT>(tile, 0), d1 = field16<FMT>(tile, 1);
      const __m512 m0 = field16<FMT>(tile, 2), m1 = field16<FMT>(tile, 3);
      for (int r = 0; r < NR; ++r) {
        const __m512 dx = _mm512_set1_ps(x[r].d[b]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo[r]), _mm512_mul_ps(d0, dx), acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[r]), _mm512_mul_ps(d1, dx), acc[r]);
        macc[r] = _mm512_fmadd_ps(m0, _mm512_set1_ps(x[r].s[2 * b]), macc[r]);
        macc[r] = _mm512_fmadd_ps(m1, _mm512_set1_ps(x[r].s[2 * b + 1]), macc[r]);
      }
    } else {
      const __m512 d = field16<FMT>(tile, 0), m = has_min(FMT) ? field16<FMT>(tile, 1) : d;
      for (int r = 0; r < NR; ++r) {
        const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(lo[r], hi[r]));
        acc[r] = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, _mm512_set1_ps(x[r].d[b])), acc[r]);
        if constexpr (has_min(FMT)) macc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(x[r].sb[b]), macc[r]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) _mm512_storeu_ps(out[r], _mm512_add_ps(acc[r], macc[r]));
}

// ---------------------------------------------------------------- AVX2: a group as two halves of 8 rows
template <int64_t FMT>
VEC_TARGET_AVX2 inline __m256 field8(const uint8_t* tile, int f, int half) {
  if constexpr (f32_scales(FMT)) return _mm256_loadu_ps(reinterpret_cast<const float*>(tile + f * 64 + half * 32));
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + f * 32 + half * 16)));
}

// u8 x s8 -> int32 per lane (four products each): vpmaddubsw + vpmaddwd. Its int16 middle step saturates
// above 32767, so int8 codes go in as |q| against x with q's sign (as llama.cpp does): no offset then.
VEC_TARGET_AVX2 inline __m256i udot8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

template <int64_t FMT, int NR>
VEC_TARGET_AVX2 void group_avx2(const uint8_t* g, int64_t nb, const XRow* x, float (*out)[GROUP]) {
  constexpr int64_t tile_bytes = GROUP * block_size(FMT), codes_at = GROUP * header_size(FMT);
  constexpr int32_t offset = FMT == Q4_0 ? 8 : 0;
  for (int half = 0; half < 2; ++half) {
    __m256 acc[NR], macc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = macc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* tile = g + b * tile_bytes;
      const uint8_t* codes = tile + codes_at + 32 * half;
      __m256i lo[NR], hi[NR];
      for (int r = 0; r < NR; ++r) {
        lo[r] = _mm256_set1_epi32(-offset * x[r].qs[2 * b]);
        hi[r] = _mm256_set1_epi32(-offset * x[r].qs[2 * b + 1]);
      }
      if constexpr (has_nibbles(FMT)) {
        const __m256i mask = _mm256_set1_epi8(15);
        for (int p = 0; p < 4; ++p) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 64 * p));
          const __m256i low = _mm256_and_si256(v, mask), high = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
          for (int r = 0; r < NR; ++r) {
            const int8_t* xq = x[r].q + b * QK;
            lo[r] = _mm256_add_epi32(lo[r], udot8(low, _mm256_set1_epi32(load_i32(xq + 4 * p))));
            hi[r] = _mm256_add_epi32(hi[r], udot8(high, _mm256_set1_epi32(load_i32(xq + 16 + 4 * p))));
          }
        }
      } else {
        for (int c = 0; c < 8; ++c) {
          const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 64 * c)),
                                             _mm256_set1_epi8(static_cast<char>(0x80)));  // signed codes
          const __m256i magnitude = _mm256_sign_epi8(v, v);
          for (int r = 0; r < NR; ++r) {
            const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(x[r].q + b * QK + 4 * c)), v);
            __m256i& sum = c < 4 ? lo[r] : hi[r];
            sum = _mm256_add_epi32(sum, udot8(magnitude, xs));
          }
        }
      }
      if constexpr (FMT == I8S16) {
        const __m256 d0 = field8<FMT>(tile, 0, half), d1 = field8<FMT>(tile, 1, half);
        const __m256 m0 = field8<FMT>(tile, 2, half), m1 = field8<FMT>(tile, 3, half);
        for (int r = 0; r < NR; ++r) {
          const __m256 dx = _mm256_set1_ps(x[r].d[b]);
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo[r]), _mm256_mul_ps(d0, dx), acc[r]);
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi[r]), _mm256_mul_ps(d1, dx), acc[r]);
          macc[r] = _mm256_fmadd_ps(m0, _mm256_set1_ps(x[r].s[2 * b]), macc[r]);
          macc[r] = _mm256_fmadd_ps(m1, _mm256_set1_ps(x[r].s[2 * b + 1]), macc[r]);
        }
      } else {
        const __m256 d = field8<FMT>(tile, 0, half), m = has_min(FMT) ? field8<FMT>(tile, 1, half) : d;
        for (int r = 0; r < NR; ++r) {
          const __m256 sum = _mm256_cvtepi32_ps(_mm256_add_epi32(lo[r], hi[r]));
          acc[r] = _mm256_fmadd_ps(sum, _mm256_mul_ps(d, _mm256_set1_ps(x[r].d[b])), acc[r]);
          if constexpr (has_min(FMT)) macc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[r].sb[b]), macc[r]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) _mm256_storeu_ps(out[r] + 8 * half, _mm256_add_ps(acc[r], macc[r]));
  }
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

using GroupFn = void (*)(const uint8_t*, int64_t, const XRow*, float (*)[GROUP]);

template <int64_t FMT, int NR>
GroupFn group_fn_for() {
  switch (current) {
    case Isa::Avx512Vnni: return &group_vnni<FMT, NR>;
    case Isa::Avx2: return &group_avx2<FMT, NR>;
    default: return &group_portable<FMT, NR>;
  }
}

template <int NR>
GroupFn group_fn(int64_t fmt) {
  switch (fmt) {
    case Q4_0: return group_fn_for<Q4_0, NR>();
    case Q4_1: return group_fn_for<Q4_1, NR>();
    case Q8_0: return group_fn_for<Q8_0, NR>();
    case Q4F: return group_fn_for<Q4F, NR>();
    default: return group_fn_for<I8S16, NR>();  // formats were checked by check_weight
  }
}

// ---------------------------------------------------------------- activations
// A block of 32 activations quantized: codes q = round-to-even(x 127 / max|x|), its scale dx = max|x| / 127
// and the codes' sums per half. Every path computes the same products and roundings, so the same codes.
// A block holding a NaN or an infinity gets scale NaN and zero codes, so its token's outputs are NaN on every
// path (the engine then fails that sequence alone) rather than path-dependent garbage.
struct QBlock {
  float d;
  int32_t lo, hi;
};

constexpr QBlock kNonFinite = {std::numeric_limits<float>::quiet_NaN(), 0, 0};

inline float inverse_scale(float amax) {
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  return inv <= std::numeric_limits<float>::max() ? inv : 0.f;  // a subnormal max: codes 0, not inf x 0
}

QBlock quantize_block_portable(const float* src, int8_t* q) {
  float amax = 0.f;
  bool finite = true;
  for (int j = 0; j < QK; ++j) {
    amax = std::max(amax, std::fabs(src[j]));
    finite &= std::fabs(src[j]) <= std::numeric_limits<float>::max();
  }
  if (!finite) {
    std::memset(q, 0, QK);
    return kNonFinite;
  }
  const float inv = inverse_scale(amax);
  int32_t lo = 0, hi = 0;
  for (int j = 0; j < QK; ++j) {
    const int v = static_cast<int>(std::nearbyint(src[j] * inv));
    q[j] = static_cast<int8_t>(v);
    (j < 16 ? lo : hi) += v;
  }
  return {amax / 127.f, lo, hi};
}

// (the scalar loop above calls libm's nearbyintf per value, too slow for every token of every layer)
VEC_TARGET_AVX2 inline int32_t hsum(__m256i a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

VEC_TARGET_AVX2 QBlock quantize_block_avx2(const float* src, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.f), largest = _mm256_set1_ps(std::numeric_limits<float>::max());
  __m256 v[4], m = _mm256_setzero_ps();
  int finite = 0xff;
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(src + 8 * i);
    const __m256 magnitude = _mm256_andnot_ps(sign, v[i]);
    m = _mm256_max_ps(m, magnitude);
    finite &= _mm256_movemask_ps(_mm256_cmp_ps(magnitude, largest, _CMP_LE_OQ));  // false for NaN
  }
  if (finite != 0xff) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_setzero_si256());
    return kNonFinite;
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  const __m256 inv = _mm256_set1_ps(inverse_scale(amax));
  __m256i c[4];
  for (int i = 0; i < 4; ++i) c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // round to even, as nearbyint
  // int32 -> int8 (in range, so no saturation); the packs interleave 128-bit lanes, the permute restores order
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return {amax / 127.f, hsum(_mm256_add_epi32(c[0], c[1])), hsum(_mm256_add_epi32(c[2], c[3]))};
}

VEC_TARGET_VNNI QBlock quantize_block_vnni(const float* src, int8_t* q) {
  const __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16);
  const __m512 abs_a = _mm512_abs_ps(a), abs_b = _mm512_abs_ps(b);
  const __m512 largest = _mm512_set1_ps(std::numeric_limits<float>::max());
  if ((_mm512_cmp_ps_mask(abs_a, largest, _CMP_LE_OQ) & _mm512_cmp_ps_mask(abs_b, largest, _CMP_LE_OQ)) != 0xffff) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_setzero_si256());
    return kNonFinite;
  }
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(abs_a, abs_b));
  const __m512 inv = _mm512_set1_ps(inverse_scale(amax));
  const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qb));
  return {amax / 127.f, _mm512_reduce_add_epi32(qa), _mm512_reduce_add_epi32(qb)};
}

// Per token and block: codes q, scale d, code sums qs and dx x sums s per half, sb per block.
void quantize_rows(const float* x, int64_t rows, int64_t k, int8_t* q, float* d, int32_t* qs, float* s, float* sb) {
  const int64_t nb = k / QK;
  QBlock (*quantize)(const float*, int8_t*) = current == Isa::Avx512Vnni ? &quantize_block_vnni
                                              : current == Isa::Avx2     ? &quantize_block_avx2
                                                                         : &quantize_block_portable;
  at::parallel_for(0, rows * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // rows are contiguous, so block i of the flat array
      const QBlock blk = quantize(x + i * QK, q + i * QK);
      d[i] = blk.d;
      qs[2 * i] = blk.lo;
      qs[2 * i + 1] = blk.hi;
      s[2 * i] = blk.d * blk.lo;
      s[2 * i + 1] = blk.d * blk.hi;
      sb[i] = blk.d * (blk.lo + blk.hi);
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
  TORCH_CHECK(in_features > 0 && in_features % QK == 0, "ggml_linear: in_features ", in_features,
              " is not a positive multiple of 32");
  TORCH_CHECK(weight.size(1) == in_features / QK * block_bytes(fmt), "ggml_linear: a row of ", in_features,
              " weights in format ", fmt, " has ", in_features / QK * block_bytes(fmt), " bytes, the tensor has ",
              weight.size(1));
}

// Row o of an interleaved weight: its group's first byte, the group's width and the row's lane.
struct RowRef {
  const uint8_t* group;
  int64_t width, lane;
};

RowRef row_ref(const at::Tensor& weight, int64_t o) {
  const int64_t first = o / GROUP * GROUP;
  return {weight.data_ptr<uint8_t>() + first * weight.size(1), std::min(GROUP, weight.size(0) - first), o - first};
}

// One row dequantized to float32 values (written through `put(j, value)`).
template <typename Put>
void dequantize_row(int64_t fmt, const RowRef& row, int64_t nb, Put put) {
  const int64_t tile = row.width * block_bytes(fmt);
  for (int64_t b = 0; b < nb; ++b) {
    int32_t q[QK];
    float d[2], m[2];
    decode_block(fmt, row.group + b * tile, row.width, row.lane, q, d, m);
    for (int j = 0; j < QK; ++j) put(b * QK + j, d[j / 16] * q[j] + m[j / 16]);
  }
}

// The last group when it has fewer than 16 rows, widened to 16 (zero codes and scales in the rows it lacks),
// so that every path runs whole groups.
std::vector<uint8_t> widen_group(int64_t fmt, const uint8_t* group, int64_t width, int64_t nb) {
  const int64_t bb = block_bytes(fmt), head = header_size(fmt), field = f32_scales(fmt) ? 4 : 2;
  std::vector<uint8_t> out(GROUP * bb * nb, 0);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* src = group + b * width * bb;
    uint8_t* dst = out.data() + b * GROUP * bb;
    for (int64_t f = 0; f < head / field; ++f) std::memcpy(dst + f * GROUP * field, src + f * width * field, width * field);
    const int64_t vectors = has_nibbles(fmt) ? 4 : 8;
    for (int64_t c = 0; c < vectors; ++c)
      std::memcpy(dst + GROUP * head + c * GROUP * 4, src + width * head + c * width * 4, width * 4);
  }
  return out;
}

constexpr int64_t GEMM_MIN_ROWS = 64;  // below it the per-call dequantization costs more than it saves

bool bf16_gemm_supported() {
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
}

// The whole weight as bf16 [N, K], for one GEMM call.
at::Tensor dequantize_bf16(const at::Tensor& weight, int64_t fmt, int64_t in_features) {
  const int64_t n = weight.size(0), nb = in_features / QK;
  at::Tensor out = at::empty({n, in_features}, weight.options().dtype(at::kBFloat16));
  c10::BFloat16* dst = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      c10::BFloat16* row = dst + o * in_features;
      dequantize_row(fmt, row_ref(weight, o), nb, [&](int64_t j, float v) { row[j] = c10::BFloat16(v); });
    }
  });
  return out;
}

// x [..., K] float32 -> [..., N]; with swiglu, N = 2H outputs become silu(y[:H]) * y[H:] ([..., H]).
// gemm_from: rows from here on may run as a bf16 GEMM (see the top of this file); -1: none.
// residual [..., N]: returned as residual + x W^T (+ bias), the decoder layer's skip connections fused.
// norm: x is first RMS-normalized with these K weights and eps (see ggml_linear_normed).
struct Norm {
  const at::Tensor& weight;  // [K] float32, contiguous
  float eps;
};

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& weight, int64_t fmt, int64_t in_features,
                  const std::optional<at::Tensor>& bias, bool swiglu, int64_t gemm_from,
                  const std::optional<at::Tensor>& residual, const Norm* norm) {
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
    return linear(minillm::rms_norm(x, norm->weight, norm->eps), weight, fmt, in_features, bias, swiglu, gemm_from,
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
  // the quantized activations in a buffer kept per calling thread: no tensor allocations per call
  thread_local std::vector<uint8_t> scratch;  // (operator new's alignment suits the int32 and float parts)
  scratch.resize(std::max<size_t>(scratch.size(), rows * (in_features + nb * 24)));
  int32_t* xqs = reinterpret_cast<int32_t*>(scratch.data());
  float* xd = reinterpret_cast<float*>(xqs + rows * nb * 2);
  int8_t* xq = reinterpret_cast<int8_t*>(xd + rows * nb * 4);
  float* xs = xd + rows * nb;
  float* xsb = xs + rows * nb * 2;
  quantize_rows(src, rows, in_features, xq, xd, xqs, xs, xsb);

  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty(shape, x.options());
  float* out = y.data_ptr<float>();
  const uint8_t* wbase = weight.data_ptr<uint8_t>();
  const int64_t groups = (n + GROUP - 1) / GROUP, tail = n % GROUP;
  const std::vector<uint8_t> widened = tail ? widen_group(fmt, wbase + (n - tail) * row_bytes, tail, nb)
                                            : std::vector<uint8_t>();
  const GroupFn kernels[NT] = {group_fn<1>(fmt), group_fn<2>(fmt), group_fn<3>(fmt), group_fn<4>(fmt)};
  // ~16 KB of weights per chunk: they stay in L1 while every token passes over them
  const int64_t chunk = std::max<int64_t>(1, 16384 / (GROUP * row_bytes));
  at::parallel_for(0, groups, chunk, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = begin; c0 < end; c0 += chunk) {
      const int64_t c1 = std::min(end, c0 + chunk);
      for (int64_t r0 = 0; r0 < rows; r0 += NT) {
        const int nr = static_cast<int>(std::min<int64_t>(NT, rows - r0));
        XRow xr[NT];
        for (int i = 0; i < nr; ++i) {
          const int64_t t = r0 + i;
          xr[i] = {xq + t * in_features, xd + t * nb, xqs + t * nb * 2, xs + t * nb * 2, xsb + t * nb};
        }
        for (int64_t g = c0; g < c1; ++g) {
          const int64_t o = g * GROUP, width = std::min(GROUP, n - o);
          float res[NT][GROUP];
          kernels[nr - 1](width < GROUP ? widened.data() : wbase + o * row_bytes, nb, xr, res);
          for (int i = 0; i < nr; ++i)
            for (int64_t l = 0; l < width; ++l) {
              const int64_t at = (r0 + i) * n + o + l;
              const float v = res[i][l] + (b ? b[o + l] : 0.f);
              out[at] = skip ? skip[at] + v : v;
            }
        }
      }
    }
  });
  if (gemm) {
    const int64_t count = all_rows - rows;
    at::Tensor tail_rows = at::mm(x.view({all_rows, in_features}).narrow(0, rows, count).to(at::kBFloat16),
                                  dequantize_bf16(weight, fmt, in_features).t());
    at::Tensor target = y.view({all_rows, n}).narrow(0, rows, count);
    target.copy_(tail_rows);
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

// Rows `ids` of a quantized table dequantized to float32 (token embeddings that the file stores quantized).
at::Tensor ggml_dequantize_rows(const at::Tensor& weight, int64_t fmt, int64_t in_features, const at::Tensor& ids_in) {
  check_weight(weight, fmt, in_features);
  const at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t count = ids.numel(), nb = in_features / QK, rows = weight.size(0);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < rows, "ggml_dequantize_rows: row ", id[i], " outside [0, ", rows, ")");
  at::Tensor y = at::empty({count, in_features}, weight.options().dtype(at::kFloat));
  float* out = y.data_ptr<float>();
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* dst = out + i * in_features;
      dequantize_row(fmt, row_ref(weight, id[i]), nb, [&](int64_t j, float v) { dst[j] = v; });
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

namespace minillm {

at::Tensor ggml_linear(const at::Tensor& x, const at::Tensor& weight, int64_t fmt, int64_t in_features,
                       const std::optional<at::Tensor>& bias, bool swiglu, int64_t gemm_from,
                       const std::optional<at::Tensor>& residual) {
  return linear(x, weight, fmt, in_features, bias, swiglu, gemm_from, residual, nullptr);
}

at::Tensor ggml_linear_normed(const at::Tensor& x, const at::Tensor& norm_weight, double eps, const at::Tensor& weight,
                              int64_t fmt, const std::optional<at::Tensor>& bias, bool swiglu, int64_t gemm_from) {
  TORCH_CHECK(norm_weight.scalar_type() == at::kFloat && norm_weight.is_contiguous() &&
                  norm_weight.numel() == x.size(-1), "ggml_linear_normed: the norm needs ", x.size(-1),
              " contiguous float32 weights");
  const Norm norm{norm_weight, static_cast<float>(eps)};
  return linear(x, weight, fmt, x.size(-1), bias, swiglu, gemm_from, std::nullopt, &norm);
}

}  // namespace minillm

TORCH_LIBRARY_FRAGMENT(minillm, m) {
  m.def("ggml_linear(Tensor x, Tensor weight, int fmt, int in_features, Tensor? bias, bool swiglu, int gemm_from=-1, "
        "Tensor? residual=None) -> Tensor");
  m.def("ggml_dequantize_rows(Tensor weight, int fmt, int in_features, Tensor ids) -> Tensor");
  m.def("ggml_isa() -> str", &ggml_isa);
  m.def("ggml_best_isa() -> str", &ggml_best_isa);
  m.def("ggml_set_isa(str name) -> ()", &ggml_set_isa);
}

TORCH_LIBRARY_IMPL(minillm, CPU, m) {
  m.impl("ggml_linear", &minillm::ggml_linear);
  m.impl("ggml_dequantize_rows", &ggml_dequantize_rows);
}
