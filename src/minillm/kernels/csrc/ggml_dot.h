// What every dot-product path of ggml_matmul.cpp shares: the quantized activations of a token, the vector
// targets, and the portable path, which the vector paths match bit for bit (see the top of ggml_matmul.cpp).

#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "ggml_formats.h"

namespace ggml {

constexpr int64_t QK = 32;  // activations are quantized in blocks of 32

// Activations of one token: blocks of 32 int8 codes, their scale dx, the codes' sum per half block, and
// dx x that sum per half and per block.
struct XRow {
  const int8_t* q;    // [K]
  const float* d;     // [K / 32]
  const int32_t* qs;  // [K / 32 * 2]
  const float* s;     // [K / 32 * 2]
  const float* sb;    // [K / 32]
};

#define VEC_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define VEC_TARGET_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

inline int32_t load_i32(const void* p) { int32_t v; std::memcpy(&v, p, 4); return v; }

// u8 x s8 -> int32 per lane (four products each): vpmaddubsw + vpmaddwd. Its int16 middle step saturates
// above 32767: unsigned codes up to 63 are safe; signed ones go in as |q| against x with q's sign.
VEC_TARGET_AVX2 inline __m256i udot8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
VEC_TARGET_AVX2 inline __m256i sdot8(__m256i v, __m256i s) { return udot8(_mm256_sign_epi8(v, v), _mm256_sign_epi8(s, v)); }

// A group's 16 rows, block after block, in plain C++: the reference for the vector paths.
template <int64_t FMT, int NR>
void group_portable(const uint8_t* g, int64_t nb, const XRow* x, float (*out)[GROUP]) {
  constexpr Layout L = layout(FMT);
  for (int lane = 0; lane < GROUP; ++lane) {
    float acc[NR] = {}, macc[NR] = {};
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t block[L.bytes];
      int32_t q[L.weights];
      float d[L.weights / 16], m[L.weights / 16];
      gather_block(FMT, g + b * GROUP * L.bytes, GROUP, lane, block);
      decode_block(FMT, block, q, d, m);
      for (int s = 0; s < L.weights / QK; ++s) {
        const int64_t ab = b * (L.weights / QK) + s;  // the activations' block
        for (int r = 0; r < NR; ++r) {
          const int8_t* xq = x[r].q + ab * QK;
          int32_t lo = 0, hi = 0;
          for (int j = 0; j < 16; ++j) lo += q[QK * s + j] * xq[j];
          for (int j = 16; j < 32; ++j) hi += q[QK * s + j] * xq[j];
          const float dx = x[r].d[ab];
          if constexpr (per16(FMT)) {
            acc[r] = std::fma(static_cast<float>(lo), d[2 * s] * dx, acc[r]);
            acc[r] = std::fma(static_cast<float>(hi), d[2 * s + 1] * dx, acc[r]);
            if constexpr (has_min(FMT)) {
              macc[r] = std::fma(m[2 * s], x[r].s[2 * ab], macc[r]);
              macc[r] = std::fma(m[2 * s + 1], x[r].s[2 * ab + 1], macc[r]);
            }
          } else {
            acc[r] = std::fma(static_cast<float>(lo + hi), d[2 * s] * dx, acc[r]);
            if constexpr (has_min(FMT)) macc[r] = std::fma(m[2 * s], x[r].sb[ab], macc[r]);
          }
        }
      }
    }
    for (int r = 0; r < NR; ++r) out[r][lane] = acc[r] + macc[r];
  }
}

}  // namespace ggml
