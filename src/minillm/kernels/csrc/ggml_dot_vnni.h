// The AVX-512 VNNI path of the file's 32-weight types Q4_0, Q4_1 and Q8_0, included by ggml_matmul.cpp (the
// other types, and these on AVX2 CPUs, take ggml_dot_avx2.h). Their tiles (ggml_formats.h): fp16 d (and m) for
// the group's rows, then the codes as vectors of four consecutive bytes of every row. Nibble codes: byte i of
// row r in vector p (0-3) holds weight 4p + i in its low half and 16 + 4p + i in its high half (the file's
// pairing); Q8_0's are stored plus 128, as vpdpbusd wants its first operand unsigned.

#pragma once

#include "ggml_dot.h"

namespace ggml {

constexpr bool has_nibbles(int64_t fmt) { return fmt == Q4_0 || fmt == Q4_1; }
constexpr int64_t header_size(int64_t fmt) { return fmt == Q4_1 ? 4 : 2; }  // bytes of fp16 scale fields
constexpr int64_t block_size(int64_t fmt) { return layout(fmt).bytes; }

// ---------------------------------------------------------------- AVX-512 VNNI: a group per register
// Scale field f (fp16) of a tile for 16 rows, as floats.
VEC_TARGET_VNNI inline __m512 field16(const uint8_t* tile, int f) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + f * 32)));
}

template <int64_t FMT, int NR>
VEC_TARGET_VNNI void group_vnni(const uint8_t* g, int64_t nb, const XRow* x, float (*out)[GROUP], const uint8_t* ahead) {
  constexpr int64_t tile_bytes = GROUP * block_size(FMT), codes_at = GROUP * header_size(FMT);
  constexpr int32_t offset = FMT == Q4_0 ? 8 : has_nibbles(FMT) ? 0 : 128;
  __m512 acc[NR], macc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = macc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* tile = g + b * tile_bytes;
    if (ahead) {  // both halves' shares: this path reads a group once
      prefetch_share<tile_bytes>(ahead, 2 * b);
      prefetch_share<tile_bytes>(ahead, 2 * b + 1);
    }
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
    const __m512 d = field16(tile, 0), m = has_min(FMT) ? field16(tile, 1) : d;
    for (int r = 0; r < NR; ++r) {
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(lo[r], hi[r]));
      acc[r] = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, _mm512_set1_ps(x[r].d[b])), acc[r]);
      if constexpr (has_min(FMT)) macc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(x[r].sb[b]), macc[r]);
    }
  }
  for (int r = 0; r < NR; ++r) _mm512_storeu_ps(out[r], _mm512_add_ps(acc[r], macc[r]));
}

}  // namespace ggml
