// What every dot-product path of ggml_matmul.cpp shares: the quantized activations of a token, the vector
// targets, and the portable path, which the vector paths match bit for bit (see the top of ggml_matmul.cpp).

#pragma once

#include <immintrin.h>
#ifdef MINILLM_SIMDE_AVX512
#include "simde_avx512.h"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#include "ggml_formats.h"

namespace ggml {

constexpr int64_t QK = 32;  // activations are quantized in blocks of 32 codes ...
constexpr int64_t QK_SUPER = 256;  // ... with one scale per 32, or per 256 in front of super-block types

// Activations of one token: int8 codes, their scale dx per block of 32 (the same for the 8 blocks of a
// super-block), the codes' sums per 16 and per 32 (int16: at most 32 x 127), and dx x the sum per 32.
struct XRow {
  const int8_t* q;     // [K]
  const float* d;      // [K / 32]
  const int16_t* qs;   // [K / 16]
  const int16_t* qb;   // [K / 32]
  const float* sb;     // [K / 32]
};

#define VEC_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#ifdef MINILLM_SIMDE_AVX512
#define VEC_TARGET_VNNI VEC_TARGET_AVX2
#else
#define VEC_TARGET_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#endif

inline int32_t load_i32(const void* p) { int32_t v; std::memcpy(&v, p, 4); return v; }

// Prefetch of the group the thread computes next (`ahead`, from the caller; null: none), a share at each
// (half, block) step of the current one (step 0 .. 2 nb - 1), as a group of TILE-byte tiles is read: a decode
// step streams every weight once, and the hardware prefetcher alone left the cores waiting on memory (Zen 2,
// 2 cores: b1 decode +8-14 %, b4 +14-21 % on Q4_K_M files of 0.5B-3B).
template <int64_t TILE>
VEC_TARGET_AVX2 inline void prefetch_share(const uint8_t* next, int64_t step) {
  constexpr int64_t lines = (TILE + 127) / 128;  // half a tile's cache lines
  for (int64_t i = 0; i < lines; ++i)
    _mm_prefetch(reinterpret_cast<const char*>(next + (step * lines + i) * 64), _MM_HINT_T0);
}

// The prefetch of the next group from inside a kernel: its share at `step` cut into PARTS, issued at points
// spread over the step (part 0 .. PARTS - 1). The whole-tile kernels (blocks of 32, Q4_K, Q5_K, Q6_K: one
// step a block, 0 .. nb - 1) do so, passing twice the tile's bytes as TILE: a share of ~27 lines at once held
// Q6_K's 1-token stream on 2 Zen 2 cores to ~17 GB/s, parts of ~4 lines reach ~22 (Q5_K +10 % with 4 parts).
struct Ahead {
  const uint8_t* next;  // null: none
  int64_t step;
  template <int64_t TILE, int PARTS>
  VEC_TARGET_AVX2 void share(int part) const {
    if (next) prefetch_share<TILE / PARTS>(next, PARTS * step + part);
  }
};

// vpmaddubsw's int16 pairs summed over several code vectors before one vpmaddwd: callers keep the sum of
// |code| x 127 x 2 over the vectors summed below 32768 (so never saturating: the same integers as int32 sums)
VEC_TARGET_AVX2 inline __m256i pairs16(__m256i u, __m256i s) { return _mm256_maddubs_epi16(u, s); }
VEC_TARGET_AVX2 inline __m256i widen16(__m256i sum16) { return _mm256_madd_epi16(sum16, _mm256_set1_epi16(1)); }
// u8 x s8 -> int32 per lane (four products each): vpmaddubsw + vpmaddwd. Its int16 middle step saturates
// above 32767: unsigned codes up to 63 are safe; signed ones go in as |q| against x with q's sign.
VEC_TARGET_AVX2 inline __m256i udot8(__m256i u, __m256i s) { return widen16(pairs16(u, s)); }
VEC_TARGET_AVX2 inline __m256i sdot8(__m256i v, __m256i s) { return udot8(_mm256_sign_epi8(v, v), _mm256_sign_epi8(s, v)); }

// A group's 16 rows, block after block, in plain C++: the reference for the vector paths (the sums of
// ggml_formats.h, "How a type's dot product is summed").
template <int64_t FMT, int NR>
void group_portable(const uint8_t* g, int64_t nb, const XRow* x, float (*out)[GROUP], const uint8_t* /*ahead*/) {
  constexpr Layout L = layout(FMT);
  for (int lane = 0; lane < GROUP; ++lane) {
    float acc[NR] = {}, macc[NR] = {};
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t block[L.bytes];
      int32_t q[L.weights];
      gather_block(FMT, g + b * GROUP * L.bytes, GROUP, lane, block);
      const int64_t ab0 = b * (L.weights / QK);  // the activations' first block
      if constexpr (superblock(FMT)) {
        KScales s;
        decode_kblock(FMT, block, q, s);
        for (int r = 0; r < NR; ++r) {
          int32_t isum = 0, msum = 0;
          for (int k = 0; k < 16; ++k) {
            int32_t dot = 0;
            for (int j = 0; j < 16; ++j) dot += q[16 * k + j] * x[r].q[ab0 * QK + 16 * k + j];
            isum += s.sc[k] * dot;
            msum += s.mn[k] * x[r].qs[2 * ab0 + k];
          }
          const float dx = x[r].d[ab0];
          acc[r] = std::fma(static_cast<float>(isum), s.d * dx, acc[r]);
          if constexpr (has_min(FMT)) acc[r] = std::fma(static_cast<float>(msum), -s.dmin * dx, acc[r]);
        }
      } else {
        float d[2], m[2];
        decode_block(FMT, block, q, d, m);
        for (int r = 0; r < NR; ++r) {
          int32_t isum = 0;
          for (int j = 0; j < QK; ++j) isum += q[j] * x[r].q[ab0 * QK + j];
          acc[r] = std::fma(static_cast<float>(isum), d[0] * x[r].d[ab0], acc[r]);
          if constexpr (has_min(FMT)) macc[r] = std::fma(m[0], x[r].sb[ab0], macc[r]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) out[r][lane] = acc[r] + macc[r];
  }
}

}  // namespace ggml
