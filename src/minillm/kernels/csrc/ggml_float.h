// F16 and BF16 weights (whole files, or tensors a quantized file keeps in 16 bits): computed on their own
// 16 bits against the float32 activations, as llama.cpp's F16 matmul reads its weights. Their rows stay as
// the file stores them (no interleaving), a group's rows one after another.
//
// One order of float operations on every path, so the same bits (and a row's result the same in any batch):
// a row's K products go into 2 chains of 8 lanes, chain c lane j taking k = 16i + 8c + j, each product added
// by an fma; then c0 + c1 lane by lane, and the 8 lanes summed as a tree: lanes j and j + 4, then j and
// j + 2, then the last two. K is a multiple of 32 (layout(F16).weights). The AVX2 path computes a tile of
// up to 2 rows x 3 tokens at once (12 chains in registers): a weight vector, converted once, serves every
// token of the tile, and each fma reads its activations from L1.

#pragma once

#include <c10/util/BFloat16.h>

#include "ggml_dot.h"

namespace ggml {

constexpr int CHAINS = 2, LANES = 8;

inline float bf16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::f32_from_bits(h);
}

// value j of a row of a 16-bit float type
inline float float_value(int64_t fmt, const uint8_t* row, int64_t j) {
  return fmt == F16 ? fp16(row + 2 * j) : bf16(row + 2 * j);
}

inline float tree_sum(const float* s) {  // the 8 lanes, in the order of the vector path's reduction
  const float a0 = s[0] + s[4], a1 = s[1] + s[5], a2 = s[2] + s[6], a3 = s[3] + s[7];
  return (a0 + a2) + (a1 + a3);
}

// rows [0, width) of a group (row_bytes apart) against NR tokens x[r] of k values: out[r][row]
template <int64_t FMT, int NR>
void float_rows_portable(const uint8_t* w, int64_t row_bytes, int64_t width, int64_t k, const float* const* x,
                         float (*out)[GROUP]) {
  for (int64_t row = 0; row < width; ++row) {
    const uint8_t* wr = w + row * row_bytes;
    for (int r = 0; r < NR; ++r) {
      float chain[CHAINS][LANES] = {};
      for (int64_t i = 0; i < k; i += CHAINS * LANES)
        for (int c = 0; c < CHAINS; ++c)
          for (int j = 0; j < LANES; ++j) {
            const int64_t at = i + LANES * c + j;
            chain[c][j] = std::fma(float_value(FMT, wr, at), x[r][at], chain[c][j]);
          }
      float s[LANES];
      for (int j = 0; j < LANES; ++j) s[j] = chain[0][j] + chain[1][j];
      out[r][row] = tree_sum(s);
    }
  }
}

template <int64_t FMT>
VEC_TARGET_AVX2 inline __m256 float8(const uint8_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (FMT == F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

VEC_TARGET_AVX2 inline float tree_sum8(__m256 s) {
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));  // lanes j + (j + 4)
  const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));                                 // then j + (j + 2)
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}

// R rows (1 or 2, `apart` rows from each other) against T tokens (1 to 3): out[t][row + i apart]
template <int64_t FMT, int R, int T>
VEC_TARGET_AVX2 inline void float_tile_avx2(const uint8_t* w, int64_t row_bytes, int64_t k, const float* const* x,
                                            float (*out)[GROUP], int64_t row, int64_t apart) {
  __m256 chain[R][T][CHAINS];
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < CHAINS; ++c) chain[i][t][c] = _mm256_setzero_ps();
  for (int64_t at = 0; at < k; at += CHAINS * LANES) {
    __m256 v[R][CHAINS];
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < CHAINS; ++c) v[i][c] = float8<FMT>(w + i * apart * row_bytes + 2 * (at + LANES * c));
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < CHAINS; ++c) {
        const __m256 xv = _mm256_loadu_ps(x[t] + at + LANES * c);
        for (int i = 0; i < R; ++i) chain[i][t][c] = _mm256_fmadd_ps(v[i][c], xv, chain[i][t][c]);
      }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < T; ++t) out[t][row + i * apart] = tree_sum8(_mm256_add_ps(chain[i][t][0], chain[i][t][1]));
}

// Tokens in tiles of 3 or 2 (4 = 2 + 2)
template <int64_t FMT, int R, int NR>
VEC_TARGET_AVX2 inline void float_rows_tiles(const uint8_t* w, int64_t row_bytes, int64_t k, const float* const* x,
                                             float (*out)[GROUP], int64_t row, int64_t apart) {
  if constexpr (NR == 4) {
    float_tile_avx2<FMT, R, 2>(w, row_bytes, k, x, out, row, apart);
    float_tile_avx2<FMT, R, 2>(w, row_bytes, k, x + 2, out + 2, row, apart);
  } else {
    float_tile_avx2<FMT, R, NR>(w, row_bytes, k, x, out, row, apart);
  }
}

// Rows in pairs half a group apart, i and i + width / 2: two sequential streams through the group's memory (rows
// next to each other, on short rows, slowed a 576-wide layer by a third).
template <int64_t FMT, int NR>
VEC_TARGET_AVX2 void float_rows_avx2(const uint8_t* w, int64_t row_bytes, int64_t width, int64_t k, const float* const* x,
                                     float (*out)[GROUP]) {
  const int64_t apart = width / 2;
  for (int64_t row = 0; row < apart; ++row)
    float_rows_tiles<FMT, 2, NR>(w + row * row_bytes, row_bytes, k, x, out, row, apart);
  if (width % 2) float_rows_tiles<FMT, 1, NR>(w + (width - 1) * row_bytes, row_bytes, k, x, out, width - 1, 0);
}

}  // namespace ggml
