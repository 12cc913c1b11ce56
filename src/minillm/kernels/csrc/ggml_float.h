// F16 and BF16 weights (whole files, or tensors a quantized file keeps in 16 bits): computed on their own
// 16 bits against the float32 activations, as llama.cpp's F16 matmul reads its weights. Their rows stay as
// the file stores them (no interleaving), a group's rows one after another.
//
// One order of float operations on every path, so the same bits (and a row's result the same in any batch):
// a row's K products go into 4 chains of 8 lanes, chain c lane j taking k = 32i + 8c + j, each product added
// by an fma; then (c0 + c1) + (c2 + c3) lane by lane, and the 8 lanes summed as a tree: lanes j and j + 4,
// then j and j + 2, then the last two. K is a multiple of 32 (layout(F16).weights).

#pragma once

#include "ggml_dot.h"

namespace ggml {

constexpr int CHAINS = 4, LANES = 8;

inline float bf16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
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
      for (int j = 0; j < LANES; ++j) s[j] = (chain[0][j] + chain[1][j]) + (chain[2][j] + chain[3][j]);
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

// A row against N (1 or 2) tokens: their 8 chains and the row's 4 vectors fill the 16 registers.
template <int64_t FMT, int N>
VEC_TARGET_AVX2 inline void float_row_avx2(const uint8_t* wr, int64_t k, const float* const* x, float (*out)[GROUP],
                                           int64_t row) {
  __m256 chain[N][CHAINS];
  for (int r = 0; r < N; ++r)
    for (int c = 0; c < CHAINS; ++c) chain[r][c] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; i += CHAINS * LANES) {
    __m256 v[CHAINS];
    for (int c = 0; c < CHAINS; ++c) v[c] = float8<FMT>(wr + 2 * (i + LANES * c));
    for (int r = 0; r < N; ++r)
      for (int c = 0; c < CHAINS; ++c)
        chain[r][c] = _mm256_fmadd_ps(v[c], _mm256_loadu_ps(x[r] + i + LANES * c), chain[r][c]);
  }
  for (int r = 0; r < N; ++r)
    out[r][row] = tree_sum8(_mm256_add_ps(_mm256_add_ps(chain[r][0], chain[r][1]), _mm256_add_ps(chain[r][2], chain[r][3])));
}

// More than two tokens pass over the row again, two at a time (from L1).
template <int64_t FMT, int NR>
VEC_TARGET_AVX2 void float_rows_avx2(const uint8_t* w, int64_t row_bytes, int64_t width, int64_t k, const float* const* x,
                                     float (*out)[GROUP]) {
  for (int64_t row = 0; row < width; ++row) {
    const uint8_t* wr = w + row * row_bytes;
    for (int r0 = 0; r0 + 1 < NR; r0 += 2) float_row_avx2<FMT, 2>(wr, k, x + r0, out + r0, row);
    if constexpr (NR % 2) float_row_avx2<FMT, 1>(wr, k, x + NR - 1, out + NR - 1, row);
  }
}

}  // namespace ggml
