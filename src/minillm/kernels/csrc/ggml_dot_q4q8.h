// The vector paths of the file's 32-weight types Q4_0, Q4_1 and Q8_0 (AVX-512 VNNI and AVX2), included by
// ggml_matmul.cpp. Their tiles (ggml_formats.h): fp16 d (and m) for the group's rows, then the codes as
// vectors of four consecutive bytes of every row. Nibble codes: byte i of row r in vector p (0-3) holds
// weight 4p + i in its low half and 16 + 4p + i in its high half (the file's pairing); Q8_0's are stored
// plus 128, as vpdpbusd wants its first operand unsigned.

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

// ---------------------------------------------------------------- AVX2: a group as two halves of 8 rows
VEC_TARGET_AVX2 inline __m256 field8(const uint8_t* tile, int f, int half) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + f * 32 + half * 16)));
}

template <int64_t FMT, int NR>
VEC_TARGET_AVX2 void group_avx2(const uint8_t* g, int64_t nb, const XRow* x, float (*out)[GROUP], const uint8_t* ahead) {
  constexpr int64_t tile_bytes = GROUP * block_size(FMT), codes_at = GROUP * header_size(FMT);
  constexpr int32_t offset = FMT == Q4_0 ? 8 : 0;
  for (int half = 0; half < 2; ++half) {
    __m256 acc[NR], macc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = macc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* tile = g + b * tile_bytes;
      if (ahead) prefetch_share<tile_bytes>(ahead, half * nb + b);
      const uint8_t* codes = tile + codes_at + 32 * half;
      __m256i lo[NR], hi[NR];
      for (int r = 0; r < NR; ++r) {  // Q4_0's offset against the block's sum of codes: one broadcast
        lo[r] = offset ? _mm256_set1_epi32(-offset * x[r].qb[b]) : _mm256_setzero_si256();
        hi[r] = _mm256_setzero_si256();
      }
      if constexpr (has_nibbles(FMT)) {
        // the block's 8 vectors of vpmaddubsw pairs summed in int16 (8 x 2 x 15 x 127 = 30480: no saturation,
        // the same integers), then one vpmaddwd: on Zen 2 both take the one port, so a token's tile costs 9
        // of its instructions, not 16
        const __m256i mask = _mm256_set1_epi8(15);
        __m256i sum16[NR];
        for (int r = 0; r < NR; ++r) sum16[r] = _mm256_setzero_si256();
        for (int p = 0; p < 4; ++p) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 64 * p));
          const __m256i low = _mm256_and_si256(v, mask), high = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
          for (int r = 0; r < NR; ++r) {
            const int8_t* xq = x[r].q + b * QK;
            sum16[r] = _mm256_add_epi16(sum16[r], pairs16(low, _mm256_set1_epi32(load_i32(xq + 4 * p))));
            sum16[r] = _mm256_add_epi16(sum16[r], pairs16(high, _mm256_set1_epi32(load_i32(xq + 16 + 4 * p))));
          }
        }
        for (int r = 0; r < NR; ++r) lo[r] = _mm256_add_epi32(lo[r], widen16(sum16[r]));
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
      const __m256 d = field8(tile, 0, half), m = has_min(FMT) ? field8(tile, 1, half) : d;
      for (int r = 0; r < NR; ++r) {
        const __m256 sum = _mm256_cvtepi32_ps(_mm256_add_epi32(lo[r], hi[r]));
        acc[r] = _mm256_fmadd_ps(sum, _mm256_mul_ps(d, _mm256_set1_ps(x[r].d[b])), acc[r]);
        if constexpr (has_min(FMT)) macc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[r].sb[b]), macc[r]);
      }
    }
    for (int r = 0; r < NR; ++r) _mm256_storeu_ps(out[r] + 8 * half, _mm256_add_ps(acc[r], macc[r]));
  }
}


}  // namespace ggml
